"""Bar plots of task-eval runs in the manner of paper Fig. 8 (QA) and Fig. 10 (answer-only vs
CoT): per run a group of three bars (no mask, K random heads, top-K retrieval heads) with the
bootstrap intervals as error bars. Agg backend, PNG + SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np

from .common import plain, save_figure  # also selects the Agg backend

if TYPE_CHECKING:
    from ..experiments.task_eval import TaskEvalResult

BARS = (
    ("base", "no mask", "tab:gray"),
    ("random", "K random heads masked", "tab:blue"),
    ("top", "top-K retrieval heads masked", "tab:red"),
)


def plot_task_eval(
    results: Sequence[TaskEvalResult], stem: str | Path, *, metric: str | None = None, title: str | None = None
) -> list[Path]:
    """Write `stem.png` and `stem.svg`: one bar group per run (label: task, prompt style)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.9 * len(results) + 1.5), 3.6))
    width = 0.26
    labels = []
    for g, res in enumerate(results):
        m = metric if metric in res.metrics else res.metrics[0]
        rows = {r["kind"] if r["kind"] != "random-seed" else r["condition"]: r for r in res.rows()}
        for b, (kind, label, color) in enumerate(BARS):
            r = rows.get(kind)
            if r is None or np.isnan(r[m]["mean"]):
                continue
            v = r[m]
            x = g + (b - 1) * width
            err = [[100 * (v["mean"] - v["low"])], [100 * (v["high"] - v["mean"])]]
            ax.bar(
                x,
                100 * v["mean"],
                width,
                color=color,
                label=label if g == 0 else None,
                yerr=err,
                capsize=3,
                error_kw={"linewidth": 1},
            )
            ax.text(x, 100 * v["high"] + 1.5, f"{100 * v['mean']:.0f}", ha="center", fontsize=7)
        k = max((c.k for c in res.conditions), default=0)
        n = rows["base"]["n"]
        labels.append(plain(f"{res.task}\n{res.style}, {m}\n(n={n}, K={k})"))
    ax.set_xticks(range(len(results)), labels, fontsize=8)
    ax.set_ylabel("score (%), 95% bootstrap CI")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    name = results[0].name if results else ""
    ax.set_title(plain(title or f"{name}: masking retrieval heads vs random heads"), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)
