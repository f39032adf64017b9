"""benchmarks/kv_peers.py on a tiny random Llama: RULER samples with their question-agnostic and
question-aware split points, per-sample records that resume where a child stopped, the table's
paired comparison of our best method with the best kvpress press (a win and a loss), and a press
that fails recorded rather than raised. Tests that need kvpress skip without it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval_heads.results import DetectionResult
from retrieval_heads.testing import tiny_tokenizer

from .test_ruler import essay_text, squad_fixture
from .test_tasks import SCORES

BENCH = Path(__file__).parents[2] / "benchmarks"
TOK = tiny_tokenizer()


@pytest.fixture(scope="module")
def kv_peers():
    spec = importlib.util.spec_from_file_location("kv_peers", BENCH / "kv_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv-peers-data")
    (d / "essays.json").write_text(json.dumps({"text": essay_text()}))
    (d / "squad.json").write_text(json.dumps(squad_fixture()))
    DetectionResult("tiny", SCORES[None]).save(d / "det")
    return d


def prepare(kv_peers, out: Path, data: Path, tasks: list[str], samples: int = 2) -> list[dict]:
    argv = ["prepare", "--out", str(out), "--model", "tiny-llama", "--length", "200", "--samples", str(samples)]
    argv += [x for t in tasks for x in ("--task", t)]
    for t in tasks:
        path = {"ruler_qa": data / "squad.json", "ruler_vt": None}.get(t, data / "essays.json")
        argv += ["--task-arg", f"{t}:max_new_tokens=3"] + (["--task-arg", f"{t}:path={path}"] if path else [])
    kv_peers.main(argv)
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def child(kv_peers, out: Path, data: Path, methods: str, ratio: float = 0.5, mode: str = "agnostic") -> None:
    argv = ["child", "--out", str(out), "--model", "tiny-llama", "--method", methods, "--ratio", str(ratio)]
    kv_peers.main([*argv, "--mode", mode, "--scores", str(data / "det"), "--press-score", "copy"])


def summary(out: Path, method: str, ratio: float = 0.5, mode: str = "agnostic") -> dict:
    return json.loads((out / "results" / f"{method.replace(':', '-')}-r{ratio:g}-{mode}.json").read_text())


def sublist(part: list[int], whole: list[int]) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


# ----------------------------------------------------------------------------------- samples
def test_split_points_put_the_question_between_the_two_splits(kv_peers):
    context = "the secret of the stew is smoked tamarind ."
    question = "what is the secret ingredient ?"
    ids, c, aware = kv_peers.split_points(TOK, f"<s>{context}\n{question}\n answer :", context, question)
    assert TOK.decode(ids[:c]) == f"<s> {context}"
    assert TOK.decode(ids[c:aware]) == question and TOK.decode(ids[aware:]) == "answer :"
    with pytest.raises(SystemExit, match="cannot find"):
        kv_peers.split_points(TOK, f"{question}\n{context}", context, question)  # the question comes first


def test_ruler_samples_split_before_and_after_the_question(kv_peers, data, tmp_path):
    """Agnostic: the context ends before the question (its tokens all follow the split); aware:
    the split right after the question, the answer prefix after it; each task's own answers."""
    tasks = ["ruler_niah_single", "ruler_niah_multikey", "ruler_vt", "ruler_qa"]
    rows = prepare(kv_peers, tmp_path / "run", data, tasks)
    assert [r["task"] for r in rows] == [t for t in tasks for _ in range(2)]
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        ids, c, aware = r["prompt_ids"], r["context_len"], r["aware_len"]
        q = TOK(r["question"], add_special_tokens=False)["input_ids"]
        assert 0 < c <= aware - len(q) and ids[aware - len(q) : aware] == q, r["id"]
        assert r["max_new_tokens"] == 3 and r["answers"]
        if r["task"] != "ruler_vt":  # VT's worked example before the context asks the same words
            assert not sublist(q, ids[:c])
        prefix = TOK.decode(ids[aware:])  # the answer prefix: "... is" (one value), " Answer:", "... they are:"
        assert prefix.endswith({"ruler_qa": ":", "ruler_vt": "they are :"}.get(r["task"], " is")), r["id"]
    assert all(len(r["answers"]) == 5 for r in rows if r["task"] == "ruler_vt")  # 4 hops: 5 variables


def test_ruler_records_carry_the_tasks_own_score(kv_peers, data, tmp_path):
    out = tmp_path / "run"
    prepare(kv_peers, out, data, ["ruler_qa"])
    row = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    child_mod = sys.modules["kv_peers_child"]
    hit = child_mod.score_fields(row, f" It is {row['answers'][0].upper()}.\n")
    assert hit["string_match_part"] == hit["score"] == 1.0
    assert child_mod.score_fields(row, "no idea")["score"] == 0.0


def test_a_run_folder_refuses_other_tasks(kv_peers, data, tmp_path):
    out = tmp_path / "run"
    prepare(kv_peers, out, data, ["ruler_qa"])
    with pytest.raises(SystemExit, match="holds samples of ruler_qa"):
        kv_peers.main(["run", "--out", str(out), "--model", "tiny-llama", "--task", "ruler_vt", "--methods", "x"])
    with pytest.raises(SystemExit, match="unknown task"):
        kv_peers.main(["prepare", "--out", str(tmp_path / "other"), "--model", "tiny-llama", "--task", "gsm9k"])


# ----------------------------------------------------------------------------------- records
STABLE = ("sample_id", "task", "context_tokens", "score", "string_match_all", "text", "kv_bytes", "kv_share")


def test_a_rerun_computes_only_the_missing_sample(kv_peers, data, tmp_path, monkeypatch):
    """Two samples, two methods; one method's last record cut mid-line: the rerun answers that
    sample for that method only, and every record equals a fresh run's (timings aside)."""
    methods = "cache:full,cache:sink_window"
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    for out in (fresh, resumed):
        prepare(kv_peers, out, data, ["ruler_niah_single"])
        child(kv_peers, out, data, methods)
    path = resumed / "records" / "cache-sink_window-r0.5-agnostic.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 2
    path.write_text(lines[0] + lines[1][:20])  # a child killed while writing its last record
    for f in (resumed / "results").iterdir():
        f.unlink()
    mod, calls = sys.modules["kv_peers_child"], []
    real = mod.cache_answers

    def counting(lm, policies, row, c, timing):
        calls.append((row["id"], sorted(policies)))
        return real(lm, policies, row, c, timing)

    monkeypatch.setattr(mod, "cache_answers", counting)
    child(kv_peers, resumed, data, methods)
    assert calls == [("ruler_niah_single/s0-1", ["sink_window"])]
    assert path.read_text().startswith(lines[0]) and len(path.read_text().splitlines()) == 2
    stable = [{k: r[k] for k in STABLE} for r in summary(fresh, "cache:full")["records"]]
    for m in methods.split(","):
        a, b = summary(fresh, m), summary(resumed, m)
        assert [{k: r[k] for k in STABLE} for r in a["records"]] == [{k: r[k] for k in STABLE} for r in b["records"]]
        assert (a["n"], a["score"], a["kv_mib"]) == (b["n"], b["score"], b["kv_mib"])
        assert all(r["prefill_s"] > 0 and r["decode_s_per_token"] > 0 for r in b["records"])
    for f in (resumed / "results").iterdir():
        f.unlink()
    monkeypatch.setattr(mod, "load_lm", lambda model: pytest.fail("loaded a model with nothing to do"))
    child(kv_peers, resumed, data, methods)  # all finished: the summaries again, from the records
    again = summary(resumed, "cache:full")
    assert [{k: r[k] for k in STABLE} for r in again["records"]] == stable


def test_a_press_that_cannot_be_built_is_recorded_as_failed(kv_peers, data, tmp_path):
    out = tmp_path / "run"
    prepare(kv_peers, out, data, ["ruler_niah_single"])
    child(kv_peers, out, data, "press:no_such_press")  # without kvpress: its import fails, the same way
    s = summary(out, "press:no_such_press")
    assert s["failed"] and s["n"] == 0 and s["n_failed"] == 2
    assert all(r["failed"] == s["failed"] for r in s["records"])


def test_a_press_failing_on_a_sample_is_recorded_not_raised(kv_peers):
    kvp = pytest.importorskip("kvpress")
    from retrieval_heads.testing import tiny_model

    lm = tiny_model("llama", attn_implementation="sdpa")
    bad = kvp.KnormPress(compression_ratio=0.5)
    object.__setattr__(bad, "compress", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom\nmore")))
    ids = TOK("the secret of the stew is smoked tamarind . what is the secret ?")["input_ids"]
    failures, timing = {}, {}
    presses = {"streaming": kvp.StreamingLLMPress(compression_ratio=0.5), "bad": bad}
    out = kv_peers.press_answers(lm, presses, ids, len(ids) - 6, 3, timing, failures)
    assert failures == {"bad": "RuntimeError: boom"} and set(out) == {"streaming"} and set(timing) == {"streaming"}
    with pytest.raises(RuntimeError, match="boom"):
        kv_peers.press_answers(lm, {"bad": bad}, ids, len(ids) - 6, 3)


# ----------------------------------------------------------------------------------- table
def result(method: str, ratio: float, scores: list[float], tasks: list[str]) -> dict:
    recs = [
        {"sample_id": f"{t}/{i}", "task": t, "score": s} for i, (s, t) in enumerate(zip(scores, tasks, strict=True))
    ]
    return {"method": method, "ratio": ratio, "mode": "agnostic", "n": len(recs), "records": recs, "kv_mib": 1.0}


def test_table_says_where_ours_wins_and_where_it_loses(kv_peers, tmp_path):
    """Ratio 0.25: ours right on most samples, every press wrong: a win; ratio 0.5: the reverse, a
    loss; every method has its row, a failed press is listed; pooled over the two tasks."""
    rng = np.random.default_rng(0)
    tasks = ["ruler_qa", "ruler_vt"] * 15
    high = list((rng.random(30) < 0.9).astype(float))
    low = list((rng.random(30) < 0.1).astype(float))
    res = [
        result("cache:full", 0.25, high, tasks),
        result("cache:copy", 0.25, high, tasks),
        result("press:snapkv", 0.25, low, tasks),
        result("press:knorm", 0.25, [0.0] * 30, tasks),
        result("cache:copy", 0.5, low, tasks),
        result("press:snapkv", 0.5, high, tasks),
        result("press:knorm", 0.5, low, tasks),
        result("cache:sink_window", 0.5, [0.0] * 30, tasks),
        {**result("press:tova", 0.5, [], []), "failed": "RuntimeError: boom", "n": 0},
    ]
    (tmp_path / "results").mkdir()
    for r in res:
        name = f"{r['method'].replace(':', '-')}-r{r['ratio']:g}-agnostic.json"
        (tmp_path / "results" / name).write_text(json.dumps(r))
    meta = {"created": "2026-12-03 12:00 UTC", "machine": "test", "model": "tiny-llama", "length": 200}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    text = kv_peers.table(tmp_path)
    assert (tmp_path / "table.md").read_text() == text
    assert (tmp_path / "plot.png").stat().st_size > 0
    for task in ("ruler_qa", "ruler_vt", "all tasks pooled"):
        assert f"**question-agnostic, {task}**" in text
    pooled = text[text.index("all tasks pooled") :]
    win = next(x for x in pooled.splitlines() if x.startswith("| 0.25 | cache:copy"))
    loss = next(x for x in pooled.splitlines() if x.startswith("| 0.5 | cache:copy"))
    assert "press:snapkv" in win and win.endswith("| 30 | ours wins |")
    assert "press:snapkv" in loss and loss.endswith("| 30 | ours loses |")
    for m in ("cache:copy", "press:snapkv", "press:knorm", "press:tova", "cache:sink_window"):
        assert f"| {m} |" in pooled
    assert "| press:tova | kvpress | - | failed |" in pooled
    assert "- press:tova at ratio 0.5 failed: RuntimeError: boom" in text
    assert kv_peers.table(tmp_path) == text  # from the results alone: the same table again


def test_table_of_an_empty_folder_is_one_clear_error(kv_peers, tmp_path):
    with pytest.raises(SystemExit, match="not a kv_peers run folder"):
        kv_peers.table(tmp_path)
