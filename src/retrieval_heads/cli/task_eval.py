"""`retrieval-heads task-eval`: a task (QA, CoT, needle retrieval) with the top-K retrieval heads
masked vs K random heads vs nothing masked; `task-plot` draws several finished runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .options import (
    BootSamples,
    Chat,
    ScoreName,
    Scores,
    ScoresModel,
    choices,
    mask_condition_args,
    null_figure,
    open_scored_model,
    optional_figure,
    run_args,
    with_mask_options,
    with_model_options,
    with_run_options,
)

PLOT_STEM = "task_eval"  # the figure of a task-eval run folder: task_eval.png/.svg
TASK_NAMES = (  # tasks.registry (built in)
    *("arith-chain", "extractive-qa", "gsm8k", "hotpotqa", "mmlu", "niah"),
    *("ruler_niah_multikey", "ruler_niah_multiquery", "ruler_niah_multivalue", "ruler_niah_single"),
    *("ruler_qa", "ruler_vt"),
)
PROMPT_STYLES = ("answer-only", "cot")  # tasks.base.PROMPT_STYLES


@with_model_options
@with_run_options
@with_mask_options
def task_eval_cmd(
    task: Annotated[
        str, typer.Option("--task", metavar=choices(TASK_NAMES), help="the task (or one added with register_task)")
    ],
    scores: Scores,
    score: ScoreName = "copy",
    mask_k: Annotated[int, typer.Option("--mask-k", "--k", help="number of masked heads (K), at least 1")] = 20,
    prompt: Annotated[
        str, typer.Option(metavar=choices(PROMPT_STYLES), help="answer at once, or reason first (chain of thought)")
    ] = "answer-only",
    limit: Annotated[int | None, typer.Option(help="number of examples (default: the task's, 18-60)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the example draw (and of generated tasks)")] = 0,
    model: ScoresModel = None,
    task_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--task-arg",
            metavar="KEY=VALUE",
            help="an argument of the task, repeatable: extractive-qa context_tokens=2000, arith-chain steps=5, "
            "path=FILE (its data file)",
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="the task's data file/folder (= --task-arg path=...; default: the package's)")
    ] = None,
    chat: Chat = True,
    n_boot: BootSamples = 2000,
    mask_options: dict[str, Any] | None = None,
    run_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> None:
    """Task accuracy with no mask, the top-K retrieval heads masked and K random heads masked."""
    from ..errors import ConfigError
    from ..experiments.conditions import matching_mass
    from ..experiments.task_eval import TaskEvalConfig, task_eval
    from ..tasks.registry import parse_task_args

    # The config checks every choice and the task's arguments: one line before any model is loaded.
    args = parse_task_args(task, [*(task_arg or []), *([f"path={data}"] if data is not None else [])])
    conditions = mask_condition_args(mask_options)
    if mask_k < 1:
        raise ConfigError(f"--mask-k must be >= 1, got {mask_k}")
    cfg = TaskEvalConfig(
        task=task,
        ks=(0, mask_k),
        **conditions,
        style=prompt,  # type: ignore[arg-type]
        limit=limit,
        seed=seed,
        task_args=args,
        chat=chat,
    )
    if "path" in args and not Path(args["path"]).exists():
        raise ConfigError(f"data {args['path']} does not exist")
    det, lm = open_scored_model(
        scores, model, score, model_options, check=lambda d: matching_mass(d, cfg.random_pool, bool(cfg.random_seeds))
    )
    run = run_args(lm, run_options, f"-task-{task}-{prompt}-k{mask_k}", scores, score)
    res = task_eval(lm, det, cfg, **run, n_boot=n_boot)
    out = run["out"]
    with optional_figure():
        from ..plots.task import plot_task_eval

        plot_task_eval([res], out / PLOT_STEM)
        null_figure(res, out)
    typer.echo(f"{lm.spec.name} {task} ({prompt}), K={mask_k}:")
    typer.echo(res.table())
    for ex in res.examples(2):
        typer.echo(
            f"[{ex['doc_id']}] gold {ex['answers'][0]!r}: none {ex['none'].strip()[:80]!r} -> "
            f"top-{mask_k} {ex['top'].strip()[:80]!r}"
        )
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, {PLOT_STEM}.png/.svg)")


def task_plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="finished task-eval run folders")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output stem (writes .png and .svg)")] = Path("task_eval"),
    metric: Annotated[str | None, typer.Option(help="metric to plot (default: each run's primary)")] = None,
    title: Annotated[str | None, typer.Option(help="figure title (default: the model and tasks)")] = None,
) -> None:
    """Draw several task-eval runs as grouped bars (paper Fig. 8 / Fig. 10)."""
    from ..errors import DataError
    from ..experiments.task_eval import TaskEvalResult
    from ..plots.task import plot_task_eval
    from ..runs import CONFIG_FILE

    for r in runs:
        if not (r / CONFIG_FILE).exists():
            raise DataError(f"{r} is not a task-eval run folder (no {CONFIG_FILE})")
    results = [TaskEvalResult.load(r) for r in runs]
    for p in plot_task_eval(results, out, metric=metric, title=title):
        typer.echo(str(p))
