"""`retrieval-heads passage-rank`: HotpotQA paragraphs ranked by the attention the heads pay from
the question (QRHead-like), recall@2 against BM25."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .options import (
    BootSamples,
    Chat,
    ScoreName,
    Scores,
    ScoresModel,
    open_scored_model,
    run_args,
    with_model_options,
    with_run_options,
)


@with_model_options
@with_run_options
def passage_rank_cmd(
    scores: Scores,
    score: ScoreName = "copy",
    model: ScoresModel = None,
    watch: Annotated[int, typer.Option("--watch", min=1, help="heads of each head set: the top K of a score")] = 10,
    limit: Annotated[int, typer.Option(min=1, help="HotpotQA questions")] = 50,
    seed: Annotated[int, typer.Option(help="seed of the question draw and of the bootstrap")] = 0,
    chat: Chat = True,
    n_boot: BootSamples = 2000,
    run_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> None:
    """Rank HotpotQA paragraphs by the attention the heads pay from the question; recall@2 vs BM25."""
    from ..experiments.passages import PassageConfig, passage_rank

    det, lm = open_scored_model(scores, model, score, model_options)
    run = run_args(lm, run_options, "-passages", scores, score)
    config = PassageConfig(limit=limit, seed=seed, k=watch, chat=chat)
    res = passage_rank(lm, det, config, **run, n_boot=n_boot, boot_seed=seed)
    typer.echo(f"{lm.spec.name}: HotpotQA paragraph ranking, recall@2")
    typer.echo(res.table())
    typer.echo(f"run folder: {run['out']} (summary.json, table.md, records.jsonl)")
