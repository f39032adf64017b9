"""`retrieval-heads mask-eval`: task-eval on needle retrieval with a K sweep: the top-K retrieval
heads masked vs K random heads, with where the unmasked heads attend."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .options import (
    Chat,
    EvalNeedles,
    Haystack,
    MaxNewTokens,
    ScoreName,
    Scores,
    ScoresModel,
    comma_ints,
    mask_condition_args,
    null_figure,
    open_scored_model,
    optional_figure,
    parse_depths,
    parse_lengths,
    run_args,
    with_mask_options,
    with_model_options,
    with_run_options,
)


@with_model_options
@with_run_options
@with_mask_options
def mask_eval_cmd(
    scores: Scores,
    score: ScoreName = "copy",
    model: ScoresModel = None,
    mask_k: Annotated[
        str, typer.Option("--mask-k", "--k", help="numbers of masked heads (K), comma list; 0 = nothing masked")
    ] = "0,5,10,20,50,100",
    lengths: Annotated[str, typer.Option(help="document lengths in tokens: start:stop:count or a,b,c")] = "500,1000",
    depths: Annotated[str, typer.Option(help="needle depths in percent")] = "10,50,90",
    needles: EvalNeedles = None,
    haystack: Haystack = None,
    max_new_tokens: MaxNewTokens = 32,
    watch: Annotated[
        int, typer.Option(min=0, help="watched heads: the best unmasked heads whose attention is located")
    ] = 10,
    chat: Chat = True,
    mask_options: dict[str, Any] | None = None,
    run_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> None:
    """Causal test: needle retrieval with the top-K retrieval heads masked vs K random heads."""
    from ..detection import Grid
    from ..experiments.conditions import matching_mass
    from ..experiments.task_eval import TaskEvalConfig, mask_eval
    from ..needles import EVALUATION_NEEDLES, load_needles

    # The config checks every choice: one clear line before any model is loaded.
    conditions = mask_condition_args(mask_options)
    cfg = TaskEvalConfig(
        task="niah",
        ks=comma_ints(mask_k, "--mask-k"),
        **conditions,
        grid=Grid(
            parse_lengths(lengths),
            parse_depths(depths),
            tuple(load_needles(needles)) if needles else EVALUATION_NEEDLES,
        ),
        task_args={"path": str(haystack) if haystack else None, "max_new_tokens": max_new_tokens},
        chat=chat,
        watch=watch,
    )
    result, lm = open_scored_model(
        scores, model, score, model_options, check=lambda d: matching_mass(d, cfg.random_pool, bool(cfg.random_seeds))
    )
    run = run_args(lm, run_options, f"-mask-{conditions['method']}", scores, score)
    res = mask_eval(lm, result, cfg, **run)
    out = run["out"]
    with optional_figure():
        from ..plots.mask import plot_mask_eval

        plot_mask_eval(res, out / "mask_eval")
        null_figure(res, out)
    typer.echo(res.table())
    for ex in res.examples(per_kind=1):
        typer.echo(
            f"[{ex['error_kind']}] {ex['condition']} {ex['sample_id']}: answer {ex['answer']!r} -> "
            f"{ex['generated_text'].strip()!r}"
        )
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, mask_eval.png/.svg)")
