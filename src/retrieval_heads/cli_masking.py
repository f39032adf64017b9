"""`retrieval-heads mask-eval`: mask the top-K retrieval heads vs K random heads on NIAH."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("mask-eval")(mask_eval_cmd)


def mask_eval_cmd(
    scores: Path = typer.Option(..., help="detection run folder or authors'-format score JSON"),
    model: Optional[str] = typer.Option(None, help="model (default: the model of the --scores run, else smollm2-135m)"),
    k: str = typer.Option("0,5,10,20,50,100", "--k", help="numbers of masked heads, comma list"),
    random_seeds: int = typer.Option(3, help="random-head draws per K (seeds 0..n-1); 0 = top heads only"),
    method: str = typer.Option("uniform", help="uniform (authors': zero query), zero (zero head output), mean"),
    mask_phase: str = typer.Option("all", help="all (prefill and decode) or decode (authors': decode steps only)"),
    lengths: str = typer.Option("500,1000", help="document lengths in tokens: start:stop:count or a,b,c"),
    depths: str = typer.Option("10,50,90", help="needle depths in percent"),
    needles: Optional[Path] = typer.Option(None, help="JSONL of {needle, question, answer} (default: evaluation needles)"),
    haystack: Optional[Path] = typer.Option(None, help="folder of .txt files or one file (default: Paul Graham essays)"),
    max_new_tokens: int = typer.Option(32, min=1),
    watch: int = typer.Option(10, min=0, help="top unmasked heads whose attention is located"),
    chat: bool = typer.Option(True, "--chat/--no-chat"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/<model>-mask-<method>)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    overwrite: bool = typer.Option(False, help="replace a run with a different config in --out"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Causal test: needle retrieval with the top-K retrieval heads masked vs K random heads."""
    from .cli import _setup
    from .detect import parse_range
    from .errors import ConfigError
    from .masking import METHODS, PHASES

    _setup(threads)
    # Cheap checks first: one clear line before any model is loaded.
    if method not in METHODS:
        raise ConfigError(f"unknown masking method {method!r}; choose from {', '.join(METHODS)}")
    if mask_phase not in PHASES:
        raise ConfigError(f"unknown mask phase {mask_phase!r}; choose from {', '.join(PHASES)}")
    try:
        ks = tuple(int(x) for x in k.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--k must be a comma list of integers, got {k!r}") from None
    if random_seeds < 0:
        raise ConfigError("--random-seeds must be >= 0")

    from .models import load_model
    from .needles import EVALUATION_NEEDLES, load_needles
    from .results import DetectionResult
    from .tasks.niah import MaskEvalConfig, mask_eval

    result = DetectionResult.load(scores)
    name = model or result.config.get("model") or "smollm2-135m"
    cfg = MaskEvalConfig(
        ks=ks, random_seeds=tuple(range(random_seeds)), method=method, phase=mask_phase,
        lengths=parse_range(lengths, integer=True), depths=parse_range(depths, integer=False),  # type: ignore[arg-type]
        needles=tuple(load_needles(needles)) if needles else EVALUATION_NEEDLES,
        max_new_tokens=max_new_tokens, chat=chat, haystack=str(haystack) if haystack else None, watch=watch,
    )
    lm = load_model(name, device=device, dtype=dtype, attn_implementation="sdpa")
    out = out or Path("runs") / f"{lm.spec.name.replace('/', '_')}-mask-{method}"
    res = mask_eval(lm, result, cfg, out=out, overwrite=overwrite, show_progress=progress,
                    scores_source=str(scores))
    typer.echo(res.table())
    for ex in res.examples(per_kind=1):
        typer.echo(f"[{ex['error_kind']}] {ex['condition']} {ex['sample_id']}: answer {ex['answer']!r} -> "
                   f"{ex['generated_text'].strip()!r}")
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, mask_eval.png/.svg)")
