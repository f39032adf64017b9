"""What the distribution promises users: its version from the package metadata, the `py.typed`
marker shipped as package data, and the lint, format and type gates in the README's test command."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import retrieval_heads

ROOT = Path(__file__).resolve().parents[2]


def test_version_comes_from_the_installed_distribution():
    assert retrieval_heads.__version__ == importlib.metadata.version("retrieval-heads")


def test_version_of_a_checkout_that_was_never_installed():
    code = (
        "import importlib.metadata as m\n"
        "def missing(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import retrieval_heads\n"
        "print(retrieval_heads.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0+unknown"


def test_py_typed_marker_is_shipped():
    assert (Path(retrieval_heads.__file__).parent / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    data = re.search(r"\[tool\.setuptools\.package-data\]\nretrieval_heads = \[([^\]]*)\]", pyproject)
    assert data is not None and '"py.typed"' in data.group(1)


def test_readme_test_command_runs_the_gates_before_pytest():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = readme.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    gates = ["lint-imports --no-logo", "ruff check ", "ruff format --check ", "mypy", "python -m pytest"]
    at = [command.find(g) for g in gates]
    assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(gates, at, strict=True))
    extra = re.search(r"^test = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.S | re.M)
    assert extra is not None and '"ruff>=' in extra.group(1) and '"mypy>=' in extra.group(1)
