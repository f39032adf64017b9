"""Downstream impact of masking retrieval heads (paper section 4.2-4.3, Fig. 8 and 10).

    lm = load_model("smollm2-135m")
    res = task_eval(lm, DetectionResult.load("runs/smollm2-135m"),
                    TaskEvalConfig(task="extractive-qa", style="answer-only", k=20, random_seeds=(0, 1), limit=50),
                    out="runs/smollm2-135m-task-extractive-qa")
    print(res.table())

Any registered task (`tasks.registry`, needle retrieval included) runs under the conditions of
`conditions.build_conditions`: nothing masked, the top-K heads by retrieval score masked, and per
seed K random heads drawn from outside the top-K set (`random_pool`: by default non-retrieval heads,
score <= 0.1). Every condition sees the same documents; greedy decoding under `mask_heads`
(`conditions.run_masked`).

Statistics: per condition the mean of each metric with a percentile bootstrap interval over
examples, and the *paired* difference to the unmasked run (same examples) with its own bootstrap
interval. The random row averages each example's metric over the seeds before resampling. The
top-K row also holds top-K minus random-K, paired by example (`minus_random*`).
Bootstrap: `n_boot` resamples from `numpy.random.default_rng(boot_seed)`; both are saved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..models import LoadedModel
from ..results import DetectionResult
from ..tasks.base import Task
from ..tasks.registry import get_task
from .conditions import (
    DEFAULT_RANDOM_POOL,
    Answer,
    build_conditions,
    check_masking,
    count_tokens,
    prompts,
    run_masked,
    score_map,
    tiebreak_map,
)
from .runner import Run, check_scores, run_header
from .stats import bootstrap_ci
from .task_results import TaskEvalResult

__all__ = ["TaskEvalConfig", "TaskEvalResult", "bootstrap_ci", "task_eval"]


@dataclass(frozen=True)
class TaskEvalConfig:
    """What a task-eval run computes. `task_args` go to the task's constructor."""

    task: str
    style: str = "answer-only"
    k: int = 20
    random_seeds: tuple[int, ...] = (0, 1)
    limit: int | None = None
    seed: int = 0
    task_args: dict[str, Any] = field(default_factory=dict)
    method: str = "uniform"
    phase: str = "all"
    chat: bool = True
    random_pool: str = DEFAULT_RANDOM_POOL  # conditions.RANDOM_POOLS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["random_seeds"] = list(self.random_seeds)
        return d


# ----------------------------------------------------------------------------------- experiment
def _validate(lm: LoadedModel, scores: np.ndarray, cfg: TaskEvalConfig, task: Task) -> None:
    check_masking(cfg.method, cfg.phase)
    task.check_style(cfg.style)
    check_scores(lm, scores)
    if cfg.k < 1:
        raise ConfigError(f"K must be >= 1, got {cfg.k}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit must be >= 1, got {cfg.limit}")


def task_eval(
    lm: LoadedModel,
    scores: DetectionResult | np.ndarray,
    config: TaskEvalConfig,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    scores_source: str = "",
    n_boot: int = 2000,
    ci: float = 0.95,
    boot_seed: int = 0,
) -> TaskEvalResult:
    """Run every (condition, doc); with `out`, records stream to a run folder and a rerun resumes.

    `scores`: a DetectionResult or a `[n_layers, n_heads]` array of retrieval scores.
    """
    s = score_map(scores)
    task = get_task(config.task, **config.task_args)
    _validate(lm, s, config, task)
    conditions = build_conditions(
        s, (0, config.k), config.random_seeds, pool=config.random_pool, tiebreak=tiebreak_map(scores)
    )
    limit = config.limit or task.default_limit
    task.prepare(lm.tokenizer, config.chat)
    docs = task.docs(limit, config.seed, count_tokens(lm))
    own = {k: v for k, v in config.to_dict().items() if k not in ("task", "task_args")}
    header = run_header(
        lm,
        "task-eval",
        {"task": task.config(), **own, "limit": limit, "metrics": [m.name for m in task.metrics]},
        scores=s,
        scores_source=scores_source,
        kind_key="kind",
    )
    header.update(doc_ids=[d.id for d in docs], conditions=[c.to_dict() for c in conditions])
    items = prompts(lm, task, docs, config.style, config.chat)

    def record(a: Answer) -> dict[str, Any]:
        d, req = a.prompt.doc, a.prompt.request
        return {
            "doc_id": d.id,
            "style": config.style,
            "prompt_tokens": len(a.prompt.ids),
            "assistant_prefix": req.assistant_prefix,
            "generated_text": a.text,
            "n_generated": len(a.generated_ids),
            "prediction": a.prediction,
            "answers": list(d.answers),
            "scores": a.scores,
        }

    with Run(
        header,
        out=out,
        overwrite=overwrite,
        total=len(conditions) * len(docs),
        desc=f"task-eval {task.name} {config.style}",
        unit="doc",
        show_progress=show_progress,
    ) as run:
        run_masked(
            lm, task, config.style, items, conditions, run, method=config.method, phase=config.phase, record=record
        )
    result = TaskEvalResult.from_run(header, run.records, n_boot=n_boot, ci=ci, boot_seed=boot_seed)
    if out is not None:
        result.save(out)
    return result
