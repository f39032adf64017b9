"""What a task-eval run's records mean (`task_eval` runs it): per condition the mean of each metric
with its bootstrap interval and the paired difference to the unmasked run; the summary and the
Markdown table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runner import ExperimentResult
from .conditions import Condition, random_pool_line, random_pool_of
from .null import null_lines, null_test
from .stats import bootstrap_ci, fmt_interval, named, paired_difference

Value = Callable[[dict[str, Any]], float]  # a record's value of one metric


def by_doc(records: Sequence[dict[str, Any]], cid: str, value: Value, key: str = "doc_id") -> dict[str, float]:
    """Per document (`key`): the value of the records of condition `cid`."""
    return {r[key]: value(r) for r in records if r["condition"] == cid}


def seed_mean(
    records: Sequence[dict[str, Any]], cids: Sequence[str], value: Value, key: str = "doc_id"
) -> dict[str, float]:
    """Random K heads, per document: the mean over the draws `cids` (one per seed) that finished it."""
    per = [by_doc(records, cid, value, key) for cid in cids]
    docs = sorted(set().union(*per)) if per else []
    return {d: float(np.mean([p[d] for p in per if d in p])) for d in docs}


@dataclass
class MaskingResult(ExperimentResult):
    """Records of every (condition, document) of a masking run and its conditions; the bootstrap
    settings of its intervals (`n_boot` resamples from `numpy.random.default_rng(boot_seed)`)."""

    name: str
    conditions: list[Condition]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    n_boot: int = 2000
    ci: float = 0.95
    boot_seed: int = 0

    def bootstrap(self) -> dict[str, Any]:
        """How the intervals were computed (saved in the summary)."""
        return {"n_boot": self.n_boot, "ci": self.ci, "seed": self.boot_seed, "method": "percentile, numpy default_rng"}


@dataclass
class TaskEvalResult(MaskingResult):
    """A task-eval run: per condition each metric's mean, rows with bootstrap intervals on demand."""

    kind = "task-eval"
    task: str = ""
    style: str = "answer-only"
    metrics: list[str] = field(default_factory=list)

    @classmethod
    def from_run(cls, config: dict[str, Any], records: list[dict[str, Any]], **kwargs: Any) -> TaskEvalResult:
        """`kwargs`: n_boot, ci, boot_seed of the bootstrap."""
        conds = [Condition.from_dict(c, watch=False) for c in config["conditions"]]
        task, style, metrics = config["task"]["name"], config["style"], config["metrics"]
        return cls(config["model"], conds, records, config, **kwargs, task=task, style=style, metrics=metrics)

    def _draws(self, k: int) -> list[Condition]:
        return [c for c in self.conditions if c.kind == "random" and c.k == k]

    def _random_ids(self) -> list[str]:
        return [c.id for c in self.conditions if c.kind == "random"]

    def _series(self, which: str, metric: str) -> dict[str, float]:
        """Per doc: the metric of a condition id, or for 'random' the mean over the seeds that
        finished that doc."""

        def value(r: dict[str, Any]) -> float:
            return float(r["scores"][metric])

        if which != "random":
            return by_doc(self.records, which, value)
        return seed_mean(self.records, self._random_ids(), value)

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
                if kind == "top":  # top-K minus random-K on the same docs
                    d = paired_difference(
                        cur, self._series("random", m), n_boot=self.n_boot, ci=self.ci, seed=self.boot_seed
                    )
                    row[m].update(named(d, "minus_random"))
            rows.append(row)
        return rows

    def null(self) -> dict[str, dict[str, Any]]:
        """Per metric: the top-K effect (mean over docs of top-K minus no mask, the row's delta)
        placed in the null of the random draws' effects, each seed one sample (`null.null_test`).
        Without an unmasked condition the effects are the metrics themselves (`effect: "metric"`)."""
        k = max((c.k for c in self.conditions), default=0)
        unmasked = any(c.kind == "base" for c in self.conditions)
        out = {}
        for m in self.metrics:
            base = self._series("base", m)

            def effect(cid: str, m: str = m, base: dict[str, float] = base) -> float:
                cur = self._series(cid, m)
                diffs = [v - base[d] for d, v in cur.items() if d in base] if unmasked else list(cur.values())
                return float(np.mean(diffs)) if diffs else float("nan")

            t = {"k": k, **null_test(effect(f"top-k{k}"), [effect(c.id) for c in self._draws(k)])}
            out[m] = t if unmasked else {**t, "effect": "metric"}
        return out

    def table(self) -> str:
        pct = round(self.ci * 100)
        head = " | ".join(
            f"{m} (%) [{pct}% CI] | Δ{m} vs none [{pct}% CI] | Δ{m} top minus random, paired [{pct}% CI]"
            for m in self.metrics
        )
        lines = [
            random_pool_line(self.config),
            "",
            f"| condition | n | {head} |",
            "|---|---:|" + "---:|---:|---:|" * len(self.metrics),
        ]
        for r in self.rows():
            cells = []
            for m in self.metrics:
                v = r[m]
                if np.isnan(v["mean"]):
                    cells += ["-", "-", "-"]
                    continue
                cells.append(f"{100 * v['mean']:.1f} [{100 * v['low']:.1f}, {100 * v['high']:.1f}]")
                cells.append(
                    "-"
                    if r["condition"] == "none" or np.isnan(v["delta"])
                    else f"{100 * v['delta']:+.1f} [{100 * v['delta_low']:+.1f}, {100 * v['delta_high']:+.1f}]"
                )
                cells.append(fmt_interval(v, "minus_random", scale=100))
            lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
        null = null_lines(self.kind, self.null())
        return "\n".join([*lines, "", *null] if null else lines)

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
            "bootstrap": self.bootstrap(),
            "config": self.config,
            "random_pool": random_pool_of(self.config),
            "rows": self.rows(),
            "null_distribution": self.null(),
            "examples": self.examples(),
        }
