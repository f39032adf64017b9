"""`retrieval-heads refs`: the shipped score maps (`ref:<name>`), with their model's shape and
where each comes from."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer


def refs_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="print the list as JSON instead of a table")] = False,
) -> None:
    """List the shipped score maps: use one as `--scores ref:<name>` (export-heads, kv-eval, mask-eval,
    attribute) or as a run in analyze, compare and report."""
    from rich.console import Console
    from rich.table import Table

    from ..models import default_model_note
    from ..reference import reference_info, reference_names

    infos = [reference_info(n) for n in reference_names()]
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in infos], indent=1))
        return
    t = Table(title="Shipped score maps (use as ref:<name>)")
    t.add_column("name", no_wrap=True)
    for col in ("layers x heads (KV)", "kept"):
        t.add_column(col, justify="right")
    t.add_column("from", overflow="fold")
    for i in infos:  # the score, source file and commit of each map are in --json
        kv = "?" if i.n_kv_heads is None else str(i.n_kv_heads)
        folder = (
            "our detect run" if i.source.startswith("retrieval-heads") else i.origin.split("@")[0].rsplit("/", 1)[0]
        )
        t.add_row(i.name, f"{i.n_layers} x {i.n_heads} ({kv})", str(i.n_kept), folder)
    Console().print(t)
    typer.echo(
        "KV heads: from each model's config.json (refs --json names it); kept: needle samples behind the map; "
        f"{default_model_note()}"
    )
