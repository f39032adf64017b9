"""`retrieval-heads finetune-eval`: retrieval heads before, during and after a fine-tune; and
`finetune-plot`: the trajectory figure of one or several such runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    Chat,
    Device,
    DType,
    Haystack,
    MaxNewTokens,
    Overwrite,
    Progress,
    Threads,
    default_run_folder,
    optional_figure,
    parse_depths,
    parse_lengths,
    setup_runtime,
)


def finetune_eval_cmd(
    condition: Annotated[
        str,
        typer.Option(help="continual (Paul Graham essays), instruct (GSM8K chat turns), control (see --control)"),
    ] = "continual",
    control: Annotated[
        str, typer.Option(help="mask (top-K retrieval heads masked while training) or shuffle (tokens shuffled)")
    ] = "mask",
    control_k: Annotated[int, typer.Option(min=1, help="heads masked by --control mask")] = 10,
    model: Annotated[str, typer.Option(help="alias, hub id, local folder or .gguf file")] = "smollm2-135m",
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = 100,
    seq_len: Annotated[int, typer.Option(min=8, help="tokens per training example")] = 768,
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    learning_rate: Annotated[float, typer.Option(help="peak learning rate (linear decay after warmup)")] = 1e-4,
    lora: Annotated[bool, typer.Option("--lora/--full", help="LoRA adapters (peft) or full fine-tuning")] = False,
    lora_r: Annotated[int, typer.Option(min=1)] = 16,
    watch_every: Annotated[int, typer.Option(min=1, help="steps between the callback's detections")] = 20,
    watch_lengths: Annotated[str, typer.Option(help="the callback's document lengths")] = "500,1000",
    watch_depths: Annotated[str, typer.Option(help="the callback's needle depths (%)")] = "10,50,90",
    detect_lengths: Annotated[str, typer.Option(help="lengths of the detections before and after")] = "500,1000,1500",
    detect_depths: Annotated[str, typer.Option(help="depths of the detections before and after")] = "0,50,100",
    haystack: Haystack = None,
    max_new_tokens: MaxNewTokens = 32,
    chat: Chat = True,
    seed: Annotated[int, typer.Option(help="data order, LoRA init, Trainer seed")] = 0,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>-ft-<condition>)")] = None,
    device: Device = "cpu",
    dtype: DType = "float32",
    threads: Threads = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Fine-tune a model and watch its retrieval heads: maps before/after, NIAH, trajectory."""
    from ..experiments.finetune import FinetuneConfig

    setup_runtime(threads)
    cfg = FinetuneConfig(
        condition=condition,
        control=control,
        control_k=control_k,
        steps=steps,
        seq_len=seq_len,
        batch_size=batch_size,
        learning_rate=learning_rate,
        lora=lora,
        lora_r=lora_r,
        seed=seed,
        watch_every=watch_every,
        watch_lengths=parse_lengths(watch_lengths),
        watch_depths=parse_depths(watch_depths),
        detect_lengths=parse_lengths(detect_lengths),
        detect_depths=parse_depths(detect_depths),
        max_new_tokens=max_new_tokens,
        chat=chat,
        haystack=str(haystack) if haystack else None,
    )
    cfg.validate()  # one clear line before any model is loaded
    if lora:
        from importlib.util import find_spec

        from ..errors import ConfigError

        if find_spec("peft") is None:
            raise ConfigError("--lora needs peft: pip install 'retrieval-heads[train]'")

    from ..experiments.finetune import finetune_eval
    from ..models import load_model

    lm = load_model(model, device=device, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]
    suffix = f"-ft-{condition}" + (f"-{control}" if condition == "control" else "") + ("-lora" if lora else "")
    out = out or default_run_folder(lm, suffix)
    res = finetune_eval(lm, cfg, out=out, overwrite=overwrite, show_progress=progress)
    with optional_figure():
        from ..plots.training import plot_training

        plot_training([res.to_dict()], out / "finetune_eval")
    typer.echo(res.table())
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, finetune_eval.png/.svg)")


def finetune_plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="finetune-eval run folders (one column each)")],
    out: Annotated[Path, typer.Option(help="figure stem: writes STEM.png and STEM.svg")] = Path("finetune_eval"),
) -> None:
    """The trajectory figure (paper Fig. 6 style) of finetune-eval runs, from their summary.json."""
    from ..errors import DataError
    from ..plots.training import plot_training
    from ..runs import SUMMARY_FILE
    from ..scorefile import read_json

    summaries = []
    for run in runs:
        s = read_json(run / SUMMARY_FILE)
        if not isinstance(s, dict) or s.get("kind") != "finetune-eval":
            raise DataError(f"{run}: not a finished finetune-eval run (no finetune-eval {SUMMARY_FILE})")
        summaries.append(s)
    for p in plot_training(summaries, out):
        typer.echo(str(p))
