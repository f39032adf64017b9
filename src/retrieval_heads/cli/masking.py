"""`retrieval-heads mask-eval`: mask the top-K retrieval heads vs K random heads on NIAH."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    Chat,
    Device,
    DType,
    EvalNeedles,
    Haystack,
    MaskPhase,
    MaxNewTokens,
    Overwrite,
    Progress,
    RandomPool,
    ScoreName,
    Scores,
    ScoresModel,
    Threads,
    check_mask_phase,
    check_random_pool,
    check_random_seeds,
    comma_ints,
    default_run_folder,
    load_scores,
    optional_figure,
    parse_depths,
    parse_lengths,
    scores_label,
    setup_runtime,
)


def mask_eval_cmd(
    scores: Scores,
    score: ScoreName = "copy",
    model: ScoresModel = None,
    k: Annotated[str, typer.Option("--k", help="numbers of masked heads, comma list")] = "0,5,10,20,50,100",
    random_seeds: Annotated[int, typer.Option(help="random-head draws per K (seeds 0..n-1); 0 = top heads only")] = 3,
    random_pool: RandomPool = "non-retrieval",
    method: Annotated[
        str, typer.Option(help="uniform (authors': zero query), zero (zero head output), mean")
    ] = "uniform",
    mask_phase: MaskPhase = "all",
    lengths: Annotated[str, typer.Option(help="document lengths in tokens: start:stop:count or a,b,c")] = "500,1000",
    depths: Annotated[str, typer.Option(help="needle depths in percent")] = "10,50,90",
    needles: EvalNeedles = None,
    haystack: Haystack = None,
    max_new_tokens: MaxNewTokens = 32,
    watch: Annotated[int, typer.Option(min=0, help="top unmasked heads whose attention is located")] = 10,
    chat: Chat = True,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>-mask-<method>)")] = None,
    device: Device = "cpu",
    dtype: DType = "float32",
    threads: Threads = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Causal test: needle retrieval with the top-K retrieval heads masked vs K random heads."""
    from ..errors import ConfigError
    from ..masking import METHODS

    setup_runtime(threads)
    # Cheap checks first: one clear line before any model is loaded.
    if method not in METHODS:
        raise ConfigError(f"unknown masking method {method!r}; choose from {', '.join(METHODS)}")
    check_mask_phase(mask_phase)
    ks = comma_ints(k, "--k")
    check_random_seeds(random_seeds)
    check_random_pool(random_pool)

    from ..experiments.mask_eval import MaskEvalConfig, mask_eval
    from ..models import load_model
    from ..needles import EVALUATION_NEEDLES, load_needles

    result, name = load_scores(scores, model, score)
    cfg = MaskEvalConfig(
        ks=ks,
        random_seeds=tuple(range(random_seeds)),
        method=method,
        phase=mask_phase,
        lengths=parse_lengths(lengths),
        depths=parse_depths(depths),
        needles=tuple(load_needles(needles)) if needles else EVALUATION_NEEDLES,
        max_new_tokens=max_new_tokens,
        chat=chat,
        haystack=str(haystack) if haystack else None,
        watch=watch,
        random_pool=random_pool,
    )
    lm = load_model(name, device=device, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]
    out = out or default_run_folder(lm, f"-mask-{method}")
    res = mask_eval(
        lm, result, cfg, out=out, overwrite=overwrite, show_progress=progress, scores_source=scores_label(scores, score)
    )
    with optional_figure():
        from ..plots.mask import plot_mask_eval

        plot_mask_eval(res, out / "mask_eval")
    typer.echo(res.table())
    for ex in res.examples(per_kind=1):
        typer.echo(
            f"[{ex['error_kind']}] {ex['condition']} {ex['sample_id']}: answer {ex['answer']!r} -> "
            f"{ex['generated_text'].strip()!r}"
        )
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, mask_eval.png/.svg)")
