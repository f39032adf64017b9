"""The CLI package: the module layout (no command imports the app, each shared option is defined
once, shown choices match the API's), the shared parsing helpers, and figures drawn by the CLI.
The app's help and every command's --help: test_app.py."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import retrieval_heads.cli as cli_pkg
from retrieval_heads.cli import options as O
from retrieval_heads.errors import ConfigError
from retrieval_heads.scorefile import write_scores

CLI_DIR = Path(cli_pkg.__file__).parent
COMMAND_MODULES = sorted(p for p in CLI_DIR.glob("*.py") if p.stem not in ("__init__", "__main__", "app"))


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
    masking = _imports(CLI_DIR / "mask_eval.py")
    assert {"retrieval_heads.cli.options", "retrieval_heads.experiments.task_eval"} <= masking
    assert "retrieval_heads.cli.detect" in _imports(CLI_DIR / "app.py")


def test_command_modules_do_not_import_the_app():
    assert {p.stem for p in COMMAND_MODULES} >= {
        "options",
        "detect",
        "analysis",
        "merge",
        "refs",
        "mask_eval",
        "task_eval",
        "kv_eval",
    }
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


def test_shown_choices_are_the_apis():
    """--help spells the choices without importing torch; they must stay those the API accepts."""
    from typing import get_args

    from retrieval_heads.engines.base import ROW_SCORES
    from retrieval_heads.experiments.conditions import RandomPool
    from retrieval_heads.masking import METHODS, PHASES
    from retrieval_heads.models import DType

    assert set(O.SCORE_NAMES) == {"copy", *ROW_SCORES, "query_focus"}
    assert O.MASK_PHASES == tuple(PHASES) and O.MASK_METHODS == tuple(METHODS)
    assert O.RANDOM_POOLS == get_args(RandomPool)
    assert O.choices(get_args(DType)) == "<auto|float32|bfloat16|float16>"


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


def test_option_groups_follow_the_commands_own_options_and_arrive_as_dicts():
    import inspect

    import typer
    from typer.testing import CliRunner

    seen: dict = {}

    @O.with_model_options
    @O.with_run_options
    @O.with_mask_options
    def command(
        name: str = "x",
        mask_options: dict | None = None,
        run_options: dict | None = None,
        model_options: dict | None = None,
    ) -> None:
        seen.update(name=name, mask=mask_options, run=run_options, model=model_options)

    groups = [O.MASK_OPTIONS, O.RUN_OPTIONS, O.MODEL_OPTIONS]
    params = list(inspect.signature(command).parameters)
    assert params == ["name", *(n for g in groups for n, _, _ in g)]
    app = typer.Typer()
    app.command()(command)
    args = ["--name", "y", "--device", "cpu", "--threads", "2", "--out", "o", "--no-progress", "--random-seeds", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert seen["name"] == "y"
    assert seen["model"] == {
        "device": "cpu",
        "dtype": "auto",
        "device_map": None,
        "trust_remote_code": False,
        "threads": 2,
    }
    assert seen["run"] == {"out": Path("o"), "overwrite": False, "progress": False}
    assert seen["mask"] == {
        "random_seeds": 3,
        "random_pool": "non-retrieval",
        "method": "uniform",
        "mask_phase": "all",
        "batch_size": None,
    }
    res = CliRunner().invoke(app, ["--random-draws", "4", "--random-pool", "layer-matched"])  # the alias
    assert res.exit_code == 0, res.output
    assert seen["mask"]["random_seeds"] == 4 and seen["mask"]["random_pool"] == "layer-matched"
    command(name="z")  # from Python: the groups' defaults
    assert seen["run"] == {"out": None, "overwrite": False, "progress": True} and seen["model"]["device"] == "auto"


def test_run_args_and_mask_condition_args(tmp_path):
    lm = types.SimpleNamespace(spec=types.SimpleNamespace(name="m"))
    assert O.run_args(lm, None, "-kv") == {"out": Path("runs/m-kv"), "overwrite": False, "show_progress": True}  # type: ignore[arg-type]
    chosen = {"out": tmp_path, "overwrite": True, "progress": False}
    args = O.run_args(lm, chosen, "-kv", tmp_path / "s.json", "needle_mass")  # type: ignore[arg-type]
    assert args == {
        "out": tmp_path,
        "overwrite": True,
        "show_progress": False,
        "scores_source": f"{tmp_path / 's.json'} [score: needle_mass]",
    }
    assert O.mask_condition_args(
        {"random_seeds": 2, "random_pool": "outside-top", "method": "zero", "mask_phase": "decode", "batch_size": 4}
    ) == {
        "random_seeds": (0, 1),
        "random_pool": "outside-top",
        "method": "zero",
        "phase": "decode",
        "batch_size": 4,
    }
    with pytest.raises(ConfigError, match="--batch-size must be >= 1, got 0"):
        O.mask_condition_args({"batch_size": 0})
    with pytest.raises(ConfigError, match="--random-seeds must be >= 0"):
        O.mask_condition_args({"random_seeds": -1})
