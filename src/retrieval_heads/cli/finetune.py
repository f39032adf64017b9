"""`retrieval-heads finetune-eval`: retrieval heads before, during and after a fine-tune; and
`finetune-plot`: the trajectory figure of one or several such runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .options import (
    DEFAULT_MODEL,
    Chat,
    Haystack,
    MaxNewTokens,
    ModelName,
    choices,
    open_model,
    optional_figure,
    parse_depths,
    parse_lengths,
    run_args,
    with_model_options,
    with_run_options,
)

CONDITIONS = ("continual", "instruct", "control")  # experiments.finetune.CONDITIONS
CONTROLS = ("mask", "shuffle")  # experiments.finetune.CONTROLS
CONDITION_HELP = "continual (Paul Graham essays), instruct (GSM8K chat turns), control (see --control)"
CONTROL_HELP = "mask (top-K retrieval heads masked while training) or shuffle (tokens shuffled)"
Condition = Annotated[str, typer.Option(metavar=choices(CONDITIONS), help=CONDITION_HELP)]
Control = Annotated[str, typer.Option(metavar=choices(CONTROLS), help=CONTROL_HELP)]


@with_model_options
@with_run_options
def finetune_eval_cmd(
    condition: Condition = "continual",
    control: Control = "mask",
    control_k: Annotated[int, typer.Option(min=1, help="heads masked by --control mask")] = 10,
    model: ModelName = DEFAULT_MODEL,
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = 100,
    seq_len: Annotated[int, typer.Option(min=8, help="tokens per training example")] = 768,
    batch_size: Annotated[int, typer.Option(min=1, help="training examples per optimizer step")] = 1,
    learning_rate: Annotated[float, typer.Option(help="peak learning rate (linear decay after warmup)")] = 1e-4,
    lora: Annotated[bool, typer.Option("--lora/--full", help="LoRA adapters (peft) or full fine-tuning")] = False,
    lora_r: Annotated[int, typer.Option(min=1, help="LoRA rank")] = 16,
    watch_every: Annotated[int, typer.Option(min=1, help="steps between the callback's detections")] = 20,
    watch_lengths: Annotated[str, typer.Option(help="the callback's document lengths")] = "500,1000",
    watch_depths: Annotated[str, typer.Option(help="the callback's needle depths (%)")] = "10,50,90",
    detect_lengths: Annotated[str, typer.Option(help="lengths of the detections before and after")] = "500,1000,1500",
    detect_depths: Annotated[str, typer.Option(help="depths of the detections before and after")] = "0,50,100",
    haystack: Haystack = None,
    max_new_tokens: MaxNewTokens = 32,
    chat: Chat = True,
    seed: Annotated[int, typer.Option(help="data order, LoRA init, Trainer seed")] = 0,
    run_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> None:
    """Fine-tune a model and watch its retrieval heads: maps before/after, NIAH, trajectory."""
    from ..detection import Grid
    from ..experiments.finetune import FinetuneConfig
    from ..needles import DETECTION_NEEDLES, EVALUATION_NEEDLES

    cfg = FinetuneConfig(  # checks every choice: one clear line before any model is loaded
        condition=condition,  # type: ignore[arg-type]  # CLI strings, checked by the config
        control=control,  # type: ignore[arg-type]
        control_k=control_k,
        steps=steps,
        seq_len=seq_len,
        batch_size=batch_size,
        learning_rate=learning_rate,
        lora=lora,
        lora_r=lora_r,
        seed=seed,
        watch_every=watch_every,
        watch_grid=Grid(parse_lengths(watch_lengths), parse_depths(watch_depths), EVALUATION_NEEDLES[:2]),
        detect_grid=Grid(parse_lengths(detect_lengths), parse_depths(detect_depths), DETECTION_NEEDLES),
        max_new_tokens=max_new_tokens,
        chat=chat,
        haystack=str(haystack) if haystack else None,
    )
    if lora:
        from importlib.util import find_spec

        from ..errors import ConfigError

        if find_spec("peft") is None:
            raise ConfigError("--lora needs peft: pip install 'retrieval-heads[train]'")

    from ..experiments.finetune import finetune_eval

    lm = open_model(model, attn_implementation="sdpa", **(model_options or {}))
    suffix = f"-ft-{condition}" + (f"-{control}" if condition == "control" else "") + ("-lora" if lora else "")
    run = run_args(lm, run_options, suffix)
    res = finetune_eval(lm, cfg, **run)
    out = run["out"]
    with optional_figure():
        from ..plots.training import plot_training

        plot_training([res.to_dict()], out / "finetune_eval")
    typer.echo(res.table())
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, finetune_eval.png/.svg)")


def finetune_plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="finetune-eval run folders (one column each)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="figure stem: writes STEM.png and STEM.svg")] = Path(
        "finetune_eval"
    ),
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
