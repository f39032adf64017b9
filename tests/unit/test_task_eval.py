"""task-eval end to end on tiny models: conditions, paired statistics, resume, bad input via the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from retrieval_heads.detection import Grid
from retrieval_heads.errors import ConfigError
from retrieval_heads.experiments import conditions, masked_task
from retrieval_heads.experiments.task_eval import TaskEvalConfig, TaskEvalResult, bootstrap_ci, task_eval
from retrieval_heads.scorefile import write_scores
from retrieval_heads.testing import tiny_model

from .test_tasks import SCORES, SQUAD


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "squad.json").write_text(json.dumps(SQUAD))
    return d


def _qa(data, **overrides):
    """A task-eval config of extractive QA on the two-question SQuAD file: none, top 2, one random."""
    base = {
        "task": "extractive-qa",
        "ks": (0, 2),
        "random_seeds": (0,),
        "limit": 2,
        "task_args": {"path": str(data / "squad.json"), "context_tokens": 100},
        "chat": False,
    }
    return TaskEvalConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci():
    m, lo, hi = bootstrap_ci([1.0] * 10)
    assert (m, lo, hi) == (1.0, 1.0, 1.0)
    x = [0, 1] * 25
    m, lo, hi = bootstrap_ci(x, seed=0)
    assert m == 0.5 and 0.3 < lo < 0.5 < hi < 0.7
    assert bootstrap_ci(x, seed=0) == (m, lo, hi)  # reproducible from the recorded seed
    assert np.isnan(bootstrap_ci([])[0]) and bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)


def test_paired_difference_pairs_by_example():
    from retrieval_heads.experiments.stats import fmt_interval, named, paired_difference

    a, b = {"x": 1.0, "y": 0.0, "z": 1.0}, {"x": 0.0, "y": 0.0, "w": 5.0}  # pairs: x and y only
    d = paired_difference(a, b, seed=0)
    assert d["n"] == 2 and d["mean"] == 0.5 and 0.0 <= d["low"] <= 0.5 <= d["high"] <= 1.0
    assert paired_difference(a, b, seed=0) == d  # reproducible from the recorded seed
    assert np.isnan(paired_difference(a, {}, seed=0)["mean"]) and paired_difference(a, {}, seed=0)["n"] == 0
    assert named(d, "vs_x") == {"vs_x": 0.5, "vs_x_low": d["low"], "vs_x_high": d["high"], "vs_x_n": 2}
    assert fmt_interval({"mean": 0.5, "low": -0.25, "high": 1.0}, scale=100) == "+50.0 [-25.0, +100.0]"
    assert fmt_interval(named(d, "vs_x"), "vs_x") == fmt_interval(d) and fmt_interval(None) == "-"


def test_top_minus_random_is_paired_by_doc_and_the_pool_is_named():
    conds = conditions.build_conditions(SCORES, (0, 2), (0, 1))
    acc = {  # per condition, per doc; seed 1 did not finish d2: its random value is seed 0's
        "base": {"d1": 1, "d2": 1, "d3": 1},
        "top-k2": {"d1": 0, "d2": 1, "d3": 0},
        "random-k2-s0": {"d1": 1, "d2": 0, "d3": 1},
        "random-k2-s1": {"d1": 0, "d3": 1},
    }
    recs = [
        {"condition": c, "doc_id": d, "scores": {"acc": float(v)}, "answers": ["a"], "generated_text": "a"}
        for c, per in acc.items()
        for d, v in per.items()
    ]
    config = {
        "model": "x",
        "task": {"name": "t"},
        "style": "answer-only",
        "metrics": ["acc"],
        "random_pool": "non-retrieval",
    }
    config["conditions"] = [c.to_dict() for c in conds]
    res = TaskEvalResult.from_run(config, recs)
    top = next(r for r in res.rows() if r["kind"] == "top")
    # top - mean(random seeds): d1 0 - 0.5, d2 1 - 0, d3 0 - 1
    assert top["acc"]["minus_random"] == pytest.approx((-0.5 + 1 - 1) / 3) and top["acc"]["minus_random_n"] == 3
    assert top["acc"]["minus_random_low"] <= top["acc"]["minus_random"] <= top["acc"]["minus_random_high"]
    assert all("minus_random" not in r["acc"] for r in res.rows() if r["kind"] != "top")
    table = res.table()
    assert table.splitlines()[0] == (
        "random heads drawn from: heads with score <= 0.1 outside the top K (pool 'non-retrieval')"
    )
    assert "Δacc top minus random, paired [95% CI]" in table
    top_line = next(line for line in table.splitlines() if line.startswith("| top-2 retrieval heads"))
    assert top_line.split("|")[-2].startswith(" -16.7 [") and top_line.count("|") == 6  # the last column
    assert res.to_dict()["random_pool"] == "non-retrieval"
    # a run saved before `random_pool` existed: the old pool, every head outside the top K
    del config["random_pool"]
    old = TaskEvalResult.from_run(config, recs)
    assert old.to_dict()["random_pool"] == "outside-top" and "every head outside the top K" in old.table()


# ----------------------------------------------------------------------------------- end to end
def test_task_eval_end_to_end_and_resume(lm, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _qa(data, style="answer-only")
    res = task_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert len(res.records) == 3 * 2  # (none, top, random) x docs
    for name in ("config.json", "records.jsonl", "summary.json", "table.md"):  # the CLI draws task_eval.png/.svg
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["name"] == "extractive-qa" and config["random_seeds"] == [0]
    top = next(c for c in config["conditions"] if c["kind"] == "top")
    assert sorted(map(tuple, top["heads"])) == [(0, 0), (1, 1)]
    for r in res.records:
        assert set(r["scores"]) == {"f1", "exact"} and r["prediction"] is not None
    rows = {r["condition"]: r for r in res.rows()}
    assert set(rows) == {"none", "top-k2", "random", "random-k2-s0"}
    assert rows["none"]["f1"]["delta"] == 0.0
    table = res.table()
    assert "top-2 retrieval heads" in table and "random 2 heads (mean of 1 seeds)" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bootstrap"]["seed"] == 0 and summary["bootstrap"]["n_boot"] == 2000
    assert summary["random_pool"] == config["random_pool"] == "non-retrieval"
    top_row = next(r for r in summary["rows"] if r["kind"] == "top")
    assert top_row["f1"]["minus_random_n"] == 2 and "minus_random_low" in top_row["f1"]

    # resume: nothing is generated again, and the result is identical
    def boom(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(masked_task, "generate", boom)
    again = task_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert again.records == res.records and again.table() == table
    loaded = TaskEvalResult.load(out)
    assert loaded.table() == table

    # a stopped run resumes where it stopped
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # torn last line
    monkeypatch.undo()
    resumed = task_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert [r["generated_text"] for r in resumed.records] == [r["generated_text"] for r in res.records]


def test_each_condition_masks_its_heads(lm, monkeypatch):
    seen = []
    real = masked_task.mask_heads

    def recorder(model, heads, method, **kw):
        seen.append((tuple(sorted(heads)), method, kw["phase"]))
        return real(model, heads, method, **kw)

    def rows_recorder(model, rows, method, **kw):
        seen.extend((tuple(sorted(heads)), method, kw["phase"]) for heads in rows)
        return real_rows(model, rows, method, **kw)

    real_rows = masked_task.mask_rows
    monkeypatch.setattr(masked_task, "mask_heads", recorder)
    monkeypatch.setattr(masked_task, "mask_rows", rows_recorder)
    cfg = TaskEvalConfig(
        task="arith-chain",
        style="answer-only",
        ks=(0, 2),
        random_seeds=(3,),
        limit=1,
        chat=False,
        method="zero",
        phase="decode",
        batch_size=1,
    )
    res = task_eval(lm, SCORES, cfg, show_progress=False)
    conds = {c.id: c for c in res.conditions}
    assert [s[0] for s in seen] == [(), ((0, 0), (1, 1)), conds["random-k2-s3"].heads]
    seen.clear()  # the same conditions as the rows of one batch
    assert task_eval(lm, SCORES, replace(cfg, batch_size=None), show_progress=False).conditions == res.conditions
    assert [s[0] for s in seen] == [(), ((0, 0), (1, 1)), conds["random-k2-s3"].heads]
    assert not set(conds["random-k2-s3"].heads) & {(0, 0), (1, 1)}  # random heads outside the top set
    assert {s[1:] for s in seen} == {("zero", "decode")}
    assert "random" not in {
        r["condition"]
        for r in task_eval(
            lm, SCORES, TaskEvalConfig(task="arith-chain", ks=(0, 1), random_seeds=(), limit=1), show_progress=False
        ).rows()
    }


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"style": "few-shot"}, "unknown prompt style 'few-shot'; choose from answer-only, cot"),
        ({"ks": ()}, "no K values"),
        ({"limit": 0}, "limit must"),
        ({"method": "blur"}, "unknown masking method 'blur'; choose from uniform, zero, mean"),
        ({"phase": "prefill"}, "unknown mask phase 'prefill'; choose from all, decode"),
        ({"random_pool": "all"}, "unknown random pool 'all'; choose from non-retrieval, outside-top"),
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"grid": Grid(lengths=(100,), depths=(50.0,))}, "grid applies to the niah task only"),
        ({"task": "niah", "style": "cot"}, "task 'niah' has no prompt style 'cot'"),
        ({"task_args": {"steps": 99}}, "steps must be within 1..10"),
    ],
)
def test_bad_config_is_one_line_before_any_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        TaskEvalConfig(**{**TaskEvalConfig(task="arith-chain", ks=(0, 2), limit=1).__dict__, **overrides})


@pytest.mark.parametrize(
    "overrides,match",
    [({"ks": (0, -1)}, ">= 0"), ({"ks": (0, 5)}, "cannot draw 5")],
)
def test_bad_run(lm, overrides, match):
    cfg = TaskEvalConfig(**{**TaskEvalConfig(task="niah", ks=(0, 2), limit=1).__dict__, **overrides})
    with pytest.raises(ConfigError, match=match):
        task_eval(lm, SCORES, cfg, show_progress=False)
    with pytest.raises(ConfigError, match="shape"):
        task_eval(lm, np.zeros((3, 3)), TaskEvalConfig(task="arith-chain", ks=(0, 1), limit=1), show_progress=False)


# ----------------------------------------------------------------------------------- CLI
def _scores(tmp_path, arr=SCORES):
    p = tmp_path / "scores.json"
    write_scores(p, np.asarray(arr)[None])
    return p


@pytest.mark.parametrize(
    "args,match",
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "arith-chain", "--prompt", "fewshot"], "unknown prompt style"),
        (["--task", "arith-chain", "--mask-k", "0"], "--mask-k must be >= 1"),
        (["--task", "arith-chain", "--random-seeds", "-1"], "--random-seeds must be >= 0"),
        (["--task", "arith-chain", "--limit", "0"], "limit must be >= 1"),
        (["--task", "arith-chain", "--data", "x.json"], "task 'arith-chain' takes steps="),
        (["--task", "arith-chain", "--task-arg", "steps=many"], "--task-arg steps: 'many' is not an integer"),
        (["--task", "arith-chain", "--task-arg", "stepz=2"], "task 'arith-chain' takes steps="),
        (["--task", "gsm8k", "--data", "/no/such/file.jsonl"], "does not exist"),
        (["--task", "arith-chain", "--method", "blur"], "unknown masking method"),
        (["--task", "arith-chain", "--random-pool", "all"], "unknown random pool 'all'"),
        (["--task", "arith-chain", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_cli_bad_input(cli, tiny_llama_dir, tmp_path, args, match):
    code, _out, err = cli("task-eval", "--scores", _scores(tmp_path), "--model", tiny_llama_dir, *args)
    assert code == 2 and match in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_runs_and_plots(cli, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    args = (
        "task-eval",
        "--task",
        "arith-chain",
        "--scores",
        _scores(tmp_path),
        "--model",
        tiny_llama_dir,
        "--k",
        "1",
        "--random-seeds",
        "1",
        "--limit",
        "2",
        "--prompt",
        "answer-only",
        "--no-chat",
        "--out",
        out,
        "--no-progress",
    )
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert "| no mask | 2 |" in stdout and "top-1 retrieval heads" in stdout and "run folder" in stdout
    assert (out / "null_distribution.png").read_bytes().startswith(b"\x89PNG") and "null distribution" in stdout
    code2, stdout2, _ = cli(*args)  # resumes: same table
    assert code2 == 0 and stdout2 == stdout
    code, stdout, err = cli("task-plot", out, out, "--out", tmp_path / "fig")
    assert code == 0 and (tmp_path / "fig.png").exists()
    code, _, err = cli("task-plot", tmp_path, "--out", tmp_path / "fig2")
    assert code == 2 and "not a task-eval run folder" in err


@pytest.mark.parametrize(
    "args,want",
    [
        ([], {"device": "auto", "dtype": "auto", "device_map": None, "trust_remote_code": False, "threads": None}),
        (
            ["--device", "cpu", "--dtype", "bfloat16", "--device-map", "auto", "--trust-remote-code", "--threads", "1"],
            {"device": "cpu", "dtype": "bfloat16", "device_map": "auto", "trust_remote_code": True, "threads": 1},
        ),
    ],
)
def test_cli_loads_the_model_with_the_shared_options(cli, tmp_path, monkeypatch, args, want):
    import retrieval_heads.cli.options as command  # open_scored_model loads through it

    seen = {}

    def fake_open(name, **kw):
        seen.update(kw, name=name)
        raise ConfigError("stop here")

    monkeypatch.setattr(command, "open_model", fake_open)
    code, _, err = cli("task-eval", "--task", "arith-chain", "--scores", _scores(tmp_path), "--model", "m", *args)
    assert code == 2 and "stop here" in err
    assert seen == {"name": "m", "attn_implementation": "sdpa", **want}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding-window layers in the shared prefill
def test_decode_phase_shares_one_prefill_per_prompt_with_the_same_answers(data, monkeypatch, arch):
    """Under phase "decode" the prefill is unmasked, so one per prompt serves every condition:
    the answers, scores and watched argmaxes equal a prefill per condition, with fewer prefills."""
    model = tiny_model(arch, attn_implementation="sdpa", seed=2)  # a seed whose conditions answer differently
    scores = SCORES if arch == "llama" else np.arange(12.0).reshape(3, 4) / 12
    cfg = _qa(data, random_seeds=(0, 1), phase="decode", method="zero")
    prefills = []
    real_prefill = masked_task.prefill_prefix
    monkeypatch.setattr(masked_task, "prefill_prefix", lambda m, ids: prefills.append(1) or real_prefill(m, ids))
    shared = task_eval(model, scores, cfg, show_progress=False)
    assert len(prefills) == 2  # one per document, for 4 conditions
    real_run = masked_task.run_masked
    monkeypatch.setattr(masked_task, "run_masked", lambda *a, **k: real_run(*a, **k, share_prefill=False))
    monkeypatch.setattr("retrieval_heads.experiments.task_eval.run_masked", masked_task.run_masked)
    alone = task_eval(model, scores, cfg, show_progress=False)
    assert len(prefills) == 2  # the per-condition path prefills inside generate

    def key(r):
        return {k: v for k, v in r.items() if k != "seconds"}

    assert sorted(map(key, shared.records), key=lambda r: r["id"]) == sorted(
        map(key, alone.records), key=lambda r: r["id"]
    )
    assert shared.table() == alone.table()
    assert len({r["generated_text"] for r in shared.records}) > 1  # the conditions answer differently


def test_mean_ablation_on_a_task_uses_the_haystack_means(lm, data, monkeypatch):
    """method "mean" on a task other than niah: each masked head's output becomes its mean over the
    first 512 tokens of the default haystack (recorded in the config), not zero."""
    import torch

    from retrieval_heads import masking
    from retrieval_heads.experiments import task_eval as te
    from retrieval_heads.needles import load_haystack

    seen = {}
    real_means = te.head_means

    def spy(model, ids):
        seen["ids"] = ids
        return real_means(model, ids)

    monkeypatch.setattr(te, "head_means", spy)
    edits = []
    real_edit = masking._edit_heads
    monkeypatch.setattr(masking, "_edit_heads", lambda *a: edits.append(a[-1]) or real_edit(*a))
    cfg = _qa(data, limit=1, method="mean")
    res = task_eval(lm, SCORES, cfg, show_progress=False)
    want = lm.tokenizer(load_haystack(None)[:20000], add_special_tokens=False)["input_ids"][:512]
    assert seen["ids"].tolist() == [want]
    assert res.config["mean_reference"] == f"first {len(want)} tokens of the default haystack essays"
    assert edits and all(v is not None for v in edits)  # mean values replace the heads, never zeros
    means = real_means(lm.model, torch.tensor([want]))
    assert any(torch.equal(v, means[l]) for v in edits for l in range(means.shape[0]))


@pytest.mark.parametrize("method", ["uniform", "zero", "mean"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_batched_conditions_give_the_records_of_one_at_a_time(data, monkeypatch, arch, method):
    """phase "decode": the conditions of a prompt decode as rows of one batch (default), in batches
    of 3, or one after the other (batch_size=1): the same records, the batch size recorded."""
    from retrieval_heads import decoding

    model = tiny_model(arch, attn_implementation="eager", seed=2)
    scores = SCORES if arch == "llama" else np.arange(12.0).reshape(3, 4) / 12
    widths = []
    real_rows = decoding.greedy_rows
    monkeypatch.setattr(masked_task, "greedy_rows", lambda *a, **k: widths.append(k["rows"]) or real_rows(*a, **k))
    runs = {
        b: task_eval(
            model,
            scores,
            _qa(data, random_seeds=(0, 1, 2), phase="decode", method=method, batch_size=b),
            show_progress=False,
        )
        for b in (None, 3, 1)
    }
    assert widths == [5, 5, 3, 2, 3, 2]  # 5 conditions x 2 documents; batch size 1 never batches
    assert [runs[b].config["batch_size"] for b in (None, 3, 1)] == [5, 3, 1]

    def key(r):
        return {k: v for k, v in r.items() if k != "seconds"}

    for b in (None, 3):
        assert list(map(key, runs[b].records)) == list(map(key, runs[1].records))
    assert len({r["generated_text"] for r in runs[1].records}) > 1  # the conditions answer differently
