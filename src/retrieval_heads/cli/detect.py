"""`retrieval-heads detect`: retrieval scores of every head from needle-in-a-haystack samples;
`print_summary` shows a detection result (also used by `merge`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .options import (
    DEFAULT_MODEL,
    Chat,
    Device,
    DType,
    MaxNewTokens,
    Overwrite,
    Progress,
    SummaryTop,
    Threads,
    default_run_folder,
    parse_depths,
    parse_lengths,
    setup_runtime,
)

if TYPE_CHECKING:
    from ..results import DetectionResult


def print_summary(result: DetectionResult, k: int = 10) -> None:
    """The top-k heads as a table, then the sparsity of the score map in one line."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sp = result.sparsity()
    table = Table(
        title=f"Top {k} retrieval heads of {result.name} "
        f"({result.n_kept} kept of {len(result.records) or result.n_kept} samples)"
    )
    for col in ("rank", "layer", "head", "retrieval score", "activation freq."):
        table.add_column(col, justify="right")
    for i, h in enumerate(result.top(k), 1):
        table.add_row(str(i), str(h.layer), str(h.head), f"{h.score:.3f}", f"{h.activation_frequency:.2f}")
    console.print(table)
    n = result.shape[0] * result.shape[1]
    gt01 = sp["(0.1,0.5]"] + sp[">0.5"]
    console.print(
        f"heads: {n}; score = 0: {sp['zero']:.1%}; score > 0.1: {gt01:.1%} "
        f"({len(result.retrieval_heads())} retrieval heads); score > 0.5: {sp['>0.5']:.1%}"
    )
    if result.has_per_sample and result.n_kept > 1:
        console.print(
            f"top-10 stability (mean Jaccard over 1000 bootstrap resamples of kept samples): "
            f"{result.top_k_stability(10):.2f}"
        )
    for name in result.score_names()[1:]:
        other = result.with_score(name)
        heads = ", ".join(f"L{h.layer}H{h.head} {h.score:.3f}" for h in other.top(5))
        console.print(f"top 5 by {name}: {heads}")


def detect(
    model: Annotated[
        str, typer.Option(help="alias (smollm2-135m, gemma3-270m), hub id, folder or .gguf file")
    ] = DEFAULT_MODEL,
    lengths: Annotated[
        str | None,
        typer.Option(
            help="document lengths in tokens: start:stop:count or a,b,c (default: fits the model and a CPU budget)"
        ),
    ] = None,
    depths: Annotated[str | None, typer.Option(help="needle depths in percent: start:stop:count or a,b,c")] = None,
    needles: Annotated[Path | None, typer.Option(help="JSONL of {needle, question, answer}")] = None,
    haystack: Annotated[
        Path | None, typer.Option(help="folder of .txt files or one file (default: Paul Graham essays)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>)")] = None,
    engine: Annotated[
        str,
        typer.Option(help="fast (SDPA + KV cache + prefix reuse; proven equal) or reference (paper-faithful, eager)"),
    ] = "fast",
    max_new_tokens: MaxNewTokens = 50,
    recall_threshold: Annotated[
        float, typer.Option(help="keep a sample when ROUGE-1 recall of the answer > this")
    ] = 0.5,
    chat: Chat = True,
    device: Device = "cpu",
    dtype: DType = "float32",
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="fast engine: samples per batch, left-padded; each still prefilled from its shared prefix, "
            "then decoded together (default: 1 on a CPU, 8 on a GPU)"
        ),
    ] = None,
    threads: Threads = None,
    top: SummaryTop = 10,
    shard: Annotated[
        str | None, typer.Option(help="run only shard i/n of the grid (merge shards with `merge`)")
    ] = None,
    device_map: Annotated[
        str | None,
        typer.Option(help="accelerate device map, e.g. auto: spread a large model over the node's devices"),
    ] = None,
    overwrite: Overwrite = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model's own code from the hub")] = False,
    progress: Progress = True,
    span: Annotated[
        str,
        typer.Option(
            help="scored span: answer (the needle's answer tokens, the authors' scale) or needle (the whole sentence)"
        ),
    ] = "answer",
    until_stable: Annotated[
        int | None,
        typer.Option(
            help="stop once the top-K heads are stable (mean bootstrap Jaccard >= --stable-jaccard); "
            "samples run in an interleaved order covering lengths and depths early"
        ),
    ] = None,
    stable_jaccard: Annotated[float, typer.Option(help="stability threshold for --until-stable")] = 0.9,
) -> None:
    """Detect retrieval heads with needle-in-a-haystack samples."""
    setup_runtime(threads)
    from ..engines import SPANS
    from ..errors import ConfigError

    if span not in SPANS:
        raise ConfigError(f"unknown span {span!r}; choose from {', '.join(SPANS)}")
    if until_stable is not None and until_stable < 1:
        raise ConfigError(f"--until-stable needs K >= 1, got {until_stable}")
    if not 0 < stable_jaccard <= 1:
        raise ConfigError(f"--stable-jaccard must lie within (0, 1], got {stable_jaccard}")
    from .. import detection as D
    from ..distributed import Shard, torchrun_rank
    from ..models import load_model
    from ..needles import load_needles

    if torchrun_rank() and device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per torchrun process
    lm = load_model(
        model,
        device=device,
        dtype=dtype,  # type: ignore[arg-type]  # a CLI string; load_model rejects an unknown dtype in one line
        attn_implementation="eager" if engine == "reference" else "sdpa",
        trust_remote_code=trust_remote_code,
        device_map=device_map,
    )
    base = D.default_grid(lm.spec)
    grid = D.Grid(
        lengths=parse_lengths(lengths) if lengths else base.lengths,
        depths=parse_depths(depths) if depths else base.depths,
        needles=tuple(load_needles(needles)) if needles else base.needles,
    )
    cfg = D.DetectConfig(
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
    out = out or default_run_folder(lm)
    result = D.detect(
        lm, grid, cfg, out=out, overwrite=overwrite, show_progress=progress, shard=Shard.parse(shard) if shard else None
    )
    if (torchrun_rank() or (0, 1))[0] != 0:
        return  # under torchrun only rank 0 reports
    print_summary(result, top)
    typer.echo(f"run folder: {out}")
