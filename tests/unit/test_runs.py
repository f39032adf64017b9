"""Run folders (runs.py): --overwrite never deletes a user's files, one writer per folder (the
holder's pid in the refusal), a resume after kill -9 identical to an uninterrupted run, a complete
last record kept and a torn one dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from retrieval_heads.errors import RunConflictError
from retrieval_heads.runs import RunFolder, read_records, strict_json

CONFIG = {"version": "0.1.0", "model": "tiny", "grid": {"lengths": [80]}}


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def _run_folder(path: Path, config: dict | None = None, records: int = 2) -> Path:
    """A finished run of ours: config, records, summary, score file, a figure, a shard folder."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or CONFIG))
    (path / "records.jsonl").write_text("".join(json.dumps({"id": f"r{i}"}) + "\n" for i in range(records)))
    (path / "summary.json").write_text("{}")
    (path / "retrieval_scores.json").write_text("{}")
    (path / "mask_eval.png").write_bytes(b"png")
    (path / "rank-0").mkdir()
    (path / "rank-0" / "config.json").write_text(json.dumps(config or CONFIG))
    (path / "rank-0" / "records.jsonl").write_text("")
    return path


# ---------------------------------------------------------------- --overwrite
def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "data").mkdir()
    with pytest.raises(RunConflictError, match="holds no run config"):
        RunFolder(d, dict(CONFIG), overwrite=True).open()
    assert (d / "thesis.tex").read_text() == "years of work" and (d / "data").is_dir()
    assert sorted(p.name for p in d.iterdir()) == ["data", "thesis.tex"]  # not even a lock file


def test_overwrite_refuses_a_run_folder_with_foreign_files(tmp_path):
    d = _run_folder(tmp_path / "run")
    (d / "notes.txt").write_text("mine")
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(RunConflictError, match=r"files that no run writes \(e\.g\. notes\.txt\)"):
        RunFolder(d, {**CONFIG, "grid": {"lengths": [120]}}, overwrite=True).open()
    assert sorted(p.name for p in d.iterdir()) == before
    assert json.loads((d / "config.json").read_text()) == CONFIG


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    d = _run_folder(tmp_path / "run")
    (d / ".config.json.abc123.tmp").write_text("{")  # an interrupted atomic write of ours
    (d / "scores").mkdir()  # detection's other score maps
    (d / "scores" / "needle_mass.json").write_text("{}")
    new = {**CONFIG, "grid": {"lengths": [120]}}
    folder = RunFolder(d, new, overwrite=True)
    assert folder.open() == []
    folder.close()
    assert sorted(p.name for p in d.iterdir()) == [".lock", "config.json"]
    assert json.loads((d / "config.json").read_text()) == new


def test_overwrite_of_the_current_directory_is_refused(
    tmp_path, monkeypatch, cli, tiny_llama_dir, haystack_file, needles_file
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "todo.md").write_text("keep me")
    code, _, err = cli(
        "detect",
        "--model",
        tiny_llama_dir,
        "--haystack",
        haystack_file,
        "--needles",
        needles_file,
        "--lengths",
        "80",
        "--depths",
        "50",
        "--max-new-tokens",
        "2",
        "--no-chat",
        "--no-progress",
        "--out",
        ".",
        "--overwrite",
    )
    assert code == 2
    assert "holds no run config" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["todo.md"]


# ---------------------------------------------------------------- one writer per run folder
HOLDER = textwrap.dedent(
    """
    import sys, time
    from retrieval_heads.runs import RunFolder
    folder = RunFolder(sys.argv[1], {"version": "0.1.0", "model": "tiny"})
    folder.open()
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin
    folder.append({"id": "last"})
    folder.close()
    """
)


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    d = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for overwrite in (False, True):
            with pytest.raises(RunConflictError) as e:
                RunFolder(d, {"version": "0.1.0", "model": "tiny"}, overwrite=overwrite).open()
            assert str(d) in str(e.value) and f"pid {holder.pid}" in str(e.value)
        assert (d / "config.json").exists()
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert [r["id"] for r in read_records(d / "records.jsonl")] == ["last"]
    folder = RunFolder(d, {"version": "0.1.0", "model": "tiny"})  # free again once the holder is done
    assert [r["id"] for r in folder.open()] == ["last"]
    folder.close()


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    from retrieval_heads.runs import RunLock

    d = tmp_path / "run"
    a = RunFolder(d, dict(CONFIG))
    a.open()
    b = RunFolder(d, dict(CONFIG))  # same process (e.g. a result saved by the run that wrote it)
    b.open()
    b.close()
    a.close()
    a.close()  # idempotent
    with RunLock(d) as lock:
        assert lock.acquired
    assert (d / ".lock").read_text().strip() == str(os.getpid())


DETECT_CHILD = textwrap.dedent(
    """
    import json, os, pathlib, sys, time, types
    import torch
    torch.set_num_threads(2)
    from retrieval_heads import detection as D
    from retrieval_heads.models import load_model
    from retrieval_heads.needles import Needle
    from retrieval_heads.runs import RunFolder

    model_dir, hay, out, signal_file, mode = sys.argv[1:6]
    D.time = types.SimpleNamespace(perf_counter=lambda: 0.0)  # records without timings: comparable bytes
    needles = (
        Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?",
               "smoked tamarind", "stew"),
        Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
    )
    grid = D.Grid((80,), (0.0, 50.0, 100.0), needles)
    cfg = D.DetectConfig(engine="reference", max_new_tokens=4, recall_threshold=-1.0, chat=False, haystack=hay)
    real_append = RunFolder.append
    count = {"n": 0}

    def append(self, record):
        count["n"] += 1
        if mode == "pause":  # after the first record: wait until the test says go
            real_append(self, record)
            pathlib.Path(signal_file).write_text("1")
            t0 = time.time()
            while count["n"] == 1 and not pathlib.Path(signal_file + ".go").exists() and time.time() - t0 < 300:
                time.sleep(0.05)
            return
        if count["n"] == 2:  # part of the second record on disk, then wait to be killed
            line = json.dumps(record, sort_keys=True)
            with self.records_path.open("a", encoding="utf-8") as f:
                f.write(line[: len(line) // 2] if mode == "torn" else line)  # torn, or whole without its newline
                f.flush()
                os.fsync(f.fileno())
            pathlib.Path(signal_file).write_text("1")
            time.sleep(600)
        real_append(self, record)

    RunFolder.append = append
    D.detect(load_model(model_dir), grid, cfg, out=out, show_progress=False)
    """
)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            raise AssertionError("child never reached the signal")
        time.sleep(0.1)


def _consistent(folder: Path, n: int) -> None:
    recs = read_records(folder / "records.jsonl")
    lines = (folder / "records.jsonl").read_text().splitlines()
    summary = json.loads((folder / "summary.json").read_text())
    scores = json.loads((folder / "retrieval_scores.json").read_text())
    assert len(recs) == len(lines) == len({r["id"] for r in recs}) == n
    assert summary["n_samples"] == summary["n_kept"] == n  # recall threshold -1: every sample kept
    assert {len(v) for v in scores.values()} == {n}


def test_two_processes_on_one_folder_second_refused_first_intact(tmp_path, tiny_llama_dir, haystack_file, needles_file):
    out, sig = tmp_path / "run", tmp_path / "signal"
    first = subprocess.Popen(
        [sys.executable, "-c", DETECT_CHILD, str(tiny_llama_dir), str(haystack_file), str(out), str(sig), "pause"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(sig, first)  # the first writer is mid-run: one record on disk
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "retrieval_heads.cli",
                "detect",
                "--model",
                str(tiny_llama_dir),
                "--haystack",
                str(haystack_file),
                "--needles",
                str(needles_file),
                "--lengths",
                "120",
                "--depths",
                "50",
                "--max-new-tokens",
                "2",
                "--no-chat",
                "--no-progress",
                "--out",
                str(out),
                "--overwrite",  # another config, and --overwrite: still refused while the first runs
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        line = _one_line(second.stderr)
        assert "in use by another run" in line and f"pid {first.pid}" in line and str(out) in line
    finally:
        Path(f"{sig}.go").write_text("1")
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    _consistent(out, 6)
    assert json.loads((out / "config.json").read_text())["grid"]["lengths"] == [80]


@pytest.mark.parametrize("cut", ["torn", "whole"])
def test_kill_9_mid_write_then_resume_is_identical_to_an_uninterrupted_run(
    cut, tmp_path, tiny_llama_dir, haystack_file, monkeypatch
):
    from retrieval_heads import detection as D
    from retrieval_heads.models import load_model
    from retrieval_heads.needles import Needle

    out, sig = tmp_path / "killed", tmp_path / "signal"
    child = subprocess.Popen(
        [sys.executable, "-c", DETECT_CHILD, str(tiny_llama_dir), str(haystack_file), str(out), str(sig), cut],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(sig, child)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=60)
    raw = (out / "records.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and not raw.endswith(b"\n")  # one record, then a torn or unterminated one
    assert not (out / "summary.json").exists()

    monkeypatch.setattr(D, "time", types.SimpleNamespace(perf_counter=lambda: 0.0))
    # the uninterrupted run gets the killed run's date (a resumed run keeps its first one)
    created = json.loads((out / "config.json").read_text())["created"]
    from retrieval_heads import runner

    real_stamp = runner.run_stamp
    monkeypatch.setattr(runner, "run_stamp", lambda *a: {**real_stamp(*a), "created": created})
    needles = (
        Needle(
            "the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"
        ),
        Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
    )
    grid = D.Grid((80,), (0.0, 50.0, 100.0), needles)
    cfg = D.DetectConfig(
        engine="reference", max_new_tokens=4, recall_threshold=-1.0, chat=False, haystack=str(haystack_file)
    )
    lm = load_model(str(tiny_llama_dir))
    D.detect(lm, grid, cfg, out=out, show_progress=False)  # resume: the lock died with the child
    D.detect(lm, grid, cfg, out=tmp_path / "whole", show_progress=False)
    _consistent(out, 6)
    whole = tmp_path / "whole"
    for p in sorted(whole.rglob("*")):
        if p.is_file() and p.name != ".lock":
            assert (out / p.relative_to(whole)).read_bytes() == p.read_bytes(), p.name


# ---------------------------------------------------------------- resume keeps a complete last record
def test_resume_keeps_a_complete_last_record_without_its_newline(tmp_path):
    d = tmp_path / "run"
    folder = RunFolder(d, dict(CONFIG))
    folder.open()
    folder.append({"id": "a"})
    folder.append({"id": "b"})
    folder.close()
    p = d / "records.jsonl"
    p.write_bytes(p.read_bytes()[:-1])  # killed between the record and its newline
    folder = RunFolder(d, dict(CONFIG))
    assert [r["id"] for r in folder.open()] == ["a", "b"]
    folder.append({"id": "c"})
    folder.close()
    assert p.read_text().splitlines() == ['{"id": "a"}', '{"id": "b"}', '{"id": "c"}']


def test_resume_drops_a_torn_last_record(tmp_path):
    d = tmp_path / "run"
    folder = RunFolder(d, dict(CONFIG))
    folder.open()
    folder.append({"id": "a"})
    folder.close()
    with (d / "records.jsonl").open("ab") as f:
        f.write('{"id": "b", "text": "é'.encode()[:-1])  # torn inside a UTF-8 character
    folder = RunFolder(d, dict(CONFIG))
    assert [r["id"] for r in folder.open()] == ["a"]
    folder.close()
    assert (d / "records.jsonl").read_text() == '{"id": "a"}\n'


# ---------------------------------------------------------------- strict JSON
def test_strict_json_turns_non_finite_numbers_into_null_and_tuples_into_lists():
    obj = {"a": float("nan"), "b": (1.0, float("inf")), "c": [{"d": -float("inf"), "e": 2}], "f": "nan"}
    assert strict_json(obj) == {"a": None, "b": [1.0, None], "c": [{"d": None, "e": 2}], "f": "nan"}
    json.dumps(strict_json(obj), allow_nan=False)  # strict readers accept it


@pytest.mark.parametrize("model", [["a"], {"name": "x"}, 3, None, " "])
def test_a_run_config_whose_model_is_not_text_is_one_line(tmp_path, cli, model):
    from retrieval_heads.errors import DataError
    from retrieval_heads.runs import read_config

    snap = Path(__file__).resolve().parents[2] / "docs" / "runs" / "smollm2-135m"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**json.loads((snap / "config.json").read_text()), "model": model}))
    (run / "summary.json").write_bytes((snap / "summary.json").read_bytes())
    with pytest.raises(DataError, match="model must be a model name"):
        read_config(run)
    code, _out, err = cli("export-heads", "--scores", run, "--out", tmp_path / "x", "--n-whole", "2")
    assert code == 2 and "model must be a model name" in err and not (tmp_path / "x").exists()
