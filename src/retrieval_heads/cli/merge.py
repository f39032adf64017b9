"""`retrieval-heads merge`: combine shard/job run folders into one result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .detect import print_summary
from .options import SummaryTop


def merge(
    runs: Annotated[list[Path], typer.Argument(help="run folders of one config (e.g. shards of a Slurm array)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the merged run")],
    top: SummaryTop = 10,
) -> None:
    """Merge run folders (shards or separate jobs) into one result, in grid order."""
    from ..distributed import merge_runs

    result = merge_runs(runs, out)
    print_summary(result, top)
    typer.echo(f"merged {len(result.records)} samples from {len(runs)} run(s) into {out}")
