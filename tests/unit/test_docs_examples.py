"""Every ```python block of README.md and docs/*.md runs, as a reader would paste it.

A block runs in a fresh namespace, in a temporary folder where `docs/` and `benchmarks/` link to
the repository's (so `docs/runs/smollm2-135m` and `docs/examples/harbor` resolve and whatever the
block writes stays out of the checkout). An HTML comment right before a block says what it needs:

    <!-- docs-example: slow -->          the real default model: marked `slow` (CI's slow step)
    <!-- docs-example: slow kvpress -->  also a module that an extra installs: skipped without it

Blocks that are not meant to run (output, shell commands) are fenced as something else than python.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*docs-example:([^>]*?)-->\s*\Z")
LINKED = ("docs", "benchmarks")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    code: str
    tags: tuple[str, ...]

    @property
    def id(self) -> str:
        return "-".join([f"{self.page}:{self.line}", *self.tags])


def blocks_of(text: str, page: str) -> list[Block]:
    """The python blocks of one Markdown text, each with the tags of the marker comment right before it."""
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n")
        marker = MARKER.search(before)
        tags = tuple(marker.group(1).split()) if marker else ()
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), tags))
    return found


def all_blocks() -> list[Block]:
    return [b for p in PAGES for b in blocks_of(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]


def _param(block: Block) -> object:
    marks = [pytest.mark.slow] if "slow" in block.tags else []
    return pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in all_blocks()])
def test_docs_python_block_runs(block: Block, tmp_path, monkeypatch):
    for module in (t for t in block.tags if t != "slow"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (its extra is not installed)")
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(block.code, f"{block.page}:{block.line}", "exec"), {"__name__": "__docs_example__"})


def test_blocks_are_found_with_their_markers():
    text = (
        "intro\n\n```python\nx = 1\n```\n\n<!-- docs-example: slow kvpress -->\n```python\ny = 2\n```\n\n"
        "<!-- docs-example: slow -->\nsome prose between\n```python\nz = 3\n```\n```\nnot python\n```\n"
    )
    found = blocks_of(text, "page.md")
    assert [(b.line, b.code, b.tags) for b in found] == [
        (3, "x = 1\n", ()),
        (8, "y = 2\n", ("slow", "kvpress")),
        (14, "z = 3\n", ()),  # a marker followed by prose does not reach the next block
    ]
    assert found[1].id == "page.md:8-slow-kvpress"


def test_every_marker_precedes_a_python_block_and_names_known_needs():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        tagged = {b.line: b.tags for b in blocks_of(text, page.name)}
        n_markers = len(re.findall(r"<!--\s*docs-example:", text))
        assert n_markers == sum(1 for tags in tagged.values() if tags), f"{page.name}: a marker without its block"
        for line, tags in tagged.items():
            for tag in tags:
                assert tag == "slow" or re.fullmatch(r"[a-z_][a-z0-9_]*", tag), f"{page.name}:{line}: bad tag {tag!r}"


def test_the_readme_and_docs_hold_python_examples_that_run_without_a_model():
    blocks = all_blocks()
    assert any(b.page == "README.md" for b in blocks)
    assert any(not b.tags for b in blocks), "at least one example must run in the default (fast) test run"
