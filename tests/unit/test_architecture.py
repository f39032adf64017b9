"""The shape of the package (docs/architecture.md): layers and no cycles (import-linter), no private
imports across modules, small experiment modules on one runner, one greedy loop, one summary file
name, and attention-implementation swaps only through `models.attention_implementation`."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "retrieval_heads"
EXPERIMENT_MAX_CODE_LINES = 250  # code lines: no blank lines, comments or docstrings


def modules() -> dict[str, ast.Module]:
    """Every module of the package by its path relative to the package, e.g. 'engines/fast.py'."""
    return {
        p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
        for p in sorted(PACKAGE.rglob("*.py"))
    }


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_module(rel: str, node: ast.ImportFrom) -> Path | None:
    """The package folder or file that `from <module> import ...` in module `rel` names, or None
    outside the package."""
    if node.level == 0:
        parts = (node.module or "").split(".")
        if parts[0] != "retrieval_heads":
            return None
        base, rest = PACKAGE, parts[1:]
    else:
        base = (PACKAGE / rel).parent
        for _ in range(node.level - 1):
            base = base.parent
        rest = node.module.split(".") if node.module else []
    return base.joinpath(*rest)


def is_module(path: Path) -> bool:
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_uses(rel: str, tree: ast.Module) -> list[str]:
    """`from x import _y` of any module, and `m._y` where `m` names an imported module."""
    found, module_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if private(a.name.rsplit(".", 1)[-1]):
                    found.append(f"{rel}:{node.lineno}: import {a.name}")
                module_names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            target = package_module(rel, node)
            for a in node.names:
                if private(a.name):
                    found.append(f"{rel}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}")
                elif target is not None and is_module(target / a.name):
                    module_names.add(a.asname or a.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_names
        ):
            found.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_a_private_name():
    found = [use for rel, tree in modules().items() for use in private_uses(rel, tree)]
    assert not found, "private names used across modules (make them public or move them):\n" + "\n".join(found)


def test_private_use_check_catches_both_forms():
    tree = ast.parse(
        "from .experiments.mask_eval import _clean\nfrom . import analysis as A\nimport os\n"
        "A._helper()\nos._exit(0)\nx = A.public\nfrom . import __version__\n"
    )
    assert private_uses("detection.py", tree) == [
        "detection.py:1: from .experiments.mask_eval import _clean",
        "detection.py:4: A._helper",
        "detection.py:5: os._exit",
    ]


def test_import_contracts_hold():
    """`lint-imports` (import-linter, contracts in pyproject.toml): layers and no import cycles."""
    exe = Path(sys.executable).parent / ("lint-imports.exe" if os.name == "nt" else "lint-imports")
    if not exe.exists():
        pytest.skip(f"{exe} is missing: install the test extra (pip install -e '.[test]') for import-linter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [str(exe), "--no-cache", "--no-logo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def code_lines(source: str) -> int:
    """Lines holding code: blank lines, comments and docstrings (of the module, classes and
    functions) do not count, so formatting and documentation do not change the size."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    layout = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in layout:
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - docstrings)


def test_code_lines_leave_out_blanks_comments_and_docstrings():
    source = (
        '"""Module\ndocstring."""\n\n# a comment\nX = (\n    1,  # trailing\n)\n\n\n'
        'def f():\n    """Doc."""\n    return """a\nb"""\n'
    )
    # X = ( / 1, / ) / def f(): / return """a / b"""
    assert code_lines(source) == 6


def test_experiment_modules_are_small():
    """Each experiment applies conditions to a task through the shared runner; the skeleton
    (header, resume, progress, save/load) lives in retrieval_heads.runner and conditions.py only."""
    shared = {"__init__.py", "conditions.py"}
    sizes = {
        p.name: code_lines(p.read_text(encoding="utf-8"))
        for p in sorted((PACKAGE / "experiments").glob("*.py"))
        if p.name not in shared
    }
    assert sizes, "no experiment modules found"
    big = {name: n for name, n in sizes.items() if n > EXPERIMENT_MAX_CODE_LINES}
    assert not big, f"experiment modules of more than {EXPERIMENT_MAX_CODE_LINES} code lines: {big}"


def test_summary_file_is_defined_once():
    defined = [
        rel
        for rel, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name) and t.id == "SUMMARY_FILE"
    ]
    assert defined == ["runs.py"], f"SUMMARY_FILE defined in {defined}; import it from runs"


def reads_logits(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "logits" for n in ast.walk(node))


def logits_argmax(tree: ast.Module) -> list[tuple[int, str | None]]:
    """(line, enclosing function) of each argmax over logits: `x.logits[...].argmax()` or
    `torch.argmax(x.logits...)`, i.e. a greedy token choice."""
    found = []

    def visit(node: ast.AST, func: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "argmax":
            if reads_logits(node.func.value) or any(reads_logits(a) for a in node.args):
                found.append((node.lineno, func))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, None)
    return found


def test_one_greedy_decode_loop():
    """The greedy token choice lives in `decoding.greedy` (batch 1); the only other ones are the
    batched decodes that need no attention weights: the fast engine's (`FastEngine.run_batch`:
    left-padded prompts whose rows stop one by one) and `decoding.greedy_rows` (copies of one
    prompt, each row with its own head masks, stopping one by one)."""
    where = {(rel, func) for rel, tree in modules().items() for _, func in logits_argmax(tree)}
    want = {("decoding.py", "greedy"), ("decoding.py", "greedy_rows"), ("engines/fast.py", "run_batch")}
    assert where == want, where


def test_attention_implementation_switched_only_in_models():
    """Only `models.attention_implementation` (a context manager that restores) switches it."""
    calls = sorted(
        f"{rel}:{node.lineno}"
        for rel, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "set_attn_implementation"
        and rel != "models.py"
    )
    assert not calls, "switch the attention implementation with models.attention_implementation:\n" + "\n".join(calls)


def test_attention_weights_are_requested_in_one_module():
    """Every reader of eager attention rows goes through `decoding.attention_rows` or
    `decoding.greedy_with_attentions` (its per-step kwargs); no other module passes `output_attentions`."""
    where = sorted(
        f"{rel}:{node.lineno}"
        for rel, tree in modules().items()
        for node in ast.walk(tree)
        if (isinstance(node, ast.keyword) and node.arg == "output_attentions")
        or (
            isinstance(node, ast.Dict)
            and any(isinstance(k, ast.Constant) and k.value == "output_attentions" for k in node.keys)
        )
    )
    assert where and {w.split(":")[0] for w in where} == {"decoding.py"}, where
    assert len(where) == 2, where  # attention_rows' forward and decode_positions' step kwargs


def test_one_run_skeleton():
    """The run skeleton (`runner.Run`) is defined once; detection and every experiment use it."""
    runs = [
        rel
        for rel, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == "Run"
    ]
    assert runs == ["runner.py"], runs
