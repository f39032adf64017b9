"""The null distribution of a masking effect: the top-K effect against N random draws, its
percentile and permutation p-value, hand-checked on synthetic records of task-eval and mask-eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval_heads.experiments import conditions
from retrieval_heads.experiments.null import null_table, null_test
from retrieval_heads.experiments.task_eval import MaskEvalResult, TaskEvalResult

SCORES = np.array([[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]])  # tiny llama: 2 layers x 4 heads


def test_null_test_counts_draws_at_least_as_harmful():
    # top drop 0.4; draws' drops 0.1, 0.5, 0.0, 0.2: one draw (0.5) is at least as harmful
    t = null_test(-0.4, [-0.1, -0.5, 0.0, -0.2])
    assert t["n_draws"] == 4 and t["n_as_harmful"] == 1
    assert t["percentile"] == pytest.approx(1 / 4) and t["p_value"] == pytest.approx(2 / 5)
    # a tie counts as at least as harmful; NaN draws (unfinished) are left out
    t = null_test(-0.5, [-0.5, -0.1, float("nan")])
    assert (t["n_draws"], t["n_as_harmful"], t["p_value"]) == (2, 1, pytest.approx(2 / 3))
    # no draw as harmful: percentile 0, p at its floor 1 / (1 + N)
    t = null_test(-1.0, [0.0] * 19)
    assert t["percentile"] == 0 and t["p_value"] == pytest.approx(1 / 20)
    # every draw more harmful than the top K (top-K masking helps)
    assert null_test(0.1, [-0.2, 0.0])["p_value"] == pytest.approx(1.0)
    for t in (null_test(-0.4, []), null_test(float("nan"), [-0.1])):
        assert np.isnan(t["percentile"]) and np.isnan(t["p_value"]) and t["n_as_harmful"] == 0
    assert null_table([("2", null_test(-0.4, []))], "points") == []  # no draw: no table


def _task_result(draws: dict[str, dict[str, float]], ks: tuple[int, ...] = (0, 2)) -> TaskEvalResult:
    conds = conditions.build_conditions(SCORES, ks, range(len(draws) - len(ks)))
    recs = [
        {"condition": c, "doc_id": d, "scores": {"acc": float(v)}, "answers": ["a"], "generated_text": "a"}
        for c, per in draws.items()
        for d, v in per.items()
    ]
    config = {"model": "x", "task": {"name": "t"}, "style": "answer-only", "metrics": ["acc"]}
    config["conditions"] = [c.to_dict() for c in conds]
    config["random_pool"] = "layer-matched"
    return TaskEvalResult.from_run(config, recs)


DOCS = ("d1", "d2", "d3", "d4")
ACC = {
    "base": dict.fromkeys(DOCS, 1.0),
    "top-k2": {"d1": 0, "d2": 0, "d3": 1, "d4": 1},  # effect -0.5
    "random-k2-s0": {"d1": 1, "d2": 1, "d3": 1, "d4": 1},  # 0
    "random-k2-s1": {"d1": 0, "d2": 0, "d3": 0, "d4": 1},  # -0.75: more harmful
    "random-k2-s2": {"d1": 0, "d2": 1, "d3": 1, "d4": 1},  # -0.25
    "random-k2-s3": {"d1": 1, "d2": 0, "d3": 0, "d4": 1},  # -0.5: a tie, as harmful
}


def test_task_eval_null_on_four_draws_with_known_effects():
    res = _task_result(ACC)
    t = res.null()["acc"]
    assert t["k"] == 2 and t["top_effect"] == pytest.approx(-0.5)
    assert t["draw_effects"] == pytest.approx([0.0, -0.75, -0.25, -0.5])
    assert t["n_as_harmful"] == 2 and t["percentile"] == pytest.approx(0.5) and t["p_value"] == pytest.approx(3 / 5)
    top = next(r for r in res.rows() if r["kind"] == "top")
    assert t["top_effect"] == pytest.approx(top["acc"]["delta"])  # the row's Δ vs none
    summary = json.loads(json.dumps(res.to_dict()))
    assert summary["null_distribution"]["acc"]["p_value"] == pytest.approx(0.6)
    assert summary["random_pool"] == "layer-matched"
    table = res.table()
    assert "(pool 'layer-matched')" in table.splitlines()[0]
    assert "| 2, acc | -50.0 | -37.5 [-75.0, +0.0] | 4 | 2 | 50% | 0.600 |" in table


def test_old_task_eval_records_load_and_their_first_table_is_unchanged():
    one_draw = {"base": {"d1": 1.0}, "top-k2": {"d1": 0.0}, "random-k2-s0": {"d1": 1.0}}
    res = _task_result(one_draw)
    table = res.table()
    first, null = table.split("\n\nnull distribution")  # the null follows the table as it was
    assert first.splitlines()[-1].startswith("|   random 2, seed 0 | 1 |") and "| 2, acc | -100.0 |" in null
    no_random = _task_result({"base": {"d1": 1.0}, "top-k2": {"d1": 0.0}})
    assert "null distribution" not in no_random.table()  # no draw: the table as before


def test_mask_eval_null_per_k_in_summary_and_table():
    conds = conditions.build_conditions(SCORES, (0, 2), (0, 1, 2, 3))
    attention = {"sink": 0.5, "needle": 0.5, "elsewhere": 0.0}
    means = {"base": 100.0, "top-k2": 20.0, "random-k2-s0": 100.0, "random-k2-s1": 10.0}
    means |= {"random-k2-s2": 90.0, "random-k2-s3": 60.0}
    recs = [
        {"condition": c, "kind": c.split("-")[0], "k": 0 if c == "base" else 2, "seed": None, "sample_id": sid,
         "niah_score": v, "exact": v == 100, "error_kind": "retrieved", "attention": attention}
        for c, v in means.items()
        for sid in ("a", "b")
    ]  # fmt: skip
    res = MaskEvalResult("x", conds, recs, {"random_pool": "layer-matched"})
    (t,) = res.null()
    assert t["k"] == 2 and t["top_effect"] == pytest.approx(-80.0)
    assert t["draw_effects"] == pytest.approx([0.0, -90.0, -10.0, -40.0])
    assert (t["n_as_harmful"], t["percentile"], t["p_value"]) == (1, 0.25, pytest.approx(0.4))
    assert res.to_dict()["null_distribution"][0]["p_value"] == pytest.approx(0.4)
    assert "| 2 | -80.0 | -35.0 [-90.0, +0.0] | 4 | 1 | 25% | 0.400 |" in res.table()
    # a draw cut short (a run stopped early) is left out of the null, as of the curves
    (t,) = MaskEvalResult("x", conds, recs[:-1], {}).null()
    assert t["n_draws"] == 3 and t["n_as_harmful"] == 1


def test_without_the_unmasked_run_the_effects_are_the_metrics_with_the_same_percentile_and_p():
    with_base = _task_result(ACC)
    no_base = _task_result({c: v for c, v in ACC.items() if c != "base"}, ks=(2,))
    t, b = no_base.null()["acc"], with_base.null()["acc"]
    assert t["effect"] == "metric" and "effect" not in b  # runs with K = 0 save what they always did
    assert t["top_effect"] == pytest.approx(0.5) and t["draw_effects"] == pytest.approx([1.0, 0.25, 0.75, 0.5])
    assert (t["n_draws"], t["n_as_harmful"], t["percentile"], t["p_value"]) == (
        b["n_draws"], b["n_as_harmful"], b["percentile"], b["p_value"]
    )  # fmt: skip
    table = no_base.table()
    assert "null distribution: effect = metric of the masked run; no unmasked run in this sweep;" in table
    assert "| 2, acc | +50.0 | +62.5 [+25.0, +100.0] | 4 | 2 | 50% | 0.600 |" in table
    assert "null distribution: effect = masked minus no mask;" in with_base.table()


def test_a_saved_null_reads_back_as_computed():
    from retrieval_heads.experiments.null import null_rows
    from retrieval_heads.runs import strict_json

    res = _task_result({c: v for c, v in ACC.items() if c != "top-k2"})  # no top-K record: NaN, saved as null
    saved = json.loads(json.dumps(strict_json(res.to_dict())))["null_distribution"]
    assert saved["acc"]["top_effect"] is None
    ((label, t),) = null_rows(saved)
    assert label == "2, acc" and np.isnan(t["top_effect"]) and np.isnan(t["p_value"])
    assert null_table(null_rows(saved), "points", scale=100) == null_table(null_rows(res.null()), "points", scale=100)


def test_null_figure_is_written_with_draws_and_not_without(tmp_path):
    from retrieval_heads.plots.mask import plot_null_distribution

    paths = plot_null_distribution(_task_result(ACC), tmp_path / "null")
    assert [p.name for p in paths] == ["null.png", "null.svg"]
    assert paths[0].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    no_draw = _task_result({"base": {"d1": 1.0}, "top-k2": {"d1": 0.0}})
    assert plot_null_distribution(no_draw, tmp_path / "none") == [] and not list(tmp_path.glob("none*"))
