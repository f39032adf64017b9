"""What a kv-eval run's records mean (`kv_eval` runs it): per task and cache condition the score,
the measured KV bytes and the paired difference to sink + window at the same budget; the summary
and the Markdown tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runner import ExperimentResult
from ..tasks.registry import TASKS
from .stats import fmt_interval, named, paired_difference

QA_TASK = "extractive-qa"
# How the table shows each task: (column title of its score, table title).
TASK_TITLES = {"niah": ("answer recall", "needle retrieval"), QA_TASK: ("F1", "extractive QA (SQuAD v2)")}


@dataclass
class KVEvalResult(ExperimentResult):
    name: str
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    n_boot: int = 2000
    ci: float = 0.95
    boot_seed: int = 0
    kind = "kv-eval"

    @classmethod
    def from_run(cls, config: dict[str, Any], records: list[dict[str, Any]], **kwargs: Any) -> KVEvalResult:
        """`kwargs`: n_boot, ci, boot_seed of the bootstrap of the paired differences."""
        return cls(config["model"], records, config, **kwargs)

    def rows(self, task: str = "niah") -> list[dict[str, Any]]:
        """Per condition of one task: mean score (the task's primary metric), exact match, measured
        bytes (share of full), the paired difference to sink + window at the same budget, in
        first-seen order."""
        by: dict[str, list[dict[str, Any]]] = {}
        for r in self.records:
            if r.get("kind") == "eval" and r.get("task", "niah") == task:
                by.setdefault(r["condition"], []).append(r)
        mem = {r["condition"]: r for r in self.records if r.get("kind") == "memory"}
        key = TASKS[task].metrics[0].name  # the task's primary metric
        full = float(np.mean([r[key] for r in by["full"]])) if "full" in by else float("nan")
        out = []
        for cid, rs in by.items():
            score, m = float(np.mean([r[key] for r in rs])), mem.get(cid, {})
            ref = by.get(f"sink_window-b{rs[0]['budget']:g}", []) if rs[0]["policy"] != "sink_window" else []
            per = [{r["sample_id"]: r[key] for r in x} for x in (rs, ref)]  # paired by sample
            d = paired_difference(*per, n_boot=self.n_boot, ci=self.ci, seed=self.boot_seed)
            out.append(
                {
                    "condition": cid,
                    "policy": rs[0]["policy"],
                    "budget": rs[0]["budget"],
                    "n": len(rs),
                    "n_whole": rs[0].get("n_whole"),
                    "task": task,
                    "score": score,
                    "answer_recall": score,
                    **{
                        k: float(np.mean([r[k] for r in rs])) for k in ("exact", "kv_bytes", "kv_share", "kv_bytes_end")
                    },
                    "share_of_full_score": score / full if full else float("nan"),
                    "peak_rss_mib": m.get("peak_rss_mib"),
                    "probe_peak_cache_mib": m.get("peak_cache_mib"),
                    **named(d, "vs_sink_window"),
                }
            )
        return out

    def tasks(self) -> list[str]:
        return [
            t for t in TASK_TITLES if any(r.get("kind") == "eval" and r.get("task", "niah") == t for r in self.records)
        ]

    def table(self) -> str:
        return "\n\n".join(self.task_table(t) for t in self.tasks() or ["niah"])

    def task_table(self, task: str) -> str:
        metric, title = TASK_TITLES[task]
        lines = [
            f"**{title}**",
            "",
            "| policy | budget | whole KV heads | KV MiB after prefill (measured) | % of full bytes | "
            f"{metric} | % of full score | exact | peak RSS MiB (probe) | n | "
            f"Δ{metric} vs sink + window, paired [{round(self.ci * 100)}% CI] |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows(task):
            rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
            lines.append(
                f"| {r['condition']} | {r['budget']:g} | {r['n_whole'] if r['n_whole'] is not None else '-'} | "
                f"{r['kv_bytes'] / 2**20:.2f} | {100 * r['kv_share']:.1f} | {r['answer_recall']:.2f} | "
                f"{100 * r['share_of_full_score']:.0f} | {r['exact']:.0%} | {rss} | {r['n']} | "
                f"{fmt_interval(r, 'vs_sink_window', digits=2)} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "rows": self.rows(),
            "tasks": {t: self.rows(t) for t in self.tasks()},
            "bootstrap": {
                "n_boot": self.n_boot,
                "ci": self.ci,
                "seed": self.boot_seed,
                "method": "percentile, numpy default_rng",
            },
        }
