"""Figure of the KV-cache budget experiment: needle score vs measured KV bytes, one line per
policy (random heads: one point per seed). Agg backend, PNG + SVG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt

from .common import plain, save_figure  # also selects the Agg backend

if TYPE_CHECKING:
    from ..experiments.kv_eval import KVEvalResult

STYLE = {
    "retrieval": ("tab:red", "o-"),
    "needle_attention": ("tab:purple", "D-"),
    "gain": ("tab:orange", "^-"),
    "random": ("tab:gray", "x--"),
    "sink_window": ("tab:blue", "s-"),
    "snapkv": ("tab:green", "v-"),
    "headkv": ("tab:brown", "P-"),
}
LABELS = {
    "retrieval": "retrieval heads whole + sink/window",
    "random": "random heads whole (per seed)",
    "sink_window": "sink + window, every head",
    "snapkv": "SnapKV, every head",
    "needle_attention": "needle-attention heads whole",
    "gain": "measured-gain heads whole",
    "headkv": "HeadKV: token budgets by retrieval score",
}


def plot_kv_eval(result: KVEvalResult, stem: str | Path, *, title: str | None = None) -> list[Path]:
    """Write `stem.png` and `stem.svg`: score vs share of the full cache's bytes, one panel per task
    (needle retrieval: answer recall; extractive QA: SQuAD F1)."""
    tasks = result.tasks() or ["niah"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = result.rows(task)
        full = [r for r in rows if r["policy"] == "full"]
        for policy in [p for p in STYLE if any(r["policy"] == p for r in rows)]:
            pts = sorted((100 * r["kv_share"], r["score"]) for r in rows if r["policy"] == policy)
            color, fmt = STYLE[policy]
            ax.plot(*zip(*pts, strict=True), "x" if policy == "random" else fmt, color=color, label=LABELS[policy])
        if full:
            ax.axhline(full[0]["score"], color="black", lw=1, ls=":", label="full cache")
            ax.axhline(0.9 * full[0]["score"], color="black", lw=0.6, ls="--", alpha=0.5, label="90 % of full")
        ax.set_xlabel("KV cache bytes after prefill (% of full, measured)")
        ax.set_ylabel("needle answer recall (ROUGE-1)" if task == "niah" else "extractive QA F1 (SQuAD v2)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        what = "needle retrieval" if task == "niah" else "extractive QA"
        ax.set_title(
            plain(title or f"{result.name}: {what} vs KV bytes ({result.config.get('length', '?')} tokens)"),
            fontsize=10,
        )
    fig.tight_layout()
    return save_figure(fig, stem)
