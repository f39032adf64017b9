"""`retrieval-heads task-eval`: downstream tasks (QA, CoT) with the top-K retrieval heads masked
vs K random heads vs nothing masked; `task-plot` draws several finished runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import (
    Chat,
    Device,
    DType,
    MaskPhase,
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
    default_run_folder,
    load_scores,
    optional_figure,
    scores_label,
    setup_runtime,
)

PLOT_STEM = "task_eval"  # the figure of a task-eval run folder: task_eval.png/.svg


def task_eval_cmd(
    task: Annotated[str, typer.Option("--task", help="extractive-qa, hotpotqa, gsm8k, mmlu, arith-chain")],
    scores: Scores,
    score: ScoreName = "copy",
    k: Annotated[int, typer.Option("--k", help="number of masked heads")] = 20,
    random_seeds: Annotated[int, typer.Option(help="random-head draws (seeds 0..n-1); 0 = no random control")] = 2,
    random_pool: RandomPool = "non-retrieval",
    prompt: Annotated[str, typer.Option(help="answer-only or cot")] = "answer-only",
    limit: Annotated[int | None, typer.Option(help="number of examples (default: the task's, 40-60)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the example draw (and of generated tasks)")] = 0,
    model: ScoresModel = None,
    context_tokens: Annotated[int, typer.Option(help="extractive-qa: context length in model tokens")] = 1000,
    steps: Annotated[int, typer.Option(help="arith-chain: operations per problem")] = 3,
    data: Annotated[
        Path | None, typer.Option(help="data file/folder in the task's format (default: the PyPI package's)")
    ] = None,
    method: Annotated[str, typer.Option(help="uniform (authors': zero query), zero (zero head output)")] = "uniform",
    mask_phase: MaskPhase = "all",
    chat: Chat = True,
    n_boot: Annotated[int, typer.Option(min=100, help="bootstrap resamples")] = 2000,
    out: Annotated[
        Path | None, typer.Option(help="run folder (default runs/<model>-task-<task>-<prompt>-k<K>)")
    ] = None,
    device: Device = "cpu",
    dtype: DType = "float32",
    threads: Threads = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:
    """Task accuracy with no mask, the top-K retrieval heads masked and K random heads masked."""
    from ..errors import ConfigError
    from ..masking import METHODS
    from ..tasks.base import PROMPT_STYLES
    from ..tasks.registry import TASKS, get_task, task_names

    setup_runtime(threads)
    # Cheap checks first: one clear line before any model is loaded.
    names = task_names()
    if task not in names:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(names)}")
    if prompt not in PROMPT_STYLES:
        raise ConfigError(f"unknown prompt style {prompt!r}; choose from {', '.join(PROMPT_STYLES)}")
    if method not in METHODS or method == "mean":
        raise ConfigError(f"unknown masking method {method!r}; choose from uniform, zero")
    check_mask_phase(mask_phase)
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    check_random_seeds(random_seeds)
    check_random_pool(random_pool)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    args: dict = {}
    init = TASKS[task].__init__.__code__.co_varnames
    if "context_tokens" in init:
        args["context_tokens"] = context_tokens
    if "steps" in init:
        args["steps"] = steps
    if data is not None:
        if "path" not in init:
            raise ConfigError(f"task {task!r} generates its data; --data does not apply")
        args["path"] = str(data)
    get_task(task, **args)  # validates task arguments
    if data is not None and not data.exists():
        raise ConfigError(f"--data {data} does not exist")

    from ..experiments.task_eval import TaskEvalConfig, task_eval
    from ..models import load_model

    det, name = load_scores(scores, model, score)
    cfg = TaskEvalConfig(
        task=task,
        style=prompt,
        k=k,
        random_seeds=tuple(range(random_seeds)),
        limit=limit,
        seed=seed,
        task_args=args,
        method=method,
        phase=mask_phase,
        chat=chat,
        random_pool=random_pool,
    )
    lm = load_model(name, device=device, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]
    out = out or default_run_folder(lm, f"-task-{task}-{prompt}-k{k}")
    res = task_eval(
        lm,
        det,
        cfg,
        out=out,
        overwrite=overwrite,
        show_progress=progress,
        scores_source=scores_label(scores, score),
        n_boot=n_boot,
    )
    with optional_figure():
        from ..plots.task import plot_task_eval

        plot_task_eval([res], out / PLOT_STEM)
    typer.echo(f"{lm.spec.name} {task} ({prompt}), K={k}:")
    typer.echo(res.table())
    for ex in res.examples(2):
        typer.echo(
            f"[{ex['doc_id']}] gold {ex['answers'][0]!r}: none {ex['none'].strip()[:80]!r} -> "
            f"top-{k} {ex['top'].strip()[:80]!r}"
        )
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, {PLOT_STEM}.png/.svg)")


def task_plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="finished task-eval run folders")],
    out: Annotated[Path, typer.Option(help="output stem (writes .png and .svg)")] = Path("task_eval"),
    metric: Annotated[str | None, typer.Option(help="metric to plot (default: each run's primary)")] = None,
    title: Annotated[str | None, typer.Option()] = None,
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
