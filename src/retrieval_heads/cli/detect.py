"""`retrieval-heads detect`: retrieval scores of every head from needle-in-a-haystack samples;
`print_summary` shows a detection result (also used by `merge`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .options import (
    DEFAULT_MODEL,
    BatchSize,
    Chat,
    Haystack,
    MaxNewTokens,
    ModelName,
    SummaryTop,
    choices,
    open_model,
    parse_depths,
    parse_lengths,
    run_args,
    setup_runtime,
    with_model_options,
    with_run_options,
)

ENGINE_NAMES = ("fast", "reference")  # engines.ENGINES, spelled here so that --help imports no torch
SPAN_NAMES = ("answer", "needle")  # engines.SPANS

# detect's own options (the shared ones come from options.py)
LENGTHS_HELP = (
    "document lengths in tokens: start:stop:count or a,b,c (default: on a CPU 4 lengths from 500 to 3000; "
    "on a CUDA GPU 6 lengths from 1000 up to the model's context)"
)
ENGINE_HELP = "fast (SDPA + KV cache + prefix reuse; proven equal) or reference (paper-faithful, eager)"
SPAN_HELP = "scored span: answer (the needle's answer tokens, the authors' scale) or needle (the whole sentence)"
UNTIL_STABLE_HELP = (
    "stop once the top-K heads are stable (mean bootstrap Jaccard >= --stable-jaccard); "
    "samples run in an interleaved order covering lengths and depths early"
)
Lengths = Annotated[str | None, typer.Option(help=LENGTHS_HELP)]
Depths = Annotated[str | None, typer.Option(help="needle depths in percent: start:stop:count or a,b,c")]
NeedlesFile = Annotated[Path | None, typer.Option(help="JSONL of {needle, question, answer}")]
Engine = Annotated[str, typer.Option(metavar=choices(ENGINE_NAMES), help=ENGINE_HELP)]
RecallThreshold = Annotated[float, typer.Option(help="keep a sample when ROUGE-1 recall of the answer > this")]
ShardOption = Annotated[str | None, typer.Option(help="run only shard i/n of the grid (merge shards with `merge`)")]
Span = Annotated[str, typer.Option(metavar=choices(SPAN_NAMES), help=SPAN_HELP)]
UntilStable = Annotated[int | None, typer.Option(help=UNTIL_STABLE_HELP)]
StableJaccard = Annotated[float, typer.Option(help="stability threshold for --until-stable")]

if TYPE_CHECKING:
    from ..results import DetectionResult


def print_summary(result: DetectionResult, k: int = 10) -> None:
    """What detect (and merge) show: the retrieval table of the grid (kept / run and mean recall
    per length and depth), then the top-k heads and the sparsity of the score map.

    No kept sample: one warning line on stderr instead of the heads (their scores are undefined).
    Fewer than `results.MIN_KEPT` kept samples: a warning with the top-10 stability before the
    table. Heads tied at score 0 are never listed as ranked heads.
    """
    from rich.console import Console
    from rich.table import Table

    from ..results import MIN_KEPT

    console = Console()
    print_retrieval_table(result, console)
    n_run = len(result.records) or result.n_kept
    if result.n_kept == 0:
        typer.echo(no_retrieval_warning(result), err=True)
        return
    stability = (
        f"{result.top_k_stability(10):.2f}"
        if result.has_per_sample and result.n_kept > 1
        else f"undefined with {result.n_kept} kept sample"
    )
    if result.n_kept < MIN_KEPT:
        typer.echo(
            f"warning: only {result.n_kept} of {n_run} samples kept (fewer than {MIN_KEPT}): the ranking below rests "
            f"on few samples (top-10 stability {stability}); add lengths, depths or needles where the model retrieves",
            err=True,
        )
    sp = result.sparsity()
    table = Table(title=f"Top {k} retrieval heads of {result.name} ({result.n_kept} kept of {n_run} samples)")
    for col in ("rank", "layer", "head", "retrieval score", "activation freq."):
        table.add_column(col, justify="right")
    top = result.top(k)
    ranked = [h for h in top if h.score > 0]  # heads tied at 0 have no rank among themselves
    for i, h in enumerate(ranked, 1):
        table.add_row(str(i), str(h.layer), str(h.head), f"{h.score:.3f}", f"{h.activation_frequency:.2f}")
    if ranked:
        console.print(table)
    if len(ranked) < len(top):
        console.print(f"{len(top) - len(ranked)} of the top {k} heads score 0 (ties: not ranked)")
    n = result.shape[0] * result.shape[1]
    gt01 = sp["(0.1,0.5]"] + sp[">0.5"]
    console.print(
        f"heads: {n}; score = 0: {sp['zero']:.1%}; score > 0.1: {gt01:.1%} "
        f"({len(result.retrieval_heads())} retrieval heads); score > 0.5: {sp['>0.5']:.1%}"
    )
    if result.has_per_sample and result.n_kept > 1:
        console.print(f"top-10 stability (mean Jaccard over 1000 bootstrap resamples of kept samples): {stability}")
    for name in result.score_names()[1:]:
        other = result.with_score(name)
        heads = ", ".join(f"L{h.layer}H{h.head} {h.score:.3f}" for h in other.top(5))
        console.print(f"top 5 by {name}: {heads}")


def print_retrieval_table(result: DetectionResult, console: Any) -> None:
    """Kept / run and mean answer recall per document length (rows) and needle depth (columns)."""
    from rich.table import Table

    cells = {(c["length"], c["depth"]): c for c in result.retrieval_table()}
    if not cells:
        return
    depths = sorted({d for _, d in cells})
    console.print("Retrieved needles by length and depth (kept / run, mean recall):")
    table = Table()
    table.add_column("length", justify="right")
    for d in depths:
        table.add_column(f"depth {d:g}", justify="right")
    for length in sorted({length for length, _ in cells}):
        row = [cells.get((length, d)) for d in depths]
        table.add_row(
            str(length),
            *("" if c is None else f"{c['kept']}/{c['run']} {c['mean_recall'] or 0:.2f}" for c in row),
        )
    console.print(table)


def no_retrieval_warning(result: DetectionResult) -> str:
    """One line: no sample was retrieved, the recall rule, where the answers were farthest from the
    needle (lowest mean recall per length and per depth), what to try."""
    import numpy as np

    table = result.retrieval_table()
    config = result.config
    worst = []
    for axis in ("length", "depth") if len({(c["length"], c["depth"]) for c in table}) > 1 else ():
        recall: dict[Any, list[float]] = {}
        for c in table:
            recall.setdefault(c[axis], []).extend([c["mean_recall"] or 0.0] * c["run"])
        at, values = min(recall.items(), key=lambda kv: (float(np.mean(kv[1])), -kv[0]))
        worst.append(f"{axis} {at:g} (mean recall {np.mean(values):.2f})")
    where = f"; lowest recall at {' and '.join(worst)}" if worst else ""
    threshold = config.get("recall_threshold")
    rule = f" (kept: answer recall > {threshold})" if threshold is not None else ""
    style = "--no-chat" if config.get("chat", True) else "--chat"
    return (
        f"warning: the model retrieved none of the needles: 0 of {len(result.records)} samples kept{rule}{where}; "
        f"the head scores are undefined, so no head table is shown. Try shorter --lengths, a lower "
        f"--recall-threshold or the other prompt style ({style})."
    )


@with_model_options
@with_run_options
def detect(
    model: ModelName = DEFAULT_MODEL,
    lengths: Lengths = None,
    depths: Depths = None,
    needles: NeedlesFile = None,
    haystack: Haystack = None,
    engine: Engine = "fast",
    max_new_tokens: MaxNewTokens = 50,
    recall_threshold: RecallThreshold = 0.5,
    chat: Chat = True,
    batch_size: BatchSize = None,
    top: SummaryTop = 10,
    shard: ShardOption = None,
    span: Span = "answer",
    until_stable: UntilStable = None,
    stable_jaccard: StableJaccard = 0.9,
    run_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> None:
    """Detect retrieval heads with needle-in-a-haystack samples.

    After the run: kept / run and mean answer recall per length and depth, then the top heads.

    Fewer than 5 kept samples: the heads with a warning. None kept: one warning line, scores saved as undefined.

    Exit status 0 when the run finishes, also when no needle was retrieved; 2 on bad input.
    """
    options = dict(model_options or {})
    setup_runtime(options.get("threads"))  # quiet logs before the heavy imports
    from .. import detection as D
    from ..distributed import Shard, torchrun_rank
    from ..models import resolve_device
    from ..needles import load_needles

    cfg = D.DetectConfig(  # checks its choices before the model loads
        engine=engine,
        max_new_tokens=max_new_tokens,
        recall_threshold=recall_threshold,
        chat=chat,
        haystack=str(haystack) if haystack else None,
        batch_size=batch_size,
        span=span,
        until_stable=until_stable,
        stable_jaccard=stable_jaccard,
    )
    if torchrun_rank() and resolve_device(options.get("device", "auto")) == "cuda":
        options["device"] = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per torchrun process
    lm = open_model(model, attn_implementation="eager" if engine == "reference" else "sdpa", **options)
    base = D.default_grid(lm.spec, str(next(lm.model.parameters()).device))
    grid = D.Grid(
        lengths=parse_lengths(lengths) if lengths else base.lengths,
        depths=parse_depths(depths) if depths else base.depths,
        needles=tuple(load_needles(needles)) if needles else base.needles,
    )
    run = run_args(lm, run_options)
    result = D.detect(lm, grid, cfg, **run, shard=Shard.parse(shard) if shard else None)
    if (torchrun_rank() or (0, 1))[0] != 0:
        return  # under torchrun only rank 0 reports
    print_summary(result, top)
    typer.echo(f"run folder: {run['out']}")
