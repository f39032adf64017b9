"""DetectionResult (results.py): its two modes, the retrieval table of the grid, and `require_kept`,
which every consumer of a detection run calls: a run that kept no sample is refused in one line,
fewer than MIN_KEPT kept samples warn."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from retrieval_heads.detection import DetectConfig, Grid, detect
from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.needles import Needle
from retrieval_heads.results import MIN_KEPT, DetectionResult, require_kept
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
)
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, haystack: Path, recall_threshold: float, lengths=(80, 120)) -> DetectionResult:
    """A detection run of a random tiny model: its answers never match, so the default threshold
    keeps nothing and -1 keeps every sample."""
    cfg = DetectConfig(
        engine="reference", max_new_tokens=3, recall_threshold=recall_threshold, chat=False, haystack=str(haystack)
    )
    return detect(tiny_model("llama"), Grid(lengths, (0.0, 50.0), NEEDLES), cfg, out=out, show_progress=False)


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory, haystack_file) -> Path:
    out = tmp_path_factory.mktemp("zero") / "run"
    assert _run(out, haystack_file, 0.5).n_kept == 0
    return out


@pytest.fixture(scope="module")
def few_run(tmp_path_factory, haystack_file) -> Path:
    out = tmp_path_factory.mktemp("few") / "run"
    assert 0 < _run(out, haystack_file, -1.0).n_kept < MIN_KEPT
    return out


def test_a_run_that_kept_nothing_scores_no_head_and_says_so(zero_run):
    result = DetectionResult.load(zero_run)
    assert result.mode == "records" and result.n_kept == 0 and len(result.records) == 4
    assert np.isnan(result.scores).all() and result.top(10) == []
    assert [(c["length"], c["depth"], c["run"], c["kept"]) for c in result.retrieval_table()] == [
        (80, 0.0, 1, 0),
        (80, 50.0, 1, 0),
        (120, 0.0, 1, 0),
        (120, 50.0, 1, 0),
    ]
    with pytest.raises(ConfigError, match=r"no kept detection sample \(0 of 4 samples retrieved the needle\)"):
        require_kept(result, zero_run)


def test_few_kept_samples_warn_and_enough_do_not(few_run, caplog):
    result = DetectionResult.load(few_run)
    with caplog.at_level(logging.WARNING, logger="retrieval_heads.results"):
        assert require_kept(result, few_run) is result
    assert f"only {result.n_kept} kept detection sample(s), fewer than {MIN_KEPT}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrieval_heads.results"):
        require_kept(DetectionResult.load("ref:smollm2-135m"))
    assert caplog.text == ""


def test_the_two_modes_are_explicit_and_a_summary_refuses_per_sample_work(few_run):
    full = DetectionResult.load(few_run)
    snapshot = DetectionResult.load(ROOT / "docs" / "runs" / "smollm2-135m")  # summary.json only
    assert full.mode == "records" and full.has_per_sample
    assert snapshot.mode == "summary" and not snapshot.has_per_sample and snapshot.n_kept > 0
    assert len(snapshot.top(10)) == 10 and np.isnan(snapshot.top_k_stability(10))
    full.require_records("the bootstrap")  # no error
    with pytest.raises(ConfigError, match=r"aggregates of its 'copy' score only.*the bootstrap needs the run folder"):
        snapshot.require_records("the bootstrap")
    # another score of a summary is its saved mean map, ranked as the full run ranks it
    topk = snapshot.with_score("topk_mass")
    saved = json.loads((ROOT / "docs" / "runs" / "smollm2-135m" / "summary.json").read_text())["other_scores"]
    np.testing.assert_allclose(topk.scores, np.array(saved["topk_mass"]["scores"], dtype=float))
    assert [(h.layer, h.head) for h in topk.top(5)] == [(t["layer"], t["head"]) for t in saved["topk_mass"]["top"][:5]]
    back = topk.with_score("copy")  # activation frequency is not saved per score: only the ranking returns
    assert [(h.layer, h.head, h.score) for h in back.top(10)] == [(h.layer, h.head, h.score) for h in snapshot.top(10)]
    with pytest.raises(ConfigError, match="has no score 'nope'"):
        snapshot.with_score("nope")


def test_a_saved_summary_result_loads_with_its_scores(tmp_path):
    snapshot = DetectionResult.load(ROOT / "docs" / "runs" / "smollm2-135m")
    snapshot.save(tmp_path / "copy")
    again = DetectionResult.load(tmp_path / "copy" / "retrieval_scores.json")
    np.testing.assert_allclose(again.scores, snapshot.scores)


def test_summary_of_a_run_keeps_its_keys_and_adds_the_retrieval_table(few_run):
    summary = json.loads((few_run / "summary.json").read_text())
    snapshot = json.loads((ROOT / "docs" / "runs" / "smollm2-135m" / "summary.json").read_text())
    assert set(snapshot) <= set(summary) and set(summary) - set(snapshot) == {"retrieval_by_cell"}
    assert sum(c["kept"] for c in summary["retrieval_by_cell"]) == summary["n_kept"]


# ---------------------------------------------------------------- every consumer refuses a run that kept nothing
@pytest.mark.parametrize(
    "command",
    [
        ["export-heads", "--budget", "0.5"],
        ["kv-eval"],
        ["mask-eval"],
    ],
)
def test_consumers_refuse_a_zero_kept_run_in_one_line(command, zero_run, cli, tiny_llama_dir, tmp_path):
    model = [] if command[0] == "export-heads" else ["--model", tiny_llama_dir]
    code, _, err = cli(*command, "--scores", zero_run, *model, "--out", tmp_path / "o")
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "no kept detection sample (0 of 4 samples retrieved the needle)" in lines[0]
    assert not (tmp_path / "o").exists()


def test_export_heads_on_a_few_kept_run_warns_and_writes(few_run, cli, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="retrieval_heads.results"):
        code, _, err = cli("export-heads", "--scores", few_run, "--budget", "0.5", "--out", tmp_path / "o")
    assert code == 0, err
    assert "fewer than 5" in caplog.text and (tmp_path / "o").is_dir()


def test_the_trainer_callback_refuses_a_zero_kept_reference(zero_run):
    from retrieval_heads.integrations.transformers import RetrievalHeadsCallback

    with pytest.raises(ConfigError, match="no kept detection sample"):
        RetrievalHeadsCallback(tiny_model("llama").tokenizer, reference=zero_run)


def test_the_kvpress_ranking_refuses_a_zero_kept_run(zero_run):
    pytest.importorskip("kvpress")
    from retrieval_heads.integrations.kvpress import load_kv_ranking

    with pytest.raises(ConfigError, match="no kept detection sample"):
        load_kv_ranking(zero_run, tiny_model("llama").spec)


SNAPSHOT = Path(__file__).resolve().parents[2] / "docs" / "runs" / "smollm2-135m"


@pytest.mark.parametrize(
    "change, why",
    [
        ({"other_scores": [1, 2]}, "other_scores must map"),
        ({"other_scores": {"needle_mass": 3}}, "other_scores must map"),
        ({"n_kept": float("inf")}, "n_kept must be a count"),
        ({"n_kept": -3}, "n_kept must be a count"),
        ({"n_kept": True}, "n_kept must be a count"),
        ({"scores": "bad"}, "not a detection summary"),
    ],
)
def test_a_corrupted_snapshot_is_one_data_error(tmp_path, change, why):
    from retrieval_heads.errors import DataError

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_bytes((SNAPSHOT / "config.json").read_bytes())
    summary = json.loads((SNAPSHOT / "summary.json").read_text())
    (snap / "summary.json").write_text(json.dumps({**summary, **change}))
    with pytest.raises(DataError, match=why):
        DetectionResult.load(snap)


@pytest.mark.parametrize("bad", [-0.5, float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["scores", "other"])
def test_a_snapshot_with_negative_or_infinite_scores_is_refused_not_ranked(tmp_path, bad, key):
    from retrieval_heads.errors import DataError

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_bytes((SNAPSHOT / "config.json").read_bytes())
    summary = json.loads((SNAPSHOT / "summary.json").read_text())
    if key == "scores":
        summary["scores"][0][0] = bad
    else:
        name = next(iter(summary["other_scores"]))
        summary["other_scores"][name]["scores"][1][1] = bad
    (snap / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="negative or infinite"):
        DetectionResult.load(snap)
    assert DetectionResult.load(SNAPSHOT).top(3)  # the intact snapshot still loads


# ---------------------------------------------------------------- validated run folders
def _detection_folder(path: Path, records: list) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": "tiny"}))
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rec(i: int, counts=None, **kw) -> dict:
    return {"id": f"s{i}", "kept": True, "needle_tokens": 4, "copy_counts": counts or [[1, 0], [0, 2]], **kw}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"id": "s1", "kept": True, "needle_tokens": 4}, "records.jsonl:2: record has no copy_counts"),
        (_rec(1, [[1, 0, 0], [0, 2, 0]]), "records.jsonl:2: copy_counts has shape"),
        (_rec(1, [[1, 0], [0]]), "records.jsonl:2: copy_counts must be"),
        (_rec(1, needle_tokens=0), "records.jsonl:2: needle_tokens must be a positive integer"),
        (_rec(1, needle_tokens=-3), "records.jsonl:2: needle_tokens must be a positive integer"),
        (_rec(1, [[1, 0], [0, -2]]), "records.jsonl:2: copy_counts holds a negative count"),
        (_rec(0), "records.jsonl:2: duplicate record id 's0'"),
        (_rec(1, kept="yes"), "records.jsonl:2: kept must be true or false"),
        (_rec(1, [[1, 0], [0, 1e400]]), "records.jsonl:2: copy_counts holds a non-finite number"),
    ],
)
def test_detection_records_are_validated_with_file_and_line(tmp_path, bad, message):
    from retrieval_heads.results import DetectionResult

    d = _detection_folder(tmp_path / "run", [_rec(0), bad])
    with pytest.raises(DataError) as e:
        DetectionResult.load(d)
    assert message in str(e.value) and str(d) in str(e.value)


def test_valid_records_still_load(tmp_path):
    from retrieval_heads.results import DetectionResult

    skipped = {"id": "s1", "kept": False, "copy_counts": [[9, 9], [9, 9]]}  # not kept: no span needed
    r = DetectionResult.load(_detection_folder(tmp_path / "run", [_rec(0), skipped]))
    assert r.n_kept == 1 and r.shape == (2, 2)
    np.testing.assert_allclose(r.scores, [[0.25, 0], [0, 0.5]])


def _json_values():
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers(-5, 10**20) | st.floats() | st.text(max_size=4)
    return st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4))


def test_any_summary_json_loads_or_is_one_data_error():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from retrieval_heads.errors import DataError

    keys = st.sampled_from(["scores", "activation_frequency", "n_kept", "other_scores", "score", "name"])
    base = json.loads((SNAPSHOT / "summary.json").read_text())

    @settings(max_examples=150, deadline=None)
    @given(changes=st.dictionaries(keys, _json_values(), max_size=3))
    def check(changes):
        try:
            r = DetectionResult.from_summary({**base, **changes}, {"model": "m"}, "summary.json")
        except DataError as e:
            assert "\n" not in str(e)
            return
        assert not np.isinf(r.scores).any() and not (r.scores < 0).any() and r.n_kept >= 0

    check()
