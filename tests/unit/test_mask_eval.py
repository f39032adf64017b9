"""mask-eval end to end on tiny models: conditions, seeds, resume, error kinds, bad input via the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from retrieval_heads.detection import Grid
from retrieval_heads.experiments import masked_task
from retrieval_heads.experiments.conditions import build_conditions
from retrieval_heads.experiments.task_eval import MaskEvalResult, TaskEvalConfig, mask_eval
from retrieval_heads.needles import Needle
from retrieval_heads.runs import read_records
from retrieval_heads.scorefile import write_scores
from retrieval_heads.tasks import niah
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
    Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
)
SCORES = np.array([[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]])  # tiny llama: 2 layers x 4 heads
PNG = b"\x89PNG\r\n\x1a\n"  # the first bytes of every PNG file


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", attn_implementation="sdpa")


@pytest.fixture
def cfg(haystack_file):
    return TaskEvalConfig(
        ks=(0, 2, 3),
        random_seeds=(0, 1),
        grid=Grid((80,), (10.0, 90.0), NEEDLES),
        task_args={"path": str(haystack_file), "max_new_tokens": 5},
        chat=False,
        watch=3,
    )


def test_paired_top_minus_random_and_the_pool_in_the_table(tmp_path):
    from retrieval_heads.runs import CONFIG_FILE, RECORDS_FILE

    conds = build_conditions(SCORES, (0, 2), (0, 1))
    attention = {"sink": 0.5, "needle": 0.5, "elsewhere": 0.0}
    recs = [
        {"condition": c, "kind": c.split("-")[0], "k": 0 if c == "base" else 2, "seed": None, "sample_id": sid,
         "niah_score": v, "exact": v == 100, "error_kind": "retrieved", "attention": attention}
        for c, sid, v in [
            ("base", "a", 100.0), ("base", "b", 100.0),
            ("top-k2", "a", 0.0), ("top-k2", "b", 100.0),
            ("random-k2-s0", "a", 100.0), ("random-k2-s0", "b", 100.0),
            ("random-k2-s1", "a", 50.0),  # seed 1 did not finish sample b: b's random score is seed 0's
        ]
    ]  # fmt: skip
    res = MaskEvalResult("x", conds, recs, {"random_pool": "non-retrieval"})
    pd = res.paired()
    assert pd["k"] == [2] and pd["n"] == [2] and pd["mean"] == [(-75.0 + 0.0) / 2]  # a: 0 - 75, b: 100 - 100
    assert pd["low"][0] <= -37.5 <= pd["high"][0] and pd["low"][0] >= -75.0
    table = res.table()
    assert (
        table.splitlines()[0]
        == "random heads drawn from: heads with score <= 0.1 outside the top K (pool 'non-retrieval')"
    )
    assert "top minus random NIAH, paired [95% CI]" in table and "| -37.5 [" in table
    d = res.to_dict()
    assert d["paired_top_minus_random"] == pd and d["random_pool"] == "non-retrieval"
    assert d["bootstrap"]["n_boot"] == 2000 and d["bootstrap"]["seed"] == 0
    again = MaskEvalResult("x", conds, recs, {"random_pool": "non-retrieval"}, n_boot=500, boot_seed=3)
    assert again.paired()["mean"] == pd["mean"] and again.to_dict()["bootstrap"]["n_boot"] == 500
    # a run saved before `random_pool` existed loads, and says it drew from every head outside the top K
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": "x", "conditions": [c.to_dict() for c in conds]}))
    lines = [json.dumps({"id": f"{r['condition']}/{r['sample_id']}", **r}) + "\n" for r in recs]
    (tmp_path / RECORDS_FILE).write_text("".join(lines))
    old = MaskEvalResult.load(tmp_path)
    assert old.to_dict()["random_pool"] == "outside-top" and "every head outside the top K" in old.table()
    assert old.paired() == pd


def test_mask_eval_end_to_end_and_resume(lm, cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    res = mask_eval(lm, SCORES, cfg, out=out, show_progress=False)
    n = 7 * 2 * 2  # conditions x samples
    assert len(res.records) == n
    for name in ("config.json", "records.jsonl", "summary.json", "table.md"):  # the CLI draws mask_eval.png/.svg
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["random_seeds"] == [0, 1] and config["random_pool"] == "non-retrieval"
    assert {c["seed"] for c in config["conditions"] if c["kind"] == "random"} == {0, 1}
    rec = res.records[0]
    assert rec["error_kind"] in niah.ERROR_KINDS and 0 <= rec["niah_score"] <= 100
    assert set(rec["attention"]) == {"sink", "needle", "elsewhere"}
    assert abs(sum(rec["attention"].values()) - 1) < 1e-9
    assert np.asarray(rec["watch_argmax"]).shape == (len(rec["generated_ids"]), 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["curves"]["k"] == [0, 2, 3] and len(summary["errors"]) == 7
    assert summary["paired_top_minus_random"]["k"] == [2, 3] and summary["paired_top_minus_random"]["n"] == [4, 4]
    assert "| K |" in res.table()

    # resume: drop the last records and tear the last line, then rerun: only the missing ones run
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (out / "records.jsonl").write_text("".join(lines[:-3]) + lines[-3][:20])
    calls = []
    real = masked_task.generate
    monkeypatch.setattr(masked_task, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = mask_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert len(calls) == 3
    assert [r["generated_text"] for r in again.records] == [r["generated_text"] for r in res.records]
    assert len(read_records(out / "records.jsonl")) == n
    loaded = MaskEvalResult.load(out)
    assert loaded.curves() == again.curves()
    # a finished run reruns nothing
    calls.clear()
    mask_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert not calls

    # the HTML report shows the curves, the error kinds per condition and examples
    from retrieval_heads.report import build_report
    from retrieval_heads.results import DetectionResult

    page = build_report([DetectionResult("scores", SCORES[None])], mask_evals=[loaded])
    assert "Masking retrieval vs random heads" in page and "hallucination</th>" in page
    assert page.count("top-k2") >= 1 and "Examples</h3>" in page


def test_masking_the_top_heads_changes_tiny_generation(lm, cfg):
    """Sanity: masking every head with zero output changes the text (the hooks are active)."""
    full = replace(cfg, ks=(0, 8), random_seeds=(), method="zero")
    res = mask_eval(lm, SCORES, full, show_progress=False)
    base = [r["generated_ids"] for r in res.records if r["k"] == 0]
    masked = [r["generated_ids"] for r in res.records if r["k"] == 8]
    assert base != masked


# ------------------------------------------------------------------------------------- CLI
def _scores_file(tmp_path, arr):
    p = tmp_path / "scores.json"
    write_scores(p, np.asarray(arr)[None])
    return p


@pytest.mark.parametrize(
    "args,match",
    [
        (["--k", "0,9"], "K=9 is larger than the number of heads (8)"),
        (["--k", "5"], "cannot draw 5 random heads"),
        (["--method", "gaussian"], "unknown masking method 'gaussian'"),
        (["--mask-phase", "prefill"], "unknown mask phase"),
        (["--mask-k", "a,b"], "--mask-k must be a comma list"),
        (["--random-pool", "nearby"], "unknown random pool 'nearby'"),
        (["--random-seeds", "-1"], "--random-seeds must be >= 0"),
        (["--k", "5", "--random-pool", "outside-top"], "cannot draw 5 random heads outside the top 5 of 8"),
        (["--random-pool", "score-matched-low"], "'score-matched-low' matches heads on their needle_mass attention"),
    ],
)
def test_cli_bad_input(cli, tiny_llama_dir, needles_file, haystack_file, tmp_path, args, match):
    scores = _scores_file(tmp_path, SCORES)
    code, _out, err = cli(
        "mask-eval",
        "--scores",
        scores,
        "--model",
        tiny_llama_dir,
        "--needles",
        needles_file,
        "--haystack",
        haystack_file,
        "--lengths",
        "80",
        "--depths",
        "50",
        "--no-chat",
        "--out",
        tmp_path / "run",
        "--no-progress",
        *args,
    )
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and match in lines[0], err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_cli_shape_mismatch(cli, tiny_llama_dir, needles_file, haystack_file, tmp_path):
    scores = _scores_file(tmp_path, np.ones((3, 4)))
    code, _out, err = cli(
        "mask-eval",
        "--scores",
        scores,
        "--model",
        tiny_llama_dir,
        "--needles",
        needles_file,
        "--haystack",
        haystack_file,
        "--lengths",
        "80",
        "--k",
        "0,1",
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "shape (3, 4)" in lines[0] and "2 x 4" in lines[0], err


def test_cli_runs(cli, tiny_llama_dir, needles_file, haystack_file, tmp_path):
    scores = _scores_file(tmp_path, SCORES)
    code, out, err = cli(
        "mask-eval",
        "--scores",
        scores,
        "--model",
        tiny_llama_dir,
        "--needles",
        needles_file,
        "--haystack",
        haystack_file,
        "--lengths",
        "80",
        "--depths",
        "50",
        "--no-chat",
        "--k",
        "0,2",
        "--random-seeds",
        "2",
        "--random-pool",
        "layer-matched",
        "--max-new-tokens",
        "4",
        "--method",
        "zero",
        "--mask-phase",
        "decode",
        "--out",
        tmp_path / "run",
        "--no-progress",
    )
    assert code == 0, err
    assert "| K |" in out and (tmp_path / "run" / "mask_eval.png").exists()
    assert (tmp_path / "run" / "null_distribution.png").read_bytes().startswith(PNG)
    assert "(pool 'layer-matched')" in out and "| K | top-K effect (NIAH score) |" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["random_pool"] == "layer-matched" and summary["null_distribution"][0]["n_draws"] == 2


def test_a_sweep_without_k0_places_the_top_k_in_the_same_null(lm, cfg, tmp_path):
    """`--mask-k 2` (no unmasked run): the effects are the NIAH scores themselves, with the
    percentile and p-value of the same run with K = 0; the null figure of its 3 draws is drawn.
    The draws come from the score-matched-low pool (the needle_mass map of a detection result)."""
    from retrieval_heads.plots.mask import plot_null_distribution
    from retrieval_heads.results import DetectionResult

    mass = np.array([[0.9, 0.1, 0.5, 0.2], [0.3, 0.8, 0.6, 0.4]])
    det = DetectionResult("m", SCORES[None], extra={"needle_mass": mass[None]})
    matched = replace(cfg, random_seeds=(0, 1, 2), random_pool="score-matched-low")
    with_base = mask_eval(lm, det, replace(matched, ks=(0, 2)), show_progress=False)
    alone = mask_eval(lm, det, replace(matched, ks=(2,)), show_progress=False)
    assert alone.config["random_pool"] == "score-matched-low"
    assert alone.table().splitlines()[0].endswith("(pool 'score-matched-low')")
    (b,), (t,) = with_base.null(), alone.null()
    base = with_base.curves()["top_score"][0]  # K = 0: the unmasked mean NIAH score
    assert t["effect"] == "metric" and "effect" not in b and t["n_draws"] == b["n_draws"] == 3
    assert (t["n_as_harmful"], t["percentile"], t["p_value"]) == (b["n_as_harmful"], b["percentile"], b["p_value"])
    assert t["top_effect"] - base == pytest.approx(b["top_effect"])
    assert np.subtract(t["draw_effects"], base) == pytest.approx(b["draw_effects"])
    assert "null distribution: effect = metric of the masked run; no unmasked run in this sweep" in alone.table()
    paths = plot_null_distribution(alone, tmp_path / "null_distribution")
    assert paths[0].name == "null_distribution.png" and paths[0].read_bytes().startswith(PNG)


def test_execution_order_and_partial_curves(cfg):
    from retrieval_heads.experiments.conditions import execution_order

    conds = build_conditions(SCORES, cfg.ks, cfg.random_seeds, cfg.watch)
    assert [c.id for c in execution_order(conds)] == [
        "base",
        "top-k2",
        "random-k2-s0",
        "top-k3",
        "random-k3-s0",
        "random-k2-s1",
        "random-k3-s1",
    ]
    recs = [
        {"condition": c, "niah_score": s, "exact": s == 100, "error_kind": "retrieved"}
        for c, s in [
            ("base", 100.0),
            ("top-k2", 0.0),
            ("top-k3", 50.0),
            ("random-k2-s0", 100.0),
            ("random-k3-s0", 80.0),
        ]
    ]
    cv = MaskEvalResult("x", conds, recs).curves()  # seed 1 not run yet: random = seed 0 alone
    assert cv["top_score"] == [100.0, 0.0, 50.0] and cv["random_score"] == [100.0, 100.0, 80.0]
    assert cv["random_draws"] == [0, 1, 1]


def test_task_eval_runs_niah_like_mask_eval(lm, cfg):
    """One experiment: the same config through task_eval answers exactly as mask-eval does; mask-eval
    adds NIAH's columns."""
    from retrieval_heads.experiments.task_eval import task_eval

    tcfg = replace(cfg, ks=(0, 2), random_seeds=(), watch=0)
    masked = mask_eval(lm, SCORES, tcfg, show_progress=False)
    res = task_eval(lm, SCORES, tcfg, show_progress=False)
    assert res.metrics == ["answer_recall", "exact"] and res.config["task"]["name"] == "niah"
    by_id = {r["id"]: r for r in masked.records}
    assert len(res.records) == len(masked.records) == 8
    for r in res.records:
        m = by_id[r["id"]]
        assert r["generated_text"] == m["generated_text"] and r["prompt_tokens"] == m["prompt_tokens"]
        assert r["scores"] == {"answer_recall": m["answer_recall"], "exact": float(m["exact"])}


def test_old_mask_eval_folders_resume(lm, cfg, tmp_path, monkeypatch):
    """mask-eval saves its config as it always did, its kind under "kind"; a folder that saved the
    kind under "task" resumes without generating again."""
    out = tmp_path / "run"
    small = replace(cfg, ks=(0, 2), random_seeds=(0,))
    first = mask_eval(lm, SCORES, small, out=out, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "mask-eval" and "task" not in config and "doc_ids" not in config
    assert {"ks", "lengths", "depths", "needles", "max_new_tokens", "haystack", "watch", "sink_tokens"} <= set(config)
    config["task"] = config.pop("kind")
    (out / "config.json").write_text(json.dumps(config))

    def boom(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(masked_task, "generate", boom)
    again = mask_eval(lm, SCORES, small, out=out, show_progress=False)
    assert again.curves() == first.curves() and again.table() == first.table()
