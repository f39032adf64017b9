"""Downstream impact of masking retrieval heads (paper section 4.2-4.3, Fig. 8 and 10).

    lm = load_model("smollm2-135m")
    res = task_eval(lm, DetectionResult.load("runs/smollm2-135m"),
                    TaskEvalConfig(task="extractive-qa", style="answer-only", k=20, random_seeds=(0, 1), limit=50),
                    out="runs/smollm2-135m-task-extractive-qa")
    print(res.table())

Any registered task (`tasks.registry`, needle retrieval included) runs under the conditions of
`conditions.build_conditions`: nothing masked, the top-K heads by retrieval score masked, and per
seed K random heads drawn from outside the top-K set. Every condition sees the same documents;
greedy decoding under `mask_heads` (`conditions.run_masked`).

Statistics: per condition the mean of each metric with a percentile bootstrap interval over
examples, and the *paired* difference to the unmasked run (same examples) with its own bootstrap
interval. The random row averages each example's metric over the seeds before resampling.
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
from .conditions import Answer, Condition, build_conditions, check_masking, count_tokens, prompts, run_masked, score_map
from .runner import ExperimentResult, Run, check_scores, run_header
from .stats import bootstrap_ci

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["random_seeds"] = list(self.random_seeds)
        return d


# ----------------------------------------------------------------------------------- result
@dataclass
class TaskEvalResult(ExperimentResult):
    """Records of every (condition, doc); rows with bootstrap intervals computed on demand."""

    kind = "task-eval"
    name: str
    task: str
    style: str
    metrics: list[str]
    conditions: list[Condition]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    n_boot: int = 2000
    ci: float = 0.95
    boot_seed: int = 0

    @classmethod
    def from_run(cls, config: dict[str, Any], records: list[dict[str, Any]], **kwargs: Any) -> TaskEvalResult:
        """`kwargs`: n_boot, ci, boot_seed of the bootstrap."""
        conds = [Condition.from_dict(c, watch=False) for c in config["conditions"]]
        return cls(
            config["model"],
            config["task"]["name"],
            config["style"],
            config["metrics"],
            conds,
            records,
            config,
            **kwargs,
        )

    def _values(self, cid: str, metric: str) -> dict[str, float]:
        return {r["doc_id"]: float(r["scores"][metric]) for r in self.records if r["condition"] == cid}

    def _random_ids(self) -> list[str]:
        return [c.id for c in self.conditions if c.kind == "random"]

    def _series(self, which: str, metric: str) -> dict[str, float]:
        """Per doc: the metric of a condition id, or for 'random' the mean over the seeds that
        finished that doc."""
        if which != "random":
            return self._values(which, metric)
        per = [self._values(cid, metric) for cid in self._random_ids()]
        docs = sorted(set().union(*per)) if per else []
        return {d: float(np.mean([p[d] for p in per if d in p])) for d in docs}

    def rows(self) -> list[dict[str, Any]]:
        """One row per shown condition: none, top-K, random-K (seed mean), each seed; per metric
        mean, CI and the paired difference to none with its CI."""
        k = max((c.k for c in self.conditions), default=0)
        shown = [("none", "base", "no mask"), (f"top-k{k}", "top", f"top-{k} retrieval heads")]
        if self._random_ids():
            shown.append(("random", "random", f"random {k} heads (mean of {len(self._random_ids())} seeds)"))
            shown += [
                (cid, "random-seed", f"  random {k}, seed {cid.rsplit('-s', 1)[1]}") for cid in self._random_ids()
            ]
        rows = []
        for which, kind, label in shown:
            row: dict[str, Any] = {"condition": which, "kind": kind, "label": label}
            for m in self.metrics:
                cur = self._series("base" if which == "none" else which, m)
                base = self._series("base", m)
                row["n"] = len(cur)
                mean, lo, hi = bootstrap_ci(list(cur.values()), n_boot=self.n_boot, ci=self.ci, seed=self.boot_seed)
                paired = [cur[d] - base[d] for d in cur if d in base]
                dm, dlo, dhi = bootstrap_ci(paired, n_boot=self.n_boot, ci=self.ci, seed=self.boot_seed)
                row[m] = {"mean": mean, "low": lo, "high": hi, "delta": dm, "delta_low": dlo, "delta_high": dhi}
            rows.append(row)
        return rows

    def table(self) -> str:
        pct = int(round(self.ci * 100))
        head = " | ".join(f"{m} (%) [{pct}% CI] | Δ{m} vs none [{pct}% CI]" for m in self.metrics)
        lines = [f"| condition | n | {head} |", "|---|---:|" + "---:|---:|" * len(self.metrics)]
        for r in self.rows():
            cells = []
            for m in self.metrics:
                v = r[m]
                if np.isnan(v["mean"]):
                    cells += ["-", "-"]
                    continue
                cells.append(f"{100 * v['mean']:.1f} [{100 * v['low']:.1f}, {100 * v['high']:.1f}]")
                cells.append(
                    "-"
                    if r["condition"] == "none" or np.isnan(v["delta"])
                    else f"{100 * v['delta']:+.1f} [{100 * v['delta_low']:+.1f}, {100 * v['delta_high']:+.1f}]"
                )
            lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def examples(self, n: int = 3) -> list[dict[str, Any]]:
        """Docs the unmasked model got right (primary metric > 0.5) and top-K got wrong."""
        m = self.metrics[0]
        k = max((c.k for c in self.conditions), default=0)
        base, top = self._by_doc("base"), self._by_doc(f"top-k{k}")
        out = []
        for d, b in base.items():
            t = top.get(d)
            if t and b["scores"][m] > 0.5 >= t["scores"][m]:
                out.append(
                    {"doc_id": d, "answers": b["answers"], "none": b["generated_text"], "top": t["generated_text"]}
                )
        return out[:n]

    def _by_doc(self, cid: str) -> dict[str, dict[str, Any]]:
        return {r["doc_id"]: r for r in self.records if r["condition"] == cid}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "style": self.style,
            "metrics": self.metrics,
            "n_records": len(self.records),
            "bootstrap": {
                "n_boot": self.n_boot,
                "ci": self.ci,
                "seed": self.boot_seed,
                "method": "percentile, numpy default_rng",
            },
            "config": self.config,
            "rows": self.rows(),
            "examples": self.examples(),
        }


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
    conditions = build_conditions(s, (0, config.k), config.random_seeds)
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
