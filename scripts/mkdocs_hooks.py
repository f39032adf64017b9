"""Hooks of the docs site (mkdocs.yml `hooks:`): pages generated at build time so they cannot go stale.

- `docs/index.md` holds `<!-- include: README.md -->`: the README, with its `docs/` links made
  relative to the site (one text for the repository front page and the site's home page).
- `docs/cli.md` holds `<!-- cli-reference -->`: every visible command of `retrieval-heads`, read
  from the Typer app itself (usage, description, each option with its choices and default).
- `::: retrieval_heads.NAME` (mkdocstrings) for a name the package exports lazily becomes the path
  of the module that defines it, read from the package's table of public names, so the API pages
  name the import a user writes and survive the modules moving.

`python scripts/mkdocs_hooks.py` prints the CLI reference (for a look without building the site).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INCLUDE_README = "<!-- include: README.md -->"
CLI_REFERENCE = "<!-- cli-reference -->"
PROG = "retrieval-heads"


def readme_for_site(text: str) -> str:
    """The README as a page of the site: `](docs/x.md)` becomes `](x.md)`, and the first heading
    is dropped (the site shows the page title)."""
    text = re.sub(r"\]\(docs/", "](", text)
    return re.sub(r"\A# [^\n]*\n", "", text)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no pipes, no raw HTML, one line."""
    return " ".join(text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").split())


def _command_section(name: str, cmd: Any, parent: Any, level: int) -> list[str]:
    import click

    ctx = click.Context(cmd, info_name=name, parent=parent)
    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    lines = [f"{'#' * level} `{ctx.command_path}`", ""]
    if cmd.help:
        lines += [inspect.cleandoc(cmd.help).replace("\b\n", ""), ""]
    lines += ["```", f"Usage: {usage}", "```", ""]
    rows = []
    for param in cmd.get_params(ctx):
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        record = param.get_help_record(ctx)  # Typer's arguments have one too (click's return None)
        if record is not None:
            rows.append(record)
    if rows:
        lines += ["| argument or option | description |", "|---|---|"]
        lines += [f"| `{opts}` | {_cell(text)} |" for opts, text in rows]
        lines.append("")
    return lines


def cli_reference() -> str:
    """Markdown for every visible command of the app, grouped as `retrieval-heads --help` groups them."""
    import click
    import typer

    from retrieval_heads.cli import app

    group = typer.main.get_command(app)
    root = click.Context(group, info_name=PROG)
    lines = _command_section(PROG, group, None, 2)
    panels: dict[str, list[str]] = {}
    for name in group.list_commands(root):  # type: ignore[attr-defined]
        cmd = group.get_command(root, name)  # type: ignore[attr-defined]
        if cmd is None or cmd.hidden:
            continue
        panel = getattr(cmd, "rich_help_panel", None) or "Commands"
        panels.setdefault(panel, []).extend(_command_section(name, cmd, root, 3))
    for panel, section in panels.items():
        lines += [f"## {panel}", "", *section]
    return "\n".join(lines)


def public_paths(markdown: str) -> str:
    """`::: retrieval_heads.detect` -> `::: retrieval_heads.detection.detect` (griffe reads the
    source and cannot follow the package's lazy `__getattr__`)."""
    import retrieval_heads

    table: dict[str, str] = retrieval_heads._LAZY

    def resolve(m: re.Match[str]) -> str:
        name = m.group(2)
        return f"{m.group(1)}retrieval_heads.{table[name]}.{name}" if name in table else m.group(0)

    return re.sub(r"^(:::[ \t]+)retrieval_heads\.(\w+)[ \t]*$", resolve, markdown, flags=re.M)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = public_paths(markdown)
    if INCLUDE_README in markdown:
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        markdown = markdown.replace(INCLUDE_README, readme_for_site(readme))
    if CLI_REFERENCE in markdown:
        markdown = markdown.replace(CLI_REFERENCE, cli_reference())
    return markdown


if __name__ == "__main__":
    print(cli_reference())
