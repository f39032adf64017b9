"""`retrieval-heads grounding-eval`: does retrieval-head support catch hallucination? AUROC of the
answer scores for grounded vs ungrounded answers, against log-probability, entropy and all heads."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .options import (
    BootSamples,
    Chat,
    MaxNewTokens,
    ScoreName,
    Scores,
    ScoresModel,
    Watch,
    choices,
    comma_ints,
    open_scored_model,
    run_args,
    with_model_options,
    with_run_options,
)

ENGINES = ("fast", "reference")  # attribution.ENGINES, spelled here so that --help imports nothing heavy


@with_model_options
@with_run_options
def grounding_eval_cmd(
    scores: Scores,
    score: ScoreName = "copy",
    model: ScoresModel = None,
    watch: Watch = 10,
    lengths: Annotated[
        str, typer.Option(help="NIAH document lengths (natural failures), comma list")
    ] = "3000,5000,7600",
    mask_k: Annotated[int, typer.Option("--mask-k", min=0, help="top heads masked for the masked-failure set")] = 10,
    masked_lengths: Annotated[str, typer.Option(help="NIAH lengths of the masked set (empty: none)")] = "1000,2000",
    squad_answerable: Annotated[int, typer.Option(min=0, help="answerable SQuAD v2 dev questions drawn")] = 40,
    squad_unanswerable: Annotated[int, typer.Option(min=0, help="unanswerable SQuAD v2 dev questions drawn")] = 30,
    seed: Annotated[int, typer.Option(help="seed of the SQuAD draw and of the bootstrap")] = 0,
    max_new_tokens: MaxNewTokens = 32,
    engine: Annotated[
        str, typer.Option(metavar=choices(ENGINES), help="fast (SDPA + captured rows) or reference (eager, the oracle)")
    ] = "fast",
    chat: Chat = True,
    n_boot: BootSamples = 2000,
    run_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> None:
    """Does retrieval-head support catch hallucination? AUROC against log-probability, entropy and all heads."""
    from ..experiments.grounding import GroundingConfig, grounding_eval

    cfg = GroundingConfig(
        k=watch,
        lengths=comma_ints(lengths, "--lengths"),
        masked_k=mask_k,
        masked_lengths=comma_ints(masked_lengths, "--masked-lengths") if masked_lengths.strip() else (),
        squad_answerable=squad_answerable,
        squad_unanswerable=squad_unanswerable,
        seed=seed,
        max_new_tokens=max_new_tokens,
        engine=engine,
        chat=chat,
    )
    det, lm = open_scored_model(scores, model, score, model_options)
    run = run_args(lm, run_options, "-grounding", scores, score)
    res = grounding_eval(lm, det, cfg, **run, n_boot=n_boot, boot_seed=seed)
    typer.echo(f"{lm.spec.name}: AUROC of answer scores for grounded vs ungrounded answers")
    typer.echo(res.table())
    typer.echo(f"run folder: {run['out']} (summary.json, table.md, records.jsonl)")
