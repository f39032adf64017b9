"""Scoring arithmetic on hand-built attention argmax (paper Eq. 1), aggregation, score files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval_heads.engines.reference import row_argmax
from retrieval_heads.errors import DataError
from retrieval_heads.results import DetectionResult, sparsity
from retrieval_heads.scorefile import parse_scores, read_scores, scores_to_obj
from retrieval_heads.scoring import aggregate, answer_recall, copy_counts, copy_events, sample_scores

#            0   1   2   3   4   5   6   7
PROMPT = [5, 9, 11, 12, 13, 12, 7, 8]  # needle span [2, 6) = tokens 11 12 13 12


def test_copy_events_follow_eq1():
    # 3 steps, 1 layer, 4 heads. Generated tokens: 11, 12, 99.
    gen = [11, 12, 99]
    argmax = np.array(
        [
            [
                [2, 3, 0, 6]
            ],  # token 11: head0 at 2 (=11, in span) copies; head1 at 3 (=12) wrong token; head2 outside; head3 outside
            [
                [3, 5, 1, 4]
            ],  # token 12: head0 at 3 (12) copies; head1 at 5 (12) copies; head2 outside; head3 at 4 (13) no
            [[2, 3, 4, 5]],  # token 99 is not in the needle: nobody copies
        ]
    )
    ev = copy_events(argmax, gen, PROMPT, 2, 6)
    assert ev.shape == (3, 1, 4)
    assert ev[:, 0, :].tolist() == [[True, False, False, False], [True, True, False, False], [False] * 4]
    counts = copy_counts(ev)
    assert counts.tolist() == [[2, 1, 0, 0]]
    np.testing.assert_allclose(sample_scores(counts, 4), [[0.5, 0.25, 0, 0]])


def test_repeat_copy_counts_twice_and_can_exceed_one():
    gen = [12, 12, 12]  # the same needle token generated three times, head copies each time
    argmax = np.array([[[3]], [[3]], [[3]]])
    counts = copy_counts(copy_events(argmax, gen, PROMPT, 2, 4))  # span of 2 tokens: [11, 12]
    assert counts.tolist() == [[3]]
    assert sample_scores(counts, 2)[0, 0] == 1.5


def test_argmax_beyond_prompt_never_copies():
    # positions of generated tokens (>= len(prompt)) are outside the needle span
    ev = copy_events(np.array([[[8]], [[9]]]), [11, 11], PROMPT, 2, 6)
    assert not ev.any()


def test_empty_generation():
    ev = copy_events(np.zeros((0, 2, 3), dtype=np.int64), [], PROMPT, 2, 6)
    assert copy_counts(ev).shape == (2, 3) and copy_counts(ev).sum() == 0


def test_row_argmax_maps_sliding_window_rows_to_absolute_positions():
    # layer 0 sees all 10 keys; layer 1 (sliding) only the last 4; ties go to the first index
    a0 = torch.zeros(1, 2, 1, 10)
    a0[0, 0, 0, 7] = 1.0
    a0[0, 1, 0, [2, 5]] = 1.0  # tie -> 2
    a1 = torch.zeros(1, 2, 1, 4)
    a1[0, 0, 0, 1] = 1.0
    a1[0, 1, 0, 3] = 1.0
    am = row_argmax((a0, a1), total=10)
    assert am.tolist() == [[7, 2], [7, 9]]


def test_aggregate_mean_and_activation_frequency():
    per = np.array([[[0.0, 0.5]], [[0.2, 0.0]], [[0.4, 0.0]]])
    s, f = aggregate(per)
    np.testing.assert_allclose(s, [[0.2, 0.5 / 3]])
    np.testing.assert_allclose(f, [[2 / 3, 1 / 3]])
    s0, f0 = aggregate(np.zeros((0, 1, 2)))
    assert np.isnan(s0).all() and np.isnan(f0).all()


def test_answer_recall_uses_rouge1_recall():
    assert answer_recall("smoked tamarind from Quessa Island", "It is smoked tamarind.") == pytest.approx(2 / 5)
    assert answer_recall("lantern-fig-seventy", "The password is lantern-fig-seventy.") == 1.0
    assert answer_recall("Admiral Biscuit", "no idea") == 0.0


def test_result_from_records_keeps_only_retrieved_samples():
    recs = [
        {"kept": True, "needle_tokens": 4, "copy_counts": [[4, 0], [1, 0]]},
        {"kept": False, "needle_tokens": 4, "copy_counts": [[4, 4], [4, 4]]},
        {"kept": True, "needle_tokens": 2, "copy_counts": [[0, 0], [1, 0]]},
    ]
    r = DetectionResult.from_records("m", recs)
    assert r.n_kept == 2
    np.testing.assert_allclose(r.scores, [[0.5, 0], [0.375, 0]])
    np.testing.assert_allclose(r.activation_frequency, [[0.5, 0], [1.0, 0]])
    assert [(h.layer, h.head) for h in r.top(2)] == [(0, 0), (1, 0)]
    assert r.retrieval_heads() == [(0, 0), (1, 0)]


def test_top_is_the_one_head_ranking_ties_by_lower_layer_then_head_never_nan():
    from retrieval_heads.heads import rank_heads

    per = np.array([[[0.2, np.nan, 0.5], [0.5, 0.2, 0.0]]])  # one kept sample, 2 layers x 3 heads
    r = DetectionResult("m", per)
    top = r.top(6)
    assert [(h.layer, h.head) for h in top] == [(0, 2), (1, 0), (0, 0), (1, 1), (1, 2)]  # (0, 1) is not scored
    assert [(h.layer, h.head) for h in top] == rank_heads(r.scores)[:5]
    assert not any(np.isnan(h.score) for h in top) and top[0].score == 0.5 and top[0].activation_frequency == 1.0
    assert [(h.layer, h.head) for h in r.top(2)] == [(0, 2), (1, 0)]


def test_score_file_roundtrip_and_validation(tmp_path):
    per = np.random.default_rng(0).random((3, 2, 4))
    p = tmp_path / "s.json"
    p.write_text(json.dumps(scores_to_obj(per)))
    np.testing.assert_allclose(read_scores(p), per)
    full = p.read_text()
    p.write_text(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"s\.json.*not valid JSON"):
        read_scores(p)
    for obj, msg in [
        ({"0-0": [0.1], "x": [0.2]}, "bad key"),
        ({"0-0": [0.1], "0-1": "a"}, "not a list"),
        ({"0-0": [0.1], "1-1": [0.2]}, "missing"),
        ({"0-0": [0.1], "0-1": [0.2, 0.3]}, "different numbers"),
        ({"0-0": [-1.0]}, "negative"),
        ([], "non-empty JSON object"),
    ]:
        with pytest.raises(DataError, match=msg):
            parse_scores(obj, "f.json")


def test_sparsity_shares_sum_to_one():
    s = np.array([[0, 0.05, 0.1, 0.2], [0.5, 0.6, 0, 0]])
    sp = sparsity(s)
    assert sp == {"zero": 3 / 8, "(0,0.1]": 2 / 8, "(0.1,0.5]": 2 / 8, ">0.5": 1 / 8}
