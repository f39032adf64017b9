"""The CLI package: every command's --help, the module layout (no command imports the app, each
shared option is defined once), the shared parsing helpers, and figures drawn by the CLI."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retrieval_heads.cli as cli_pkg
from retrieval_heads.cli import options as O
from retrieval_heads.errors import ConfigError
from retrieval_heads.scorefile import write_scores

COMMANDS = (
    "detect",
    "analyze",
    "compare",
    "report",
    "merge",
    "mask-eval",
    "kv-eval",
    "export-heads",
    "task-eval",
    "task-plot",
    "attribute",
    "grounding-eval",
    "passage-rank",
)
CLI_DIR = Path(cli_pkg.__file__).parent
COMMAND_MODULES = sorted(p for p in CLI_DIR.glob("*.py") if p.stem not in ("__init__", "__main__", "app"))


def test_root_help_lists_every_command_in_order(cli):
    code, out, err = cli("--help")
    assert code == 0, err
    assert [c for c in COMMANDS if c in out] == list(COMMANDS)
    assert [out.index(f" {c} ") for c in COMMANDS] == sorted(out.index(f" {c} ") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help(cli, command):
    code, out, err = cli(command, "--help")
    assert code == 0, err
    assert "Usage:" in out and command in out and "Traceback" not in out + err


@pytest.mark.parametrize(
    "command,flags",
    [
        (
            "detect",
            ["--device", "--dtype", "--threads", "--out", "--overwrite", "--progress", "--chat", "--model", "--top"],
        ),
        (
            "mask-eval",
            [
                "--scores",
                "--model",
                "--device",
                "--dtype",
                "--threads",
                "--out",
                "--overwrite",
                "--progress",
                "--chat",
                "--mask-phase",
                "--k",
            ],
        ),
        (
            "task-eval",
            [
                "--task",
                "--scores",
                "--model",
                "--device",
                "--dtype",
                "--threads",
                "--out",
                "--overwrite",
                "--progress",
                "--chat",
                "--mask-phase",
                "--k",
            ],
        ),
        (
            "kv-eval",
            [
                "--scores",
                "--model",
                "--dtype",
                "--threads",
                "--out",
                "--overwrite",
                "--progress",
                "--chat",
                "--sink",
                "--window",
            ],
        ),
        ("export-heads", ["--scores", "--out", "--sink", "--window", "--budget", "--n-whole"]),
    ],
)
def test_shared_flags_keep_their_names(command, flags):
    import typer

    params = {
        o for p in typer.main.get_command(cli_pkg.app).commands[command].params for o in (*p.opts, *p.secondary_opts)
    }
    assert set(flags) <= params, set(flags) - params
    assert command != "kv-eval" or "--device" not in params  # kv-eval never had --device


def test_module_entry_point_help():
    res = subprocess.run(
        [sys.executable, "-m", "retrieval_heads.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "mask-eval" in res.stdout


def _imports(path: Path) -> set[str]:
    """Absolute names of what a module of retrieval_heads.cli imports (relative imports resolved)."""
    package = ["retrieval_heads", "cli"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            full = ".".join([*base, *([node.module] if node.module else [])])
            found.add(full)
            found.update(f"{full}.{a.name}" for a in node.names)
    return found


def test_imports_resolve_relative_names():
    masking = _imports(CLI_DIR / "masking.py")
    assert {"retrieval_heads.cli.options", "retrieval_heads.experiments.mask_eval"} <= masking
    assert "retrieval_heads.cli.detect" in _imports(CLI_DIR / "app.py")


def test_command_modules_do_not_import_the_app():
    assert {p.stem for p in COMMAND_MODULES} >= {"options", "detect", "analysis", "scale", "masking", "tasks", "kv"}
    for p in COMMAND_MODULES:
        names = _imports(p)
        assert "retrieval_heads.cli.app" not in names, p.name
        assert "retrieval_heads.cli" not in names, p.name  # the package itself imports the app
    # the shared options build on no command module
    assert not {n for n in _imports(CLI_DIR / "options.py") if n.startswith("retrieval_heads.cli")}


@pytest.mark.parametrize(
    "text",
    [
        '"--progress/--no-progress"',
        '"torch CPU threads (default: torch\'s choice)"',
        '"replace a run with a different config in --out"',
        '"detection run folder, authors\'-format score JSON, or ref:<name> (a shipped map)"',
        '"auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps"',
        '"--chat/--no-chat"',
    ],
)
def test_shared_options_are_defined_once(text):
    where = [p.name for p in CLI_DIR.glob("*.py") if text in p.read_text()]
    assert where == ["options.py"], where


def test_comma_lists_and_ranges():
    assert O.comma_floats("0.1, 0.5,", "--budgets") == (0.1, 0.5)
    with pytest.raises(ConfigError, match="--budgets must be a comma list of numbers"):
        O.comma_floats("a", "--budgets")
    with pytest.raises(ConfigError, match="--budgets is empty"):
        O.comma_floats(" , ", "--budgets")
    assert O.comma_ints("0,5, 10", "--k") == (0, 5, 10)
    with pytest.raises(ConfigError, match="--k must be a comma list of integers, got 'a,b'"):
        O.comma_ints("a,b", "--k")
    assert O.comma_names(" sink_window, retrieval ,") == ("sink_window", "retrieval")
    assert O.parse_lengths("100:300:3") == (100, 200, 300)
    assert O.parse_depths("10,50.5") == (10.0, 50.5)
    with pytest.raises(ConfigError, match="mask phase 'prefill'"):
        O.check_mask_phase("prefill")
    O.check_mask_phase("decode")
    with pytest.raises(ConfigError, match="--random-seeds must be >= 0"):
        O.check_random_seeds(-1)


def test_load_scores_picks_the_model(tmp_path):
    p = tmp_path / "scores.json"
    write_scores(p, np.ones((1, 2, 4)))
    result, name = O.load_scores(p, None)
    assert result.scores.shape == (2, 4) and name == O.DEFAULT_MODEL
    assert O.load_scores(p, "my/model")[1] == "my/model"


def test_optional_figure_warns_without_matplotlib(caplog):
    with caplog.at_level(logging.WARNING, logger="retrieval_heads.cli"), O.optional_figure():
        raise ImportError("No module named 'matplotlib'")
    assert "no plot: No module named 'matplotlib'" in caplog.text
    with pytest.raises(ValueError), O.optional_figure():
        raise ValueError("other errors pass")


def test_mask_eval_cli_draws_the_figure(
    cli, tiny_llama_dir, needles_file, haystack_file, tmp_path, monkeypatch, caplog
):
    """The experiment only computes; the command draws mask_eval.png/.svg into the run folder, and
    without matplotlib it still succeeds, with a warning instead of the figure."""
    scores = tmp_path / "scores.json"
    write_scores(scores, np.array([[[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]]]))
    run = tmp_path / "run"
    args = (
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
        "1",
        "--max-new-tokens",
        "3",
        "--out",
        run,
        "--no-progress",
    )
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "retrieval_heads.plots.mask", None)  # as if matplotlib were missing
        with caplog.at_level(logging.WARNING, logger="retrieval_heads.cli"):
            code, out, err = cli(*args)
    assert code == 0, err
    assert "| K |" in out
    assert any(r.name == "retrieval_heads.cli" and r.getMessage().startswith("no plot:") for r in caplog.records)
    assert (run / "summary.json").exists() and not (run / "mask_eval.png").exists()
    code, out2, err = cli(*args)  # the finished run is reused; the figure is drawn now
    assert code == 0, err
    assert out2 == out
    for ext in ("png", "svg"):
        assert (run / f"mask_eval.{ext}").stat().st_size > 1000, ext
