"""`retrieval-heads merge`: combine shard/job run folders into one result."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def merge(
        runs: List[Path] = typer.Argument(..., help="run folders of one config (e.g. shards of a Slurm array)"),
        out: Path = typer.Option(..., "--out", "-o", help="folder for the merged run"),
        top: int = typer.Option(10, help="heads shown in the summary"),
    ) -> None:
        """Merge run folders (shards or separate jobs) into one result, in grid order."""
        from .cli import print_summary
        from .distributed import merge_runs

        result = merge_runs(runs, out)
        print_summary(result, top)
        typer.echo(f"merged {len(result.records)} samples from {len(runs)} run(s) into {out}")
