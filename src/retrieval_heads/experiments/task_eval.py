"""The masking experiment (paper section 4, Fig. 7-10): a task answered with nothing masked, with
the top-K retrieval heads masked and with K random heads masked, for each K of a sweep.

    lm = load_model("smollm2-135m")
    scores = DetectionResult.load("runs/smollm2-135m")
    res = task_eval(lm, scores, TaskEvalConfig(task="extractive-qa", ks=(0, 20), limit=50), out="runs/qa")
    res = mask_eval(lm, scores, TaskEvalConfig(ks=(0, 5, 10), grid=Grid((500, 1000), (10.0, 50.0, 90.0),
                                                                       EVALUATION_NEEDLES), watch=10))
    print(res.table())

Any registered task (`tasks.registry`) runs under the conditions of `conditions.build_conditions`:
K = 0 (nothing masked), the top-K heads by retrieval score, and per seed K random heads drawn from
outside the top-K set (`random_pool`: by default non-retrieval heads, score <= 0.1). Every
condition sees the same documents; greedy decoding under `mask_heads` (`masked_task.run_masked`).

`task_eval` records each document's metrics (`task_results.TaskEvalResult`: per condition the mean
with a percentile bootstrap interval, the paired difference to nothing masked, top-K minus random-K).

`mask_eval` is the same experiment on the `niah` task (the needle samples of `grid`, needles
disjoint from the detection needles by default) with NIAH's columns (`mask_results.MaskEvalResult`:
score vs K curves, top-K minus random-K paired by sample): NIAH score = ROUGE-1 recall x 100 of the
needle's answer in the response (the authors'), exact match, an error kind (`tasks.niah.error_kind`)
and where the watched heads attended. At each generated token, each of the `watch` best heads that
are *not* masked in the condition has an argmax key position, classed as ``sink`` (one of the first
`sink_tokens` prompt positions), ``needle`` (inside the needle's token span) or ``elsewhere``; a
sample's shares are over all (step, head) pairs (a uniformly masked head's argmax means nothing).

Bootstrap: `n_boot` resamples from `numpy.random.default_rng(boot_seed)`; both are saved. Random
draws are averaged per document over the seeds that finished it (`task_results.seed_mean`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..detection import Grid
from ..errors import ConfigError, check_choice
from ..masking import METHODS, PHASES, Method, Phase, head_means
from ..models import LoadedModel
from ..needles import Sample, load_haystack
from ..results import DetectionResult
from ..runner import Run, check_bootstrap, check_scores, run_header
from ..tasks.base import PROMPT_STYLES, PromptStyle, Task
from ..tasks.niah import NIAH, content_recall, error_kind
from ..tasks.registry import get_task, task_names
from .conditions import (
    RANDOM_POOLS,
    RANDOM_SEEDS,
    RandomPool,
    build_conditions,
    matching_mass,
    score_map,
    tiebreak_map,
)
from .mask_results import LOCATIONS, MaskEvalResult
from .masked_task import Answer, count_tokens, prompts, run_masked
from .stats import bootstrap_ci
from .task_results import TaskEvalResult

__all__ = ["MaskEvalResult", "TaskEvalConfig", "TaskEvalResult", "bootstrap_ci", "mask_eval", "task_eval"]

TASK_EVAL, MASK_EVAL = "task-eval", "mask-eval"  # the two forms of the experiment (its saved kind)
MASK_KS = (0, 5, 10, 20, 50, 100)  # mask-eval's default K sweep
MEAN_TOKENS = 512  # method "mean": each head's mean output over this many haystack tokens


@dataclass(frozen=True)
class TaskEvalConfig:
    """What a masking run computes: `task` (built with `task_args`; for niah the needle samples
    of `grid`, default the task's) under K = each of `ks` (0: nothing masked). `watch` and
    `sink_tokens`: mask-eval's attention location (see the module docstring)."""

    task: str = "niah"
    ks: tuple[int, ...] = (0, 20)
    random_seeds: tuple[int, ...] = RANDOM_SEEDS
    random_pool: RandomPool = "non-retrieval"  # conditions.RANDOM_POOLS
    method: Method = "uniform"
    phase: Phase = "all"
    style: PromptStyle = "answer-only"
    limit: int | None = None
    seed: int = 0
    task_args: dict[str, Any] = field(default_factory=dict)
    grid: Grid | None = None
    chat: bool = True
    watch: int = 0
    sink_tokens: int = 4
    batch_size: int | None = None  # phase "decode": conditions decoded together per prompt (None: all)

    def __post_init__(self) -> None:
        check_choice("task", self.task, task_names())
        check_choice("masking method", self.method, METHODS)
        check_choice("mask phase", self.phase, PHASES)
        check_choice("random pool", self.random_pool, tuple(RANDOM_POOLS))
        check_choice("prompt style", self.style, PROMPT_STYLES)
        if not self.ks:
            raise ConfigError("no K values")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if min(self.random_seeds, default=0) < 0 or self.watch < 0 or self.sink_tokens < 0:
            raise ConfigError("random seeds, watch and sink_tokens must be >= 0")
        if self.task != "niah" and self.grid is not None:
            raise ConfigError("a grid applies to the niah task only")
        self.build_task().check_style(self.style)  # the task's own arguments and styles

    def build_task(self) -> Task:
        """The task with its arguments (a grid gives the niah task its needles, lengths, depths)."""
        g = self.grid
        grid = {"needles": g.needles, "lengths": g.lengths, "depths": g.depths} if g is not None else {}
        return get_task(self.task, **self.task_args, **grid)


def header_config(cfg: TaskEvalConfig, task: Task, limit: int, kind: str) -> dict[str, Any]:
    """The saved config of a run, laid out as each command has always saved it (runs resume)."""
    seeds = list(cfg.random_seeds)
    if kind == MASK_EVAL:
        assert isinstance(task, NIAH)
        niah = task.config()
        grid = {k: niah[k] for k in ("lengths", "depths", "needles", "max_new_tokens")}
        return {
            **{"ks": list(cfg.ks), "random_seeds": seeds, "method": cfg.method, "phase": cfg.phase, **grid},
            **{"chat": cfg.chat, "haystack": task.path, "watch": cfg.watch, "sink_tokens": cfg.sink_tokens},
            "random_pool": cfg.random_pool,
        }
    ks = {"k": cfg.ks[-1]} if len(cfg.ks) == 2 and cfg.ks[0] == 0 else {"ks": list(cfg.ks)}
    return {
        **{"task": task.config(), "style": cfg.style, **ks, "random_seeds": seeds, "limit": limit},
        **{"seed": cfg.seed, "method": cfg.method, "phase": cfg.phase, "chat": cfg.chat},
        **{"random_pool": cfg.random_pool, "metrics": [m.name for m in task.metrics]},
    }


def locate(argmax: np.ndarray, sample: Sample, sink_tokens: int) -> dict[str, float]:
    """Shares of argmax positions `[steps, watched]` on the sink, the needle span, elsewhere."""
    a = np.asarray(argmax)
    if a.size == 0:
        return {k: float("nan") for k in LOCATIONS}
    sink = a < sink_tokens
    needle = (a >= sample.needle_start) & (a < sample.needle_end) & ~sink
    return {"sink": float(sink.mean()), "needle": float(needle.mean()), "elsewhere": float((~sink & ~needle).mean())}


def task_record(a: Answer, style: str) -> dict[str, Any]:
    """A task-eval record: the answer and its metric values."""
    d, req = a.prompt.doc, a.prompt.request
    return {
        "doc_id": d.id,
        "style": style,
        "prompt_tokens": len(a.prompt.ids),
        "assistant_prefix": req.assistant_prefix,
        "generated_text": a.text,
        "n_generated": len(a.generated_ids),
        "prediction": a.prediction,
        "answers": list(d.answers),
        "scores": a.scores,
    }


def niah_record(a: Answer, sink_tokens: int) -> dict[str, Any]:
    """A mask-eval record: NIAH's columns (score, error kind, where the watched heads attended)."""
    sample: Sample = a.prompt.doc.fields["sample"]
    answer, text = sample.needle.answer, a.text
    kind, span = error_kind(sample, text)
    recall = a.scores["answer_recall"]
    return {
        "sample_id": sample.id,
        **sample.params(),
        "answer": answer,
        "prompt_tokens": len(a.prompt.ids),
        "needle_start": sample.needle_start,
        "needle_end": sample.needle_end,
        "generated_text": text,
        "generated_ids": a.generated_ids,
        "answer_recall": recall,
        "niah_score": 100.0 * recall,
        "exact": bool(a.scores["exact"]),
        "content_recall": content_recall(answer, text),
        "error_kind": kind,
        "copied_span": span,
        "attention": locate(a.argmax, sample, sink_tokens),
        "watch_argmax": a.argmax.tolist(),
    }


def _validate(lm: LoadedModel, scores: np.ndarray, cfg: TaskEvalConfig, task: Task) -> None:
    task.check_style(cfg.style)
    check_scores(lm, scores)
    if isinstance(task, NIAH):
        top = lm.spec.max_context - task.max_new_tokens - 200
        for length in task.lengths:
            if length < 64 or length > top:
                raise ConfigError(f"length {length} must be within 64..{top}")


def _run(kind: str, lm: LoadedModel, scores: DetectionResult | np.ndarray, config: TaskEvalConfig, **kw: Any) -> Any:
    """Either form of the experiment; `kw`: `task_eval`'s options."""
    bootstrap = {k: kw.pop(k) for k in ("n_boot", "ci", "boot_seed") if k in kw}
    check_bootstrap(bootstrap.get("n_boot", 2000), bootstrap.get("ci", 0.95))
    scores_source, out = kw.pop("scores_source", ""), kw.get("out")
    s, task = score_map(scores), config.build_task()
    _validate(lm, s, config, task)
    mass = matching_mass(scores, config.random_pool, bool(config.random_seeds))
    conditions = build_conditions(
        s,
        config.ks,
        config.random_seeds,
        config.watch,
        pool=config.random_pool,
        tiebreak=tiebreak_map(scores),
        mass=mass,
    )
    mask = kind == MASK_EVAL
    task.prepare(lm.tokenizer, config.chat)
    limit = config.limit or (task.size if isinstance(task, NIAH) and mask else task.default_limit)
    docs = task.docs(limit, config.seed, count_tokens(lm))
    hay = {"haystack": task.haystack, "haystack_name": task.path} if mask and isinstance(task, NIAH) else {}
    header = run_header(
        lm,
        kind,
        header_config(config, task, limit, kind),
        scores=s,
        scores_source=scores_source,
        kind_key="kind",
        **hay,
    )
    header.update({} if mask else {"doc_ids": [d.id for d in docs]}, conditions=[c.to_dict() for c in conditions])
    if config.phase == "decode" and not config.watch:  # recorded; not semantic (the rows decode as one alone)
        header["batch_size"] = config.batch_size or len(conditions)
    means = None
    if config.method == "mean":  # per-head mean outputs over the start of the haystack: text no task asks about
        import torch

        text = task.haystack if isinstance(task, NIAH) else load_haystack(None)
        ref = lm.tokenizer(text[:20000], add_special_tokens=False)["input_ids"][:MEAN_TOKENS]
        means = head_means(lm.model, torch.tensor([ref]))  # head_means moves the ids to the model's device
        if not hay:  # niah's header names its haystack already
            header["mean_reference"] = f"first {len(ref)} tokens of the default haystack essays"
    items = prompts(lm, task, docs, config.style, config.chat)
    desc = f"mask-eval {lm.spec.name}" if mask else f"{kind} {task.name} {config.style}"
    with Run(header, total=len(conditions) * len(docs), desc=desc, unit="sample" if mask else "doc", **kw) as run:
        run_masked(
            lm,
            task,
            config.style,
            items,
            conditions,
            run,
            method=config.method,
            phase=config.phase,
            means=means,
            batch_size=config.batch_size,
            record=(lambda a: niah_record(a, config.sink_tokens)) if mask else (lambda a: task_record(a, config.style)),
        )
    result = (MaskEvalResult if mask else TaskEvalResult).from_run(header, run.records, **bootstrap)
    if out is not None:
        result.save(out)
    return result


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
    options = {k: v for k, v in locals().items() if k not in ("lm", "scores", "config")}
    return _run(TASK_EVAL, lm, scores, config, **options)


def mask_eval(
    lm: LoadedModel,
    scores: DetectionResult | np.ndarray,
    config: TaskEvalConfig = TaskEvalConfig(ks=MASK_KS, watch=10),
    **options: Any,
) -> MaskEvalResult:
    """`task_eval` on the niah task (every sample of its grid) with NIAH's columns in each record;
    `options` are task_eval's (out, overwrite, show_progress, scores_source, n_boot, ci, boot_seed)."""
    if config.task != "niah":
        raise ConfigError(f"mask-eval runs the niah task, not {config.task!r}; use task-eval")
    return _run(MASK_EVAL, lm, scores, config, **options)
