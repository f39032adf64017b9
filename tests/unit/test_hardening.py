"""Hardening (issue 14): --overwrite never deletes a user's files, one writer per run folder,
bounded and validated readers, one line for every bad input, umask, atomic and deterministic
figures, config written after the samples, resume that keeps a complete last record."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval_heads.errors import ConfigError, DataError, RetrievalHeadsError, RunConflictError
from retrieval_heads.runs import RunFolder, read_records

ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file modes: simulate them
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


def _score_file(path: Path, n_layers: int = 2, n_heads: int = 3, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    path.write_text(json.dumps({f"{l}-{h}": rng.random(n).tolist() for l in range(n_layers) for h in range(n_heads)}))
    return path


# ---------------------------------------------------------------- --overwrite and default paths
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


@pytest.mark.parametrize("name", ["..", "../..", "/etc", "a/../../b", ".hidden", "", "x/.."])
def test_default_run_folder_stays_inside_runs(name, tmp_path, monkeypatch):
    from retrieval_heads.cli.options import default_run_folder

    monkeypatch.chdir(tmp_path)
    lm = types.SimpleNamespace(spec=types.SimpleNamespace(name=name))
    for suffix in ("", "-kv", "-mask-uniform"):
        p = default_run_folder(lm, suffix)  # type: ignore[arg-type]
        assert p.parent == Path("runs") and p.resolve().parent == (tmp_path / "runs").resolve(), p
        assert not p.name.startswith(".")


def test_default_run_folder_keeps_hub_names():
    from retrieval_heads.cli.options import default_run_folder

    lm = types.SimpleNamespace(spec=types.SimpleNamespace(name="HuggingFaceTB/SmolLM2-135M"))
    assert default_run_folder(lm, "-kv") == Path("runs/HuggingFaceTB_SmolLM2-135M-kv")  # type: ignore[arg-type]


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
    real_stamp = D.run_stamp
    monkeypatch.setattr(D, "run_stamp", lambda device: {**real_stamp(device), "created": created})
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


# ---------------------------------------------------------------- GGUF cache: one converter
def test_concurrent_gguf_conversions_convert_once(tmp_path, monkeypatch):
    import transformers

    from retrieval_heads import models
    from retrieval_heads.testing import tiny_model

    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    lm = tiny_model("llama")
    calls = []

    def slow_model(*a, **k):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # the window in which another process would convert too
        return lm.model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", slow_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: lm.tokenizer)
    old = os.umask(0o022)
    try:
        results, errors = [], []

        def convert():
            try:
                results.append(models.gguf_to_safetensors(gguf))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=convert) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.umask(old)
    assert not errors, errors
    assert len(calls) == 1 and len(set(results)) == 1
    out = results[0]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700: a shared cache
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")] == []


# ---------------------------------------------------------------- bounded score files
@pytest.mark.parametrize(
    "obj, message",
    [
        ({"100000-100000": [0.1]}, "out of range"),  # would allocate 10^10 head names
        ({"4096-0": [0.1]}, "out of range"),
        ({"0-4096": [0.1]}, "out of range"),
        ({"9" * 400 + "-0": [0.1]}, "out of range"),
        ({"0-0": [int("9" * 400)]}, "out of range"),  # a number no float holds
        ({"3-3": [0.1]}, "15 head(s) missing, e.g. 0-0"),
    ],
)
def test_score_files_are_bounded_before_allocation(obj, message):
    from retrieval_heads.scorefile import parse_scores

    t0 = time.perf_counter()
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_scores(obj, "s.json")
    assert time.perf_counter() - t0 < 1


def test_score_file_with_a_huge_integer_text_is_one_error(tmp_path):
    from retrieval_heads.scorefile import read_scores

    p = tmp_path / "s.json"
    p.write_text('{"0-0": [' + "9" * 5000 + "]}")  # beyond Python's int-parsing limit
    with pytest.raises(DataError, match="not valid JSON"):
        read_scores(p)
    p.write_text("[" * 100_000)
    with pytest.raises(DataError, match="not valid JSON"):
        read_scores(p)


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


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe\x00", b""])
def test_corrupt_config_is_one_line_for_analyze_report_and_detect(tmp_path, cli, content):
    d = _detection_folder(tmp_path / "run", [_rec(0), _rec(1)])
    (d / "config.json").write_bytes(content)
    for args in (["analyze", d, "--out", tmp_path / "a", "--no-figures"], ["report", d, "-o", tmp_path / "r.html"]):
        code, _, err = cli(*args)
        assert code == 2
        assert "config.json" in _one_line(err)
    with pytest.raises(RunConflictError) as e:
        RunFolder(d, dict(CONFIG)).open()
    assert "not the config of a retrieval-heads run" in str(e.value) and "differs in" not in str(e.value)
    assert (d / "config.json").read_bytes() == content and not (d / ".lock").exists()


def test_experiment_folders_with_malformed_records_are_one_error(tmp_path):
    from retrieval_heads.experiments.runner import ExperimentResult

    class Picky(ExperimentResult):
        kind = "picky"

        @classmethod
        def from_run(cls, config, records, **kwargs):
            return sum(r["k"] for r in records)  # a field of the wrong kind: TypeError

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"version": "0", "model": "tiny"}))
    (d / "records.jsonl").write_text(json.dumps({"id": "a", "k": "x"}) + "\n")
    with pytest.raises(DataError, match="do not fit a picky run"):
        Picky.load(d)


def test_non_utf8_needles_file_is_one_line(tmp_path):
    from retrieval_heads.needles import load_needles

    p = tmp_path / "n.jsonl"
    p.write_bytes(b'{"needle": "a b", "question": "q", "answer": "b"}\n{"needle": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"n\.jsonl:2: not UTF-8"):
        load_needles(p)


# ---------------------------------------------------------------- bad options and paths: one line
@pytest.mark.parametrize("text", ["inf", "nan", "80,inf", "1:inf:3", "-inf:80:2", "nan:nan:2"])
def test_infinite_or_nan_lengths_are_refused(text):
    from retrieval_heads.detection import parse_range

    with pytest.raises(ConfigError, match="inf or nan"):
        parse_range(text, integer=True)
    with pytest.raises(ConfigError, match="inf or nan"):
        parse_range(text, integer=False)


def test_huge_range_count_is_refused():
    from retrieval_heads.detection import parse_range

    with pytest.raises(ConfigError, match="at most 10000"):
        parse_range("80:160:1000000000", integer=True)


def test_lengths_inf_on_the_command_line(cli, tmp_path, tiny_llama_dir, haystack_file, needles_file):
    common = ["--model", tiny_llama_dir, "--haystack", haystack_file, "--needles", needles_file]
    code, _, err = cli("detect", *common, "--lengths", "inf", "--out", tmp_path / "o")
    assert code == 2 and "inf or nan" in _one_line(err)


def test_report_output_that_is_a_folder_or_under_a_file(cli, tmp_path):
    s = _score_file(tmp_path / "s.json")
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    for output, words in (
        (tmp_path / "dir", "is a folder"),
        (tmp_path / "file" / "r.html", "a part of the path is a file"),
    ):
        code, _, err = cli("report", s, "-o", output)
        assert code == 2, err
        assert words in _one_line(err) and str(output) in err
    code, _, err = cli("analyze", s, "--out", tmp_path / "file" / "sub", "--no-figures")
    assert code == 2 and "a part of the path is a file" in _one_line(err)
    assert (tmp_path / "file").read_text() == "x"


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only (root ignores modes: then refuse temp files in it)."""
    made = []

    def make(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        if not IS_ROOT:
            folder.chmod(0o555)
            made.append(folder)
            return folder
        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(13, "Permission denied", os.path.join(dir, ".x.tmp"))
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        return folder

    yield make
    for f in made:
        f.chmod(0o755)


def test_read_only_output_folder_is_one_line_naming_the_file(cli, tmp_path, read_only):
    s = _score_file(tmp_path / "s.json")
    out = read_only(tmp_path / "ro")
    code, _, err = cli("analyze", s, "--out", out, "--no-figures")
    assert code == 2
    line = _one_line(err)
    assert "Permission denied" in line and str(out / "sparsity.csv") in line and ".tmp" not in line


def test_debug_shows_the_traceback(cli, tmp_path, read_only, monkeypatch):
    s = _score_file(tmp_path / "s.json")
    out = read_only(tmp_path / "ro")
    with pytest.raises(PermissionError):
        cli("--debug", "analyze", s, "--out", out, "--no-figures")
    monkeypatch.setenv("RETRIEVAL_HEADS_DEBUG", "1")
    with pytest.raises(PermissionError):
        cli("analyze", s, "--out", out, "--no-figures")
    monkeypatch.delenv("RETRIEVAL_HEADS_DEBUG")
    code, _, err = cli("analyze", s, "--out", out, "--no-figures")  # --debug holds for one call only
    assert code == 2 and _one_line(err)


def test_os_and_unicode_errors_anywhere_are_one_line(cli, monkeypatch, tmp_path):
    from retrieval_heads import analysis

    def fail(*a, **k):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(analysis, "load_results", fail)
    code, _, err = cli("analyze", tmp_path / "x")
    assert code == 2 and "cannot decode" in _one_line(err)

    def oserror(*a, **k):
        raise IsADirectoryError(21, "Is a directory", "/some/where")

    monkeypatch.setattr(analysis, "load_results", oserror)
    code, _, err = cli("analyze", tmp_path / "x")
    assert code == 2 and _one_line(err) == "error: Is a directory: /some/where"


def test_unreadable_records_file_is_one_line(cli, tmp_path, monkeypatch):
    d = _detection_folder(tmp_path / "run", [_rec(0)])
    rec = d / "records.jsonl"
    if IS_ROOT:
        real = Path.read_bytes

        def read_bytes(self):
            if self == rec:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read_bytes(self).decode())
    else:
        rec.chmod(0)
    try:
        code, _, err = cli("analyze", d, "--out", tmp_path / "a", "--no-figures")
    finally:
        rec.chmod(0o644)
    assert code == 2
    line = _one_line(err)
    assert str(rec) in line and "Permission denied" in line


def test_score_file_name_with_mathtext_is_drawn_as_written(cli, tmp_path):
    s = _score_file(tmp_path / "a$x^$b$_{$.json")
    code, _, err = cli("analyze", s, "--out", tmp_path / "a")
    assert code == 0, err
    assert list((tmp_path / "a").glob("*heatmap.svg"))
    code, _, err = cli("report", s, "-o", tmp_path / "r.html")
    assert code == 0, err


# ---------------------------------------------------------------- umask, atomic and deterministic figures
def test_files_get_the_users_umask(tmp_path):
    from retrieval_heads.scorefile import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o002)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o664


def _figure():
    from retrieval_heads.plots.detection import plot_heatmap
    from retrieval_heads.results import DetectionResult

    return plot_heatmap(DetectionResult("m$x$", np.random.default_rng(0).random((3, 2, 4))))


def test_svg_and_png_are_the_same_bytes_each_time(tmp_path):
    from retrieval_heads.plots.common import save_figure

    a = save_figure(_figure(), tmp_path / "a")
    b = save_figure(_figure(), tmp_path / "b")
    for p, q in zip(a, b, strict=True):
        assert p.read_bytes() == q.read_bytes(), p.name
    old = os.umask(0o022)
    try:
        c = save_figure(_figure(), tmp_path / "c")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in c} == {0o644}


def test_figures_are_written_atomically(tmp_path):
    from retrieval_heads.plots.common import save_figure

    good = save_figure(_figure(), tmp_path / "fig")
    before = {p.name: p.read_bytes() for p in good}
    fig = _figure()

    def broken(target, *a, **k):
        if hasattr(target, "write"):
            target.write(b"half a figure")
        else:
            Path(target).write_bytes(b"half a figure")
        raise RuntimeError("disk full")

    fig.savefig = broken
    with pytest.raises(RuntimeError):
        save_figure(fig, tmp_path / "fig")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old figures, no temp files


# ---------------------------------------------------------------- config.json only after the samples
def test_a_failed_start_leaves_no_config(cli, tmp_path, tiny_llama_dir, haystack_file):
    lost = tmp_path / "lost.jsonl"
    lost.write_text(
        json.dumps({"id": "lost", "needle": "zorblax quintessence flumph .", "question": "q ?", "answer": "zorblax"})
        + "\n"
    )
    out = tmp_path / "out"
    code, _, err = cli(
        "detect",
        "--model",
        tiny_llama_dir,
        "--haystack",
        haystack_file,
        "--needles",
        lost,
        "--lengths",
        "80",
        "--depths",
        "50",
        "--no-chat",
        "--no-progress",
        "--out",
        out,
    )
    assert code == 2, err
    assert not out.exists()


def test_an_experiment_run_opens_its_folder_at_the_first_record(tmp_path):
    from retrieval_heads.experiments.runner import Run

    out = tmp_path / "exp"
    with pytest.raises(ConfigError), Run(dict(CONFIG), out=out, show_progress=False):
        raise ConfigError("a sample cannot be built")  # before any record
    assert not out.exists()
    with Run(dict(CONFIG), out=out, show_progress=False) as run:
        assert not out.exists()
        run.item("a", lambda: {"x": 1})
        assert json.loads((out / "config.json").read_text()) == CONFIG
    with Run(dict(CONFIG), out=tmp_path / "empty", show_progress=False):
        pass
    assert (tmp_path / "empty" / "config.json").exists()  # a run without records still has its config


# ---------------------------------------------------------------- every reader: clean result or our error
def _reader_cases():
    from retrieval_heads.distributed import merge_runs
    from retrieval_heads.experiments.kv_eval import KVEvalResult
    from retrieval_heads.experiments.mask_eval import MaskEvalResult
    from retrieval_heads.experiments.task_eval import TaskEvalResult
    from retrieval_heads.needles import load_haystack, load_needles
    from retrieval_heads.results import DetectionResult
    from retrieval_heads.runs import read_config
    from retrieval_heads.scorefile import read_scores
    from retrieval_heads.tasks.qa import read_json as qa_read_json
    from retrieval_heads.tasks.reasoning import read_jsonl_gz

    def folder(d: Path, config: bytes, records: bytes) -> Path:
        d.mkdir(exist_ok=True)
        (d / "config.json").write_bytes(config)
        (d / "records.jsonl").write_bytes(records)
        return d

    return {
        "read_scores": lambda d, a, b: read_scores(_write(d / "s.json", a)),
        "read_records": lambda d, a, b: read_records(_write(d / "r.jsonl", a)),
        "read_config": lambda d, a, b: read_config(_write(d / "config.json", a)),
        "load_needles": lambda d, a, b: load_needles(_write(d / "n.jsonl", a)),
        "load_haystack": lambda d, a, b: load_haystack(_write(d / "h.txt", a)),
        "DetectionResult.load(file)": lambda d, a, b: DetectionResult.load(_write(d / "x.json", a)),
        "DetectionResult.load(folder)": lambda d, a, b: DetectionResult.load(folder(d / "run", a, b)),
        "MaskEvalResult.load": lambda d, a, b: MaskEvalResult.load(folder(d / "run", a, b)),
        "TaskEvalResult.load": lambda d, a, b: TaskEvalResult.load(folder(d / "run", a, b)),
        "KVEvalResult.load": lambda d, a, b: KVEvalResult.load(folder(d / "run", a, b)),
        "merge_runs": lambda d, a, b: merge_runs([folder(d / "run", a, b)]),
        # task data: SQuAD/HotpotQA JSON and GSM8K/MMLU JSONL (plain or gzip)
        "qa data": lambda d, a, b: qa_read_json(str(_write(d / "squad.json", a))),
        "reasoning jsonl": lambda d, a, b: read_jsonl_gz(_write(d / "t.jsonl", a)),
        "reasoning jsonl.gz": lambda d, a, b: read_jsonl_gz(_write(d / "t.jsonl.gz", a)),
    }


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_every_reader_is_checked():
    assert sorted(_reader_cases()) == sorted(READERS)


def _check_reader(name: str, first: bytes, second: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _reader_cases()[name](Path(tmp), first, second)
        except RetrievalHeadsError:
            pass  # our own, one-line error: fine; anything else fails the test


READERS = [
    "read_scores",
    "read_records",
    "read_config",
    "load_needles",
    "load_haystack",
    "DetectionResult.load(file)",
    "DetectionResult.load(folder)",
    "MaskEvalResult.load",
    "TaskEvalResult.load",
    "KVEvalResult.load",
    "merge_runs",
    "qa data",
    "reasoning jsonl",
    "reasoning jsonl.gz",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
# JSON shaped like our files, so the readers get past the parser: score maps, records, configs
head_keys = st.builds(lambda l, h: f"{l}-{h}", st.integers(0, 5000), st.integers(0, 5000))
score_maps = st.dictionaries(
    head_keys | st.text(max_size=5), json_values | st.lists(st.floats(), max_size=3), max_size=5
)
records = st.lists(
    st.fixed_dictionaries(
        {"id": st.text(max_size=3) | st.integers()},
        optional={
            "kept": json_values,
            "needle_tokens": json_values,
            "span_tokens": json_values,
            "copy_counts": json_values | st.lists(st.lists(st.integers(-1, 3) | st.floats(), max_size=3), max_size=3),
            "k": json_values,
            "kind": st.sampled_from(["base", "top", "random", "ranking", "memory"]) | json_values,
            "condition": json_values,
            "scores": json_values,
            "length": json_values,
            "depth": json_values,
        },
    ),
    max_size=4,
)
configs = st.fixed_dictionaries(
    {"version": st.just("0.1.0"), "model": st.text(max_size=5)},
    optional={
        "grid": json_values,
        "task": json_values,
        "kind": json_values,
        "ks": json_values,
        "conditions": json_values,
        "metrics": json_values,
        "needles": json_values,
    },
)


def _dump(obj) -> bytes:
    return json.dumps(obj).encode()


def _jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("reader", READERS)
@PROPERTY
@given(first=st.binary(max_size=200), second=st.binary(max_size=200))
def test_readers_on_random_bytes(reader, first, second):
    _check_reader(reader, first, second)


@pytest.mark.parametrize("reader", READERS)
@PROPERTY
@given(first=json_values, second=st.lists(json_values, max_size=4))
def test_readers_on_random_json(reader, first, second):
    _check_reader(reader, _dump(first), _jsonl(second))


@pytest.mark.parametrize("reader", READERS)
@PROPERTY
@given(data=st.data())
def test_readers_on_json_shaped_like_our_files(reader, data):
    if reader in ("read_scores", "DetectionResult.load(file)"):
        first = _dump(data.draw(score_maps))
    elif reader == "load_needles":
        first = _jsonl(
            data.draw(st.lists(st.dictionaries(st.sampled_from(["needle", "question", "answer", "id"]), json_values)))
        )
    else:
        first = _dump(data.draw(configs))
    _check_reader(reader, first, _jsonl(data.draw(records)))


@PROPERTY
@given(obj=json_values | score_maps)
def test_parse_scores_on_random_json(obj):
    from retrieval_heads.scorefile import parse_scores

    try:
        out = parse_scores(obj, "x")
    except DataError:
        return
    assert out.ndim == 3 and np.isfinite(out).all() and (out >= 0).all()


@PROPERTY
@given(recs=records | st.lists(json_values, max_size=3))
def test_from_records_on_random_json(recs):
    from retrieval_heads.results import DetectionResult

    try:
        r = DetectionResult.from_records("m", recs)
    except DataError:
        return
    assert np.isfinite(r.per_sample).all()
