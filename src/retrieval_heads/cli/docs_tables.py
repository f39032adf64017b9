"""`retrieval-heads docs-tables`: rewrite the generated tables of README.md and docs/*.md from run
folders (see `retrieval_heads.docs_tables` for the marker syntax)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def docs_tables_cmd(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Markdown files with <!-- table: KIND SOURCE ... --> markers")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="write nothing; exit 1 with one line per out-of-date table")
    ] = False,
    snapshot: Annotated[
        list[Path] | None,
        typer.Option(
            "--snapshot",
            help="first copy this run folder's config.json, summary.json and table.md (never its records) "
            "into --snapshot-dir/<its name>/ (repeatable)",
        ),
    ] = None,
    snapshot_dir: Annotated[Path, typer.Option(help="where --snapshot copies run folders")] = Path("docs/runs"),
) -> None:
    """Regenerate the tables between <!-- table: ... --> and <!-- /table --> markers from run folders
    (relative to the current directory) or ref:<name> maps, each with the run's date and machine."""
    from .. import docs_tables as D
    from ..errors import ConfigError

    if not files and not snapshot:
        raise ConfigError("give the Markdown files to update (or --snapshot RUN)")
    if check and snapshot:
        raise ConfigError("--check writes nothing; run --snapshot without it")
    for run in snapshot or []:
        typer.echo(f"snapshot: {run} -> {D.snapshot(run, snapshot_dir)}")
    tables = D.update(files or [], check=check)
    stale = [t for t in tables if t.stale]
    if check:
        for t in stale:
            typer.echo(str(t), err=True)
        if stale:
            raise typer.Exit(1)
        typer.echo(f"{len(tables)} generated table(s) up to date in {len(files or [])} file(s)")
        return
    typer.echo(f"rewrote {len(stale)} of {len(tables)} generated table(s) in {len(files or [])} file(s)")
