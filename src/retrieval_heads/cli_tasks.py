"""`retrieval-heads task-eval`: downstream tasks (QA, CoT) with the top-K retrieval heads masked
vs K random heads vs nothing masked; `task-plot` draws several finished runs side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("task-eval")(task_eval_cmd)
    app.command("task-plot")(task_plot_cmd)


def task_eval_cmd(
    task: str = typer.Option(..., "--task", help="extractive-qa, hotpotqa, gsm8k, mmlu, arith-chain"),
    scores: Path = typer.Option(..., help="detection run folder or authors'-format score JSON"),
    k: int = typer.Option(20, "--k", help="number of masked heads"),
    random_seeds: int = typer.Option(2, help="random-head draws (seeds 0..n-1); 0 = no random control"),
    prompt: str = typer.Option("answer-only", help="answer-only or cot"),
    limit: Optional[int] = typer.Option(None, help="number of examples (default: the task's, 40-60)"),
    seed: int = typer.Option(0, help="seed of the example draw (and of generated tasks)"),
    model: Optional[str] = typer.Option(None, help="model (default: the model of the --scores run, else smollm2-135m)"),
    context_tokens: int = typer.Option(1000, help="extractive-qa: context length in model tokens"),
    steps: int = typer.Option(3, help="arith-chain: operations per problem"),
    data: Optional[Path] = typer.Option(None, help="data file/folder in the task's format (default: the PyPI package's)"),
    method: str = typer.Option("uniform", help="uniform (authors': zero query), zero (zero head output)"),
    mask_phase: str = typer.Option("all", help="all (prefill and decode) or decode (authors': decode steps only)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="use the model's chat template"),
    n_boot: int = typer.Option(2000, min=100, help="bootstrap resamples"),
    out: Optional[Path] = typer.Option(None, help="run folder (default runs/<model>-task-<task>-<prompt>-k<K>)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    overwrite: bool = typer.Option(False, help="replace a run with a different config in --out"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Task accuracy with no mask, the top-K retrieval heads masked and K random heads masked."""
    from .cli import _setup
    from .errors import ConfigError
    from .masking import METHODS, PHASES
    from .tasks.base import PROMPT_STYLES, TASKS, get_task, task_names

    _setup(threads)
    # Cheap checks first: one clear line before any model is loaded.
    names = task_names()
    if task not in names:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(names)}")
    if prompt not in PROMPT_STYLES:
        raise ConfigError(f"unknown prompt style {prompt!r}; choose from {', '.join(PROMPT_STYLES)}")
    if method not in METHODS or method == "mean":
        raise ConfigError(f"unknown masking method {method!r}; choose from uniform, zero")
    if mask_phase not in PHASES:
        raise ConfigError(f"unknown mask phase {mask_phase!r}; choose from {', '.join(PHASES)}")
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if random_seeds < 0:
        raise ConfigError("--random-seeds must be >= 0")
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

    from .models import load_model
    from .results import DetectionResult
    from .tasks.task_eval import TaskEvalConfig, task_eval

    det = DetectionResult.load(scores)
    name = model or det.config.get("model") or "smollm2-135m"
    cfg = TaskEvalConfig(task=task, style=prompt, k=k, random_seeds=tuple(range(random_seeds)), limit=limit,
                         seed=seed, task_args=args, method=method, phase=mask_phase, chat=chat)
    lm = load_model(name, device=device, dtype=dtype, attn_implementation="sdpa")
    out = out or Path("runs") / f"{lm.spec.name.replace('/', '_')}-task-{task}-{prompt}-k{k}"
    res = task_eval(lm, det, cfg, out=out, overwrite=overwrite, show_progress=progress,
                    scores_source=str(scores), n_boot=n_boot)
    typer.echo(f"{lm.spec.name} {task} ({prompt}), K={k}:")
    typer.echo(res.table())
    for ex in res.examples(2):
        typer.echo(f"[{ex['doc_id']}] gold {ex['answers'][0]!r}: none {ex['none'].strip()[:80]!r} -> "
                   f"top-{k} {ex['top'].strip()[:80]!r}")
    typer.echo(f"run folder: {out} (summary.json, table.md, records.jsonl, task_eval.png/.svg)")


def task_plot_cmd(
    runs: List[Path] = typer.Argument(..., help="finished task-eval run folders"),
    out: Path = typer.Option(Path("task_eval"), help="output stem (writes .png and .svg)"),
    metric: Optional[str] = typer.Option(None, help="metric to plot (default: each run's primary)"),
    title: Optional[str] = typer.Option(None),
) -> None:
    """Draw several task-eval runs as grouped bars (paper Fig. 8 / Fig. 10)."""
    from .errors import DataError
    from .results import CONFIG_FILE
    from .task_plots import plot_task_eval
    from .tasks.task_eval import TaskEvalResult

    for r in runs:
        if not (r / CONFIG_FILE).exists():
            raise DataError(f"{r} is not a task-eval run folder (no {CONFIG_FILE})")
    results = [TaskEvalResult.load(r) for r in runs]
    for p in plot_task_eval(results, out, metric=metric, title=title):
        typer.echo(str(p))
