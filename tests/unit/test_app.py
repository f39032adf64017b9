"""The `retrieval-heads` app (`cli/app.py`): the root help in its four panels, --version, the hidden
maintainer command, and the help of every registered command (a description for every option, the
choices shown, one vocabulary for model loading and output)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import typer
from typer._click.core import Context

import retrieval_heads
import retrieval_heads.cli as cli_pkg
from retrieval_heads.errors import RunConflictError
from retrieval_heads.runs import RunFolder

from .test_results import _detection_folder, _rec

# panel -> its commands, in the order of `retrieval-heads --help`
PANELS = {
    "Find heads": ("detect", "merge", "refs"),
    "Study": ("analyze", "compare", "report"),
    "Evaluate": (
        "mask-eval",
        "task-eval",
        "task-plot",
        "kv-eval",
        "grounding-eval",
        "passage-rank",
        "finetune-eval",
        "finetune-plot",
    ),
    "Use": ("export-heads", "attribute"),
}
COMMANDS = tuple(c for cs in PANELS.values() for c in cs)
HIDDEN = ("docs-tables",)
# options whose value is one of a closed set: --help must show the set, not <str>
CHOICE_OPTIONS = {
    "--dtype",
    "--score",
    "--mask-phase",
    "--random-pool",
    "--method",
    "--engine",
    "--span",
    "--task",
    "--prompt",
    "--ranking",
    "--condition",
    "--control",
}
MODEL_OPTIONS = ("--model", "--device", "--dtype", "--device-map", "--trust-remote-code", "--threads")
NO_OUTPUT = {"refs", "docs-tables"}  # refs prints; docs-tables rewrites the Markdown files it is given


def _command(name: str):
    return typer.main.get_command(cli_pkg.app).commands[name]


def _options(name: str) -> dict[str, object]:
    return {o: p for p in _command(name).params for o in (*p.opts, *p.secondary_opts)}


def test_every_registered_command_is_listed_or_hidden():
    assert set(typer.main.get_command(cli_pkg.app).commands) == {*COMMANDS, *HIDDEN}


def test_root_help_groups_the_commands_in_panels(cli):
    code, out, err = cli("--help")
    assert code == 0, err
    where = {c: out.index(f"│ {c} ") for c in COMMANDS}  # a command's row, not a mention in a description
    assert list(where.values()) == sorted(where.values())  # the documented order
    panels = [out.index(f"─ {p} ─") for p in PANELS]
    assert panels == sorted(panels)
    for (panel, commands), end in zip(PANELS.items(), [*panels[1:], len(out)], strict=True):
        start = out.index(f"─ {panel} ─")
        assert all(start < where[c] < end for c in commands), panel
    assert "docs-tables" not in out


def test_hidden_maintainer_command_still_runs(cli):
    code, out, err = cli("docs-tables", "--help")
    assert code == 0 and "--check" in out, err


def test_version_names_the_release_and_the_default_model(cli):
    code, out, err = cli("--version")
    assert code == 0, err
    assert out.startswith(f"retrieval-heads {retrieval_heads.__version__} ")
    assert "GGUF" in out and "dequantized" in out and "smollm2-135m" in out


@pytest.mark.parametrize("command", [*COMMANDS, *HIDDEN])
def test_every_command_help(cli, command):
    code, out, err = cli(command, "--help")
    assert code == 0, err
    assert "Usage:" in out and command in out and "Traceback" not in out + err


@pytest.mark.parametrize("command", [*COMMANDS, *HIDDEN])
def test_every_option_has_a_description_and_shows_its_choices(command):
    cmd = _command(command)
    ctx = Context(cmd, info_name=command)
    assert (cmd.help or "").strip(), f"{command} has no description"
    bare, shown_as_str = [], []
    for p in cmd.params:
        if p.hidden or "--help" in p.opts:
            continue
        if not (p.help or "").strip():
            bare.append(p.opts[0])
        if CHOICE_OPTIONS & set(p.opts) and "|" not in str(p.metavar or p.display_type(ctx)):
            shown_as_str.append(p.opts[0])
    assert not bare, f"{command}: options without a description: {bare}"
    assert not shown_as_str, f"{command}: choices shown as <str>: {shown_as_str}"


@pytest.mark.parametrize("command", COMMANDS)
def test_model_commands_share_the_loading_options_and_output(command):
    opts = _options(command)
    if "--model" in opts and command not in ("export-heads",):
        missing = [o for o in MODEL_OPTIONS if o not in opts]
        assert not missing, f"{command} loads a model without {missing}"
    if command not in NO_OUTPUT:
        assert "--out" in opts and "-o" in opts, f"{command}: no --out/-o"


@pytest.mark.parametrize("command", ["detect", "mask-eval"])
def test_model_help_says_the_default_is_a_dequantized_gguf(command):
    assert "dequantized" in _options(command)["--model"].help


# ---------------------------------------------------------------- file errors: one line, tracebacks on --debug
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file modes: simulate them


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def _score_file(path: Path, n_layers: int = 2, n_heads: int = 3, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    path.write_text(json.dumps({f"{l}-{h}": rng.random(n).tolist() for l in range(n_layers) for h in range(n_heads)}))
    return path


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


def test_score_file_name_with_mathtext_is_drawn_as_written(cli, tmp_path):
    s = _score_file(tmp_path / "a$x^$b$_{$.json")
    code, _, err = cli("analyze", s, "--out", tmp_path / "a")
    assert code == 0, err
    assert list((tmp_path / "a").glob("*heatmap.svg"))
    code, _, err = cli("report", s, "-o", tmp_path / "r.html")
    assert code == 0, err


# ---------------------------------------------------------------- broken run folders: one line
CONFIG = {"version": "0.1.0", "model": "tiny", "grid": {"lengths": [80]}}


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


def test_unreadable_records_file_is_one_line(cli, tmp_path, monkeypatch):
    d = _detection_folder(tmp_path / "run", [_rec(0)])
    rec = d / "records.jsonl"
    if IS_ROOT:
        real = Path.read_bytes

        def read_bytes(self):
            if self == rec:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        def os_open(path, *a, **k):  # the bounded reader of user files opens with os.open
            if Path(path) == rec:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **k)

        real_open = os.open
        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read_bytes(self).decode())
        monkeypatch.setattr(os, "open", os_open)
    else:
        rec.chmod(0)
    try:
        code, _, err = cli("analyze", d, "--out", tmp_path / "a", "--no-figures")
    finally:
        rec.chmod(0o644)
    assert code == 2
    line = _one_line(err)
    assert str(rec) in line and "Permission denied" in line
