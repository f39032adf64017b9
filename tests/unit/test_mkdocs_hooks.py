"""The docs site's generated pages (scripts/mkdocs_hooks.py): the CLI reference holds every visible
command, the home page is the README with site links, and the API page names public imports."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_documents_every_visible_command_and_its_options(hooks):
    import click
    import typer

    from retrieval_heads.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="retrieval-heads")
    commands = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
    page = hooks.cli_reference()
    documented = set(re.findall(r"^### `retrieval-heads ([\w-]+)`$", page, re.M))
    assert documented == {name for name, cmd in commands.items() if not cmd.hidden}
    detect = page.split("### `retrieval-heads detect`", 1)[1].split("\n### ", 1)[0]
    for param in commands["detect"].params:
        if not param.hidden and param.name != "help":
            longest = max(param.opts, key=len)
            assert re.search(rf"^\| `[^`]*{re.escape(longest)}\b", detect, re.M), longest


def test_readme_becomes_the_home_page_with_site_links(hooks):
    text = "# retrieval-heads\n\nSee [the method](docs/method.md) and ![fig](docs/figures/a.png).\n"
    assert hooks.readme_for_site(text) == "\nSee [the method](method.md) and ![fig](figures/a.png).\n"
    page = hooks.on_page_markdown("# Home\n\n<!-- include: README.md -->\n", None, None, None)
    assert "<!-- test-command -->" in page and "](docs/" not in page


def test_public_names_resolve_to_their_defining_module(hooks):
    import retrieval_heads

    out = hooks.public_paths("::: retrieval_heads.detect\n\n::: retrieval_heads.integrations.transformers.X\n")
    module = retrieval_heads._LAZY["detect"]
    assert out == f"::: retrieval_heads.{module}.detect\n\n::: retrieval_heads.integrations.transformers.X\n"


def test_api_page_covers_the_names_a_user_starts_from():
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    objects = set(re.findall(r"^:::\s+retrieval_heads\.(?:[\w.]+\.)?(\w+)\s*$", api, re.M))
    needed = {"load_model", "detect", "Grid", "DetectionResult", "HeadSparseCache", "RetrievalHeadsPress"}
    assert needed | {"RetrievalHeadsCallback", "mask_eval", "task_eval", "kv_eval", "attribute"} <= objects
