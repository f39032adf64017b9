"""Masking conditions: top-K and seeded random-K heads from the chosen pool, watched heads, the
order a run executes them in, and the one message shape for a bad choice."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_heads.errors import ConfigError, check_choice
from retrieval_heads.experiments.conditions import RANDOM_SEEDS, build_conditions, execution_order
from retrieval_heads.heads import random_heads, rank_heads

SCORES = np.array([[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]])  # tiny llama: 2 layers x 4 heads
KS, SEEDS, WATCH = (0, 2, 3), (0, 1), 3


def test_random_heads_exclude_the_top_set_and_are_seeded():
    scores = np.random.default_rng(0).random((6, 8))
    order = rank_heads(scores)
    assert order[0] == np.unravel_index(scores.argmax(), scores.shape)
    for k in (1, 5, 10, 24):
        top = set(order[:k])
        for seed in range(5):
            r = random_heads(order[k:], k, seed)
            assert len(r) == len(set(r)) == k and not top & set(r)
            assert r == random_heads(order[k:], k, seed)  # reproducible from the recorded seed
        if k < 24:  # k = 24 of 48 heads takes every outside head
            assert len({random_heads(order[k:], k, s) for s in range(5)}) > 1


def test_conditions():
    conds = build_conditions(SCORES, KS, SEEDS, WATCH)
    assert [c.id for c in conds] == [
        "base",
        "top-k2",
        "random-k2-s0",
        "random-k2-s1",
        "top-k3",
        "random-k3-s0",
        "random-k3-s1",
    ]
    top3 = next(c for c in conds if c.id == "top-k3")
    assert set(top3.heads) == {(0, 0), (1, 1), (1, 3)}
    for c in conds:
        if c.kind == "random":
            assert not set(c.heads) & set(rank_heads(SCORES)[: c.k])
        assert not set(c.watch) & set(c.heads) and len(c.watch) == 3  # watched heads are unmasked
    assert conds[0].watch == ((0, 0), (1, 1), (1, 3))


@pytest.mark.parametrize(
    "ks,match", [((9,), "larger than the number of heads"), ((5,), "cannot draw 5 random"), ((-1,), ">= 0")]
)
def test_bad_k(ks, match):
    with pytest.raises(ConfigError, match=match):
        build_conditions(SCORES, ks, SEEDS, WATCH)


def test_random_heads_come_from_non_retrieval_heads_by_default():
    scores = np.random.default_rng(1).random((6, 8)) * 0.3  # about a third of the heads score > 0.1
    order = rank_heads(scores)
    default = build_conditions(scores, (0, 2, 5), range(4))
    assert default == build_conditions(scores, (0, 2, 5), range(4), pool="non-retrieval")
    outside = build_conditions(scores, (0, 2, 5), range(4), pool="outside-top")
    for conds in (default, outside):
        for c in conds:
            if c.kind == "random":
                assert len(set(c.heads)) == c.k and not set(c.heads) & set(order[: c.k])
    assert all(scores[h] <= 0.1 for c in default if c.kind == "random" for h in c.heads)
    assert any(scores[h] > 0.1 for c in outside if c.kind == "random" for h in c.heads)  # the old pool
    assert build_conditions(scores, (5,), (3,)) == build_conditions(scores, (5,), (3,))  # seeded
    # unscored (NaN) heads are never drawn as non-retrieval heads
    nan = SCORES.copy()
    nan[1, 2] = np.nan
    drawn = {h for c in build_conditions(nan, (2,), range(10)) if c.kind == "random" for h in c.heads}
    assert drawn == {(0, 1), (0, 3), (1, 0)}
    with pytest.raises(ConfigError, match="unknown random pool 'nearby'; choose from non-retrieval, outside-top"):
        build_conditions(SCORES, (2,), (0,), pool="nearby")
    # 3 heads of SCORES score <= 0.1 outside its top 5: one clear error; the old pool allows K = 4
    with pytest.raises(ConfigError, match=r"cannot draw 5 random heads from the 3 heads with score <= 0\.1"):
        build_conditions(SCORES, (0, 5), (0,))
    with pytest.raises(ConfigError, match=r"cannot draw 4 random heads from the 2 heads with score <= 0\.1"):
        build_conditions(np.array([[0.9, 0.15, 0.2, 0.05], [0.0, 0.6, 0.15, 0.3]]), (4,), (0,))
    assert build_conditions(SCORES, (4,), (0,), pool="outside-top")[-1].k == 4
    assert build_conditions(SCORES, (5,), ())[-1].id == "top-k5"  # no random draw, no pool needed


def test_execution_order_gives_complete_top_vs_random_pairs_first():
    conds = build_conditions(SCORES, KS, SEEDS, WATCH)
    assert [c.id for c in execution_order(conds)] == [
        "base",
        "top-k2",
        "random-k2-s0",
        "top-k3",
        "random-k3-s0",
        "random-k2-s1",
        "random-k3-s1",
    ]


def test_one_default_for_random_seeds_and_one_message_shape():
    from retrieval_heads.cli.options import RANDOM_SEED_COUNT
    from retrieval_heads.experiments.kv_eval import KVEvalConfig
    from retrieval_heads.experiments.task_eval import TaskEvalConfig

    assert RANDOM_SEEDS == tuple(range(RANDOM_SEED_COUNT)) == TaskEvalConfig().random_seeds
    assert KVEvalConfig().random_seeds == RANDOM_SEEDS
    with pytest.raises(ConfigError, match=r"^unknown mask phase 'x'; choose from all, decode$"):
        check_choice("mask phase", "x", ("all", "decode"))
    check_choice("mask phase", "all", ("all", "decode"))  # a known value passes


def test_layer_matched_draws_keep_the_top_k_layer_profile():
    from collections import Counter

    from retrieval_heads.experiments.conditions import layer_matched_heads

    scores = np.random.default_rng(2).random((6, 8))
    order = rank_heads(scores)
    for k in (1, 5, 12):
        top = order[:k]
        conds = build_conditions(scores, (0, k), range(5), pool="layer-matched")
        draws = [c.heads for c in conds if c.kind == "random"]
        assert len(draws) == 5 and len(set(draws)) > 1  # the seeds draw different heads
        for r in draws:
            assert Counter(h[0] for h in r) == Counter(h[0] for h in top)  # same layers, same counts
            assert len(set(r)) == k and not set(r) & set(top)
        assert draws[3] == layer_matched_heads(order, k, 3)  # seeded: the same heads again
    assert conds == build_conditions(scores, (0, 12), range(5), pool="layer-matched")
    # SCORES' top 3 are (0, 0), (1, 1), (1, 3): one head of layer 0, two of layer 1, drawn from the rest
    r = build_conditions(SCORES, (3,), (0,), pool="layer-matched")[-1].heads
    assert r[0][0] == 0 and {h[0] for h in r[1:]} == {1} and not set(r) & {(0, 0), (1, 1), (1, 3)}
    # the top 5 hold 3 of the 4 heads of layer 0: one clear error
    with pytest.raises(ConfigError, match="K=5: layer 0 holds 3 top-K heads and 1 other heads to match them"):
        build_conditions(SCORES, (0, 5), (0,), pool="layer-matched")


def _matched_map() -> tuple[np.ndarray, np.ndarray]:
    """8 x 8 heads: 5 top heads (scores 0.5..0.9, needle mass 0.6..0.8), 6 more retrieval heads
    (0.1 < score <= 0.3), the rest non-retrieval with needle masses spread over [0, 1)."""
    rng = np.random.default_rng(7)
    scores, mass = rng.uniform(0, 0.1, (8, 8)), rng.uniform(0, 1, (8, 8))
    top = [(0, 1), (2, 3), (4, 5), (6, 7), (7, 0)]
    for i, h in enumerate(top):
        scores[h], mass[h] = 0.9 - 0.1 * i, 0.8 - 0.05 * i
    for h in [(1, 1), (3, 3), (5, 5), (1, 6), (3, 0), (5, 2)]:
        scores[h] = 0.3
    return scores, mass


def test_score_matched_low_draws_low_scoring_heads_of_the_top_k_attention_mass():
    from retrieval_heads.experiments.conditions import score_matched_heads

    scores, mass = _matched_map()
    order = rank_heads(scores)
    top = set(order[:5])
    conds = build_conditions(scores, (0, 5), range(8), pool="score-matched-low", mass=mass)
    draws = [c.heads for c in conds if c.kind == "random"]
    assert conds == build_conditions(scores, (0, 5), range(8), pool="score-matched-low", mass=mass)  # seeded
    assert draws[3] == score_matched_heads(
        [h for h in order[5:] if scores[h] <= 0.1], order, mass, 5, 3
    )  # the rule, seed by seed
    assert len(set(draws)) > 1  # the seeds draw different heads
    uniform = [c.heads for c in build_conditions(scores, (0, 5), range(8)) if c.kind == "random"]
    for r in draws:
        assert len(set(r)) == 5 and not set(r) & top and all(scores[h] <= 0.1 for h in r)

    def gap(heads: tuple) -> float:  # how far a draw's needle masses are from the top K's
        return float(np.abs(np.sort([mass[h] for h in heads]) - np.sort([mass[h] for h in top])).mean())

    assert max(map(gap, draws)) < 0.05 < min(map(gap, uniform))  # about 0.02 vs 0.08 to 0.4


def test_score_matched_low_needs_the_needle_mass_map():
    from retrieval_heads.experiments.conditions import matching_mass
    from retrieval_heads.results import DetectionResult

    scores, mass = _matched_map()
    message = r"^random pool 'score-matched-low' matches heads on their needle_mass attention score, which"
    with pytest.raises(ConfigError, match=message):
        build_conditions(scores, (0, 5), (0,), pool="score-matched-low")
    with pytest.raises(ConfigError, match=message):
        matching_mass(scores, "score-matched-low")  # a bare score map, as a score file loads
    summary = DetectionResult.from_aggregate("m", scores, (scores > 0).astype(float), 3)
    with pytest.raises(ConfigError, match="give a detection run folder or choose another --random-pool"):
        matching_mass(summary, "score-matched-low")
    assert matching_mass(scores, "score-matched-low", draws=False) is None  # no draw, nothing to match
    assert matching_mass(scores, "non-retrieval") is None
    with_mass = DetectionResult(
        "m", scores[None], extra={"needle_mass": np.stack([mass - 0.1, mass + 0.1])}, score_name="copy"
    )
    np.testing.assert_allclose(matching_mass(with_mass, "score-matched-low"), mass)  # the mean map
    assert build_conditions(scores, (0, 5), (), pool="score-matched-low")[-1].id == "top-k5"  # no draw
