"""Scale-out: shards, torchrun with 2 gloo ranks, merge of separate jobs, resume of a killed shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retrieval_heads.detection import DetectConfig, Grid, detect
from retrieval_heads.distributed import Shard, merge_runs
from retrieval_heads.errors import ConfigError, RunConflictError
from retrieval_heads.needles import Needle
from retrieval_heads.runs import read_records
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
    Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
)
GRID = Grid(lengths=(80, 160), depths=(0.0, 50.0, 100.0), needles=NEEDLES)


def _cfg(haystack_file, engine="reference"):
    return DetectConfig(engine=engine, max_new_tokens=5, recall_threshold=-1.0, chat=False, haystack=str(haystack_file))


def test_shard_parse_and_take():
    assert Shard.parse("1/3").take(list(range(8))) == [1, 4, 7]
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ConfigError):
            Shard.parse(bad)


def test_shards_merge_to_single_process_result(tmp_path, haystack_file, cli):
    lm = tiny_model("llama")
    cfg = _cfg(haystack_file)
    detect(lm, GRID, cfg, out=tmp_path / "single", show_progress=False)
    # shards finish in any order: run shard 2 first
    for i in (2, 0, 1):
        detect(lm, GRID, cfg, out=tmp_path / f"s{i}", show_progress=False, shard=Shard(i, 3))
    code, _out, err = cli("merge", tmp_path / "s1", tmp_path / "s2", tmp_path / "s0", "--out", tmp_path / "merged")
    assert code == 0, err
    for name in ("retrieval_scores.json", "summary.json"):
        assert (tmp_path / "merged" / name).read_text() == (tmp_path / "single" / name).read_text()
    assert [r["id"] for r in read_records(tmp_path / "merged" / "records.jsonl")] == [
        r["id"] for r in read_records(tmp_path / "single" / "records.jsonl")
    ]
    # an incompatible run is refused with one line
    other = Grid(lengths=(80,), depths=(0.0,), needles=NEEDLES)
    detect(lm, other, cfg, out=tmp_path / "other", show_progress=False)
    code, _out, err = cli("merge", tmp_path / "s0", tmp_path / "other", "--out", tmp_path / "bad")
    assert code != 0 and "incompatible config" in err and err.count("\n") == 1


def test_killed_shard_resumes_without_loss_or_duplicates(tmp_path, haystack_file, monkeypatch):
    lm = tiny_model("llama")
    cfg = _cfg(haystack_file)
    single = detect(lm, GRID, cfg, show_progress=False)
    from retrieval_heads.engines.reference import ReferenceEngine

    real = ReferenceEngine.run
    n = {"calls": 0}

    def dying(self, *a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt  # the job is killed during its third sample
        return real(self, *a, **k)

    monkeypatch.setattr(ReferenceEngine, "run", dying)
    with pytest.raises(KeyboardInterrupt):
        detect(lm, GRID, cfg, out=tmp_path / "s0", show_progress=False, shard=Shard(0, 2))
    monkeypatch.setattr(ReferenceEngine, "run", real)
    assert len(read_records(tmp_path / "s0" / "records.jsonl")) == 2
    detect(lm, GRID, cfg, out=tmp_path / "s0", show_progress=False, shard=Shard(0, 2))
    detect(lm, GRID, cfg, out=tmp_path / "s1", show_progress=False, shard=Shard(1, 2))
    merged = merge_runs([tmp_path / "s0", tmp_path / "s1"])
    ids = [r["id"] for r in merged.records]
    assert len(ids) == len(GRID) == len(set(ids))
    np.testing.assert_array_equal(merged.per_sample, single.per_sample)
    # a shard folder refuses a rerun as another shard
    with pytest.raises(RunConflictError):
        detect(lm, GRID, cfg, out=tmp_path / "s0", show_progress=False, shard=Shard(1, 2))


SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from retrieval_heads.detection import DetectConfig, Grid, detect
    from retrieval_heads.needles import Needle
    from retrieval_heads.testing import tiny_model
    needles = (
        Needle(
            "the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"
        ),
        Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
    )
    grid = Grid(lengths=(80, 160), depths=(0.0, 50.0, 100.0), needles=needles)
    cfg = DetectConfig(engine="reference", max_new_tokens=5, recall_threshold=-1.0, chat=False, haystack=sys.argv[2])
    detect(tiny_model("llama"), grid, cfg, out=sys.argv[1], show_progress=False)
""")


def test_torchrun_two_gloo_ranks_equal_single_process(tmp_path, haystack_file):
    lm = tiny_model("llama")
    detect(lm, GRID, _cfg(haystack_file), out=tmp_path / "single", show_progress=False)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29533",
            str(script),
            str(tmp_path / "dist"),
            str(haystack_file),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "dist").iterdir() if p.is_dir()) == ["rank-0", "rank-1", "scores"]
    assert (tmp_path / "dist" / "retrieval_scores.json").read_text() == (
        tmp_path / "single" / "retrieval_scores.json"
    ).read_text()
    assert json.loads((tmp_path / "dist" / "summary.json").read_text()) == json.loads(
        (tmp_path / "single" / "summary.json").read_text()
    )


def test_batched_run_equals_batch_one_and_resumes_across_batch_sizes(tmp_path, haystack_file):
    """`batch_size` is not semantic: a batched run writes the same scores, and a run started at
    batch 1 resumes at batch 3 (the GPU path) without a config conflict."""
    from dataclasses import replace

    lm = tiny_model("llama", attn_implementation="sdpa")
    base = _cfg(haystack_file, engine="fast")
    one = detect(lm, GRID, replace(base, batch_size=1), out=tmp_path / "one", show_progress=False)
    three = detect(lm, GRID, replace(base, batch_size=3), out=tmp_path / "three", show_progress=False)
    np.testing.assert_array_equal(one.scores, three.scores)
    assert json.loads((tmp_path / "three" / "config.json").read_text())["batch_size"] == 3
    records = tmp_path / "one" / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[:5]))  # as if killed after 5 samples
    resumed = detect(lm, GRID, replace(base, batch_size=3), out=tmp_path / "one", show_progress=False)
    np.testing.assert_array_equal(resumed.scores, one.scores)
    assert len(read_records(records)) == len(lines)
