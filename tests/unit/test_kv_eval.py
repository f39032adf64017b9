"""kv-eval on tiny models: each policy paired with sink + window, the experiment end to end with
resume, extractive QA on compressed caches, the needle_mass default, and bad CLI input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval_heads.detection import Grid
from retrieval_heads.errors import ConfigError
from retrieval_heads.experiments.kv_eval import KVEvalConfig, KVEvalResult, kv_eval, qa_prompts
from retrieval_heads.kvcache.export import kv_score
from retrieval_heads.needles import Needle
from retrieval_heads.plots.kv import plot_kv_eval
from retrieval_heads.scorefile import write_scores
from retrieval_heads.testing import tiny_model

from .test_tasks import SQUAD


def test_kv_eval_scores_each_task_by_its_primary_metric():
    from retrieval_heads.experiments.kv_eval import QA_TASK, TASK_TITLES
    from retrieval_heads.tasks.registry import TASKS

    assert [TASKS[t].metrics[0].name for t in TASK_TITLES] == ["answer_recall", "f1"] and QA_TASK in TASK_TITLES


def test_kv_eval_pairs_each_policy_with_sink_window_at_the_same_budget():
    def rec(cid, sample, v, task="niah"):
        policy, budget = (cid, 1.0) if cid == "full" else (cid.split("-b")[0], float(cid.split("-b")[1].split("-")[0]))
        key = "answer_recall" if task == "niah" else "f1"
        return {"kind": "eval", "task": task, "condition": cid, "policy": policy, "budget": budget, "sample_id": sample,
                key: v, "exact": v == 1, "kv_bytes": 10, "kv_share": budget, "kv_bytes_end": 10}  # fmt: skip

    recs = [
        *(rec("full", s, 1.0) for s in "abc"),
        *(rec("sink_window-b0.5", s, v) for s, v in zip("abc", (0.0, 0.5, 0.0), strict=True)),
        *(rec("retrieval-b0.5", s, v) for s, v in zip("abc", (1.0, 0.5, 0.0), strict=True)),
        *(rec("retrieval-b0.25", s, 1.0) for s in "ab"),  # no sink_window at 0.25: nothing to pair with
        rec("sink_window-b0.5", "q1", 0.2, "extractive-qa"),
        rec("snapkv-b0.5", "q1", 0.6, "extractive-qa"),
    ]
    res = KVEvalResult("x", recs, {})
    rows = {r["condition"]: r for r in res.rows()}
    assert rows["retrieval-b0.5"]["vs_sink_window"] == pytest.approx(1 / 3)  # a: +1, b: 0, c: 0
    assert rows["retrieval-b0.5"]["vs_sink_window_n"] == 3
    assert rows["retrieval-b0.5"]["vs_sink_window_low"] <= 1 / 3 <= rows["retrieval-b0.5"]["vs_sink_window_high"]
    for cid in ("full", "sink_window-b0.5", "retrieval-b0.25"):
        assert np.isnan(rows[cid]["vs_sink_window"]) and rows[cid]["vs_sink_window_n"] == 0
    qa = {r["condition"]: r for r in res.rows("extractive-qa")}  # per task: the task's primary metric
    assert qa["snapkv-b0.5"]["vs_sink_window"] == pytest.approx(0.4) and qa["snapkv-b0.5"]["vs_sink_window_n"] == 1
    table = res.table()
    assert "Δanswer recall vs sink + window, paired [95% CI]" in table and "ΔF1 vs sink + window" in table
    line = next(x for x in table.splitlines() if x.startswith("| retrieval-b0.5 |"))
    assert line.split("|")[-2].startswith(" +0.33 [")
    summary = res.to_dict()
    assert summary["bootstrap"]["n_boot"] == 2000 and summary["bootstrap"]["seed"] == 0
    assert summary["tasks"]["extractive-qa"][1]["vs_sink_window"] == pytest.approx(0.4)


NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
)
SCORES = np.array([[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]])


def test_kv_eval_end_to_end_and_resume(tmp_path, haystack_file):
    from retrieval_heads.runs import read_records

    lm = tiny_model("llama", attn_implementation="sdpa")
    cfg = KVEvalConfig(
        budgets=(0.3,),
        policies=("sink_window", "needle_attention", "gain", "snapkv"),
        grid=Grid((150,), (20.0,), NEEDLES),
        rank_needles=NEEDLES,
        rank_depths=(50.0,),
        window=8,
        max_new_tokens=2,
        chat=False,
        haystack=str(haystack_file),
    )
    res = kv_eval(lm, SCORES, cfg, out=tmp_path / "run", show_progress=False)
    rows = {r["condition"]: r for r in res.rows()}
    assert set(rows) == {"full", "sink_window-b0.3", "needle_attention-b0.3", "gain-b0.3", "snapkv-b0.3"}
    assert rows["full"]["kv_share"] == pytest.approx(1.0)
    for cid, r in rows.items():
        if cid != "full":
            assert r["kv_share"] <= 0.3 + 0.02, (cid, r["kv_share"])  # positions cost a little
    assert all(r["peak_rss_mib"] for r in rows.values())
    n = len(read_records(tmp_path / "run" / "records.jsonl"))
    again = kv_eval(lm, SCORES, cfg, out=tmp_path / "run", show_progress=False)  # resumes: nothing new
    assert len(read_records(tmp_path / "run" / "records.jsonl")) == n
    assert again.table() == res.table() == KVEvalResult.load(tmp_path / "run").table()
    # Experiments never draw (the CLI does): the figure comes from the run folder alone.
    assert not (tmp_path / "run" / "kv_eval.png").exists()
    plot_kv_eval(KVEvalResult.load(tmp_path / "run"), tmp_path / "run" / "kv_eval")
    assert (tmp_path / "run" / "kv_eval.png").exists() and (tmp_path / "run" / "kv_eval.svg").exists()


def _scores_file(tmp_path, arr):
    p = tmp_path / "scores.json"
    write_scores(p, np.asarray(arr)[None])
    return p


@pytest.mark.parametrize(
    "args,match",
    [
        (["--budgets", "0.5,1.5"], "budgets must be shares of the full cache within (0, 1)"),
        (["--random-seeds", "0"], "at least one random seed"),
        (["--budgets", "a"], "--budgets must be a comma list"),
        (["--policies", "h2o"], "unknown policy 'h2o'"),
        (["--length", "50"], "length 50 must be within"),
    ],
)
def test_cli_bad_input(cli, tiny_llama_dir, haystack_file, tmp_path, args, match):
    code, _out, err = cli(
        "kv-eval",
        "--scores",
        _scores_file(tmp_path, SCORES),
        "--score",
        "copy",  # no warning that the file holds no needle_mass
        "--model",
        tiny_llama_dir,
        "--haystack",
        haystack_file,
        "--no-chat",
        "--out",
        tmp_path / "run",
        "--no-progress",
        *args,
    )
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and match in lines[0], err


def test_cli_missing_scores_and_shape(cli, tiny_llama_dir, haystack_file, tmp_path):
    code, _, err = cli("kv-eval", "--scores", tmp_path / "nope.json", "--model", tiny_llama_dir)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "not found" in err
    code, _, err = cli(
        "kv-eval",
        "--scores",
        _scores_file(tmp_path, np.ones((3, 4))),
        "--score",
        "copy",
        "--model",
        tiny_llama_dir,
        "--haystack",
        haystack_file,
        "--length",
        "200",
        "--no-progress",
        "--out",
        tmp_path / "r",
    )
    assert code != 0 and len(err.strip().splitlines()) == 1 and "shape (3, 4)" in err


def test_kv_eval_extractive_qa(tmp_path, haystack_file):
    """--qa N adds SQuAD examples: compressed context, question after it, F1 per policy, own table."""
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(SQUAD))
    lm = tiny_model("llama", attn_implementation="sdpa")
    cfg = KVEvalConfig(
        budgets=(0.5,),
        policies=("sink_window", "retrieval"),
        grid=Grid((150,), (20.0,), NEEDLES),
        window=8,
        max_new_tokens=2,
        chat=False,
        haystack=str(haystack_file),
        memory_probe=False,
        qa_examples=2,
        qa_data=str(data),
    )
    items = qa_prompts(lm, cfg)
    assert len(items) == 2
    for it in items:  # the context ends before the question, which follows it
        q = lm.tokenizer.decode(list(it.prompt_ids[it.context_len :]))  # tiny vocabulary: unknown words are <unk>
        assert "?" in q and len(it.prompt_ids) - it.context_len < 30 and it.context_len > 40
    res = kv_eval(lm, SCORES, cfg, out=tmp_path / "run", show_progress=False)
    assert res.tasks() == ["niah", "extractive-qa"]
    qa_rows = {r["condition"]: r for r in res.rows("extractive-qa")}
    assert set(qa_rows) == {"full", "sink_window-b0.5", "retrieval-b0.5"} and all(r["n"] == 2 for r in qa_rows.values())
    assert qa_rows["full"]["kv_share"] == pytest.approx(1.0) and qa_rows["retrieval-b0.5"]["kv_share"] <= 0.52
    recs = [r for r in res.records if r.get("task") == "extractive-qa"]
    assert all(0 <= r["f1"] <= 1 and r["prediction"] is not None for r in recs)
    assert "extractive QA" in res.table() and "needle retrieval" in res.table()
    assert KVEvalResult.load(tmp_path / "run").table() == res.table()
    plot_kv_eval(KVEvalResult.load(tmp_path / "run"), tmp_path / "run" / "kv_eval")
    assert (tmp_path / "run" / "kv_eval.png").exists()


def test_config_checks_its_choices_and_saves_the_grid_as_before():
    cfg = KVEvalConfig(grid=Grid((150,), (20.0,), NEEDLES), random_seeds=(0,))
    d = cfg.to_dict()
    keys = list(d)
    assert keys[:5] == ["budgets", "policies", "length", "depths", "needles"] and "grid" not in d
    assert d["length"] == 150 and d["depths"] == [20.0] and d["needles"] == [NEEDLES[0].to_dict()]
    assert d["rank_needles"][0] == cfg.rank_needles[0].to_dict() and d["random_seeds"] == [0]
    for bad, match in (
        ({"policies": ("h2o",)}, "unknown policy 'h2o'; choose from sink_window, retrieval"),
        ({"policies": ()}, "no policy"),
        ({"budgets": (1.0,)}, "within \\(0, 1\\)"),
        ({"grid": Grid((100, 200), (20.0,), NEEDLES)}, "one length"),
    ):
        with pytest.raises(ConfigError, match=match):
            KVEvalConfig(**{**cfg.__dict__, **bad})


def test_kv_ranking_defaults_to_needle_mass_when_the_source_holds_it():
    from retrieval_heads.results import DetectionResult

    other = SCORES[::-1].copy()
    plain = DetectionResult("plain", SCORES[None])
    result, note = kv_score(plain)
    assert result.score_name == "copy" and note is not None and "no needle_mass" in note
    rich = DetectionResult("rich", SCORES[None], extra={"needle_mass": other[None]})
    result, note = kv_score(rich)
    assert result.score_name == "needle_mass" and note is None
    np.testing.assert_allclose(result.scores, other)
    assert kv_score(rich, "copy")[0].score_name == "copy"


def test_kv_eval_headkv_takes_its_counts_from_the_retrieval_ranking(tmp_path, haystack_file):
    import math

    assert "headkv" not in KVEvalConfig().policies  # asked for by name: the default runs stay as they were
    lm = tiny_model("llama", attn_implementation="sdpa")
    cfg = KVEvalConfig(
        budgets=(0.3,),
        policies=("sink_window", "headkv"),
        grid=Grid((150,), (20.0,), NEEDLES),
        window=8,
        max_new_tokens=2,
        chat=False,
        haystack=str(haystack_file),
        memory_probe=False,
    )
    res = kv_eval(lm, SCORES, cfg, out=tmp_path / "run", show_progress=False)
    rows = {r["condition"]: r for r in res.rows()}
    assert set(rows) == {"full", "sink_window-b0.3", "headkv-b0.3"}
    assert 0.28 <= rows["headkv-b0.3"]["kv_share"] <= 0.3 + 0.02  # positions cost a little
    cond = next(c for c in res.config["conditions"] if c["id"] == "headkv-b0.3")
    c = next(r["context_tokens"] for r in res.records if r.get("condition") == "headkv-b0.3")
    assert cond["policy"] == "headkv" and cond["tokens"] == math.floor(0.3 * 4 * c + 1e-9)
    assert cond["head_tokens"][1] > cond["head_tokens"][0]  # KV heads of different scores, different counts


def test_every_policy_has_a_line_style_and_a_label_in_the_figure():
    from retrieval_heads.experiments.kv_eval import POLICIES
    from retrieval_heads.plots.kv import LABELS, STYLE

    assert set(STYLE) == set(LABELS) == set(POLICIES)  # a policy without a style would be left out of the figure
