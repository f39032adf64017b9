"""What the distribution promises users: one version (pyproject.toml) that the package, the
citation and `--version` report, the license and citation files, the package data that commands read
at run time, the `slow` tests kept out of the default run, and the lint, format and type gates in
the README's test command."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import retrieval_heads

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


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
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["retrieval_heads"]


def test_readme_test_command_runs_the_gates_before_pytest():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = readme.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    gates = ["lint-imports --no-logo", "ruff check ", "ruff format --check ", "mypy", "python -m pytest"]
    at = [command.find(g) for g in gates]
    assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(gates, at, strict=True))
    extra = re.search(r"^test = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.S | re.M)
    assert extra is not None and '"ruff>=' in extra.group(1) and '"mypy>=' in extra.group(1)


def test_one_version_for_the_package_and_the_citation():
    version = PYPROJECT["project"]["version"]
    cff = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert re.search(rf"^version: {re.escape(version)}$", cff, re.M), "CITATION.cff must cite the pyproject version"
    assert "dynamic" not in PYPROJECT["project"] or "version" not in PYPROJECT["project"]["dynamic"]
    # no second copy of the number in the package: __version__ comes from the metadata
    init = (ROOT / "src" / "retrieval_heads" / "__init__.py").read_text(encoding="utf-8")
    assert version not in init and 'version("retrieval-heads")' in init


def test_license_and_citation_files_match_the_metadata():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License") and "retrieval-heads contributors" in license_text
    cff = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert "preferred-citation:" in cff and "arXiv:2404.15574" in cff
    assert "Retrieval Head Mechanistically Explains Long-Context Factuality" in cff


def test_package_data_ships_every_file_under_data():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["retrieval_heads"]
    package = ROOT / "src" / "retrieval_heads"
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    on_disk = {p for p in (package / "data").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert on_disk and on_disk <= shipped, sorted(str(p.relative_to(package)) for p in on_disk - shipped)
    assert package / "py.typed" in shipped


def test_docs_extra_and_project_urls():
    project = PYPROJECT["project"]
    docs = " ".join(project["optional-dependencies"]["docs"])
    assert "mkdocs-material" in docs and "mkdocstrings[python]" in docs
    assert any("2404.15574" in url for url in project["urls"].values())
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in project["classifiers"])


def test_slow_tests_are_deselected_by_default_and_selectable():
    marked = _pytest_stdout("tests/integration/test_detect_smollm2.py", "--collect-only", "-q")
    assert "deselected" in marked and "::test_" not in marked
    selected = _pytest_stdout("tests/integration/test_detect_smollm2.py", "--collect-only", "-q", "-m", "slow")
    assert "test_detect_smollm2.py::test_" in selected


def _pytest_stdout(*args: str) -> str:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False).stdout


def test_readme_is_a_short_front_page_with_the_paper_and_working_links():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert "https://arxiv.org/abs/2404.15574" in readme and "@article{" in readme
    for target in re.findall(r"\]\(((?!https?://)[^)#\s]+)", readme):
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
