"""Matplotlib figures of the paper's head properties (Agg backend, no display needed).

Each `plot_*` function returns a Figure; `save_figure(fig, stem)` (from `plots.common`, re-exported
here) writes `stem.png` and `stem.svg`. Inputs are the tables of `retrieval_heads.analysis` or a
DetectionResult.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis import SPARSITY_BINS, head_label
from .common import plain, save_figure  # also selects the Agg backend

if TYPE_CHECKING:
    from ..results import DetectionResult

__all__ = [
    "BIN_LABELS",
    "plot_correlation",
    "plot_heatmap",
    "plot_niah",
    "plot_rank_stability",
    "plot_score_vs_frequency",
    "plot_sparsity",
    "save_figure",
]

BIN_LABELS = {
    "zero": "score = 0",
    "(0,0.1]": "0 < score ≤ 0.1",
    "(0.1,0.5]": "0.1 < score ≤ 0.5",
    ">0.5": "score > 0.5",
}


def plot_sparsity(table: pd.DataFrame) -> Figure:
    """Grouped bars: share of heads per score bin, one bar per run (paper Fig. 3). Log y axis,
    since the bins span two orders of magnitude; each bar is labelled with its percentage."""
    models = list(table["model"])
    n = len(models)
    fig, ax = plt.subplots(figsize=(max(7.0, min(14.0, 4.0 + 0.8 * n)), 4.8))
    width = 0.8 / max(n, 1)
    x = np.arange(len(SPARSITY_BINS))
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    for i, (_, row) in enumerate(table.iterrows()):
        vals = np.array([row[b] for b in SPARSITY_BINS]) * 100
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, np.maximum(vals, 1e-3), width, label=plain(row["model"]), color=cmap(i % cmap.N))
        if n <= 12:
            for b, v in zip(bars, vals, strict=True):
                ax.annotate(
                    f"{v:.1f}" if v >= 1 else f"{v:.2f}",
                    (b.get_x() + b.get_width() / 2, max(v, 1e-3)),
                    ha="center",
                    va="bottom",
                    fontsize=6 if n > 4 else 8,
                    rotation=90 if n > 4 else 0,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.set_yscale("log")
    ax.set_ylim(0.01, 300)
    ax.set_xticks(x, [BIN_LABELS[b] for b in SPARSITY_BINS])
    ax.set_xlabel("retrieval score bin")
    ax.set_ylabel("share of heads (%, log scale)")
    ax.set_title("Sparsity of retrieval heads (paper Fig. 3)")
    ax.legend(fontsize=7, ncol=2 if n > 5 else 1, loc="upper right", frameon=False)
    ax.grid(axis="y", which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_score_vs_frequency(result: DetectionResult, k: int = 20) -> Figure:
    """Retrieval score and activation frequency of the top-k heads, side by side (Fig. 4)."""
    top = result.top(k)
    labels = [head_label(h.layer, h.head) for h in top]
    x = np.arange(len(top))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(top) + 2), 4.2))
    ax.bar(x - 0.2, [h.score for h in top], 0.4, label="retrieval score", color="tab:blue")
    ax.bar(x + 0.2, [h.activation_frequency for h in top], 0.4, label="activation frequency", color="tab:green")
    ax.axhline(0.1, color="grey", lw=0.8, ls="--", label="retrieval-head threshold (0.1)")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("head (0-based layer, head), ranked by retrieval score")
    ax.set_ylabel("value")
    ax.set_title(
        plain(f"{result.name}: retrieval score vs activation frequency, top {len(top)} heads (Fig. 4)"), pad=24
    )
    ax.set_ylim(0, max(1.05, max((h.score for h in top), default=0) * 1.1))
    ax.legend(fontsize=8, frameon=False, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_heatmap(result: DetectionResult, vmax: float | None = None) -> Figure:
    """Layer x head map of retrieval scores (Fig. 5); layers on the y axis, layer 0 at the top."""
    s = result.scores  # [L, H]
    n_layers, n_heads = s.shape
    fig, ax = plt.subplots(figsize=(min(3.0 + 0.22 * n_heads, 12), min(2.0 + 0.18 * n_layers, 12)))
    top = float(np.nanmax(s)) if np.isfinite(s).any() else 1.0
    im = ax.imshow(s, aspect="auto", cmap="viridis", vmin=0, vmax=vmax or max(top, 1e-9), interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("retrieval score")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, n_heads, max(1, math.ceil(n_heads / 16))))
    ax.set_yticks(range(0, n_layers, max(1, math.ceil(n_layers / 20))))
    ax.set_title(plain(f"{result.name}: retrieval score per head (Fig. 5)"))
    fig.tight_layout()
    return fig


def plot_rank_stability(df: pd.DataFrame, name: str = "") -> Figure:
    """Rank (log scale, 1 at top) of the final top heads vs number of kept samples (Fig. 13)."""
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    for label, g in df.sort_values(["final_rank", "n_samples"]).groupby("label", sort=False):
        ax.plot(g["n_samples"], g["rank"], marker="o", ms=3, lw=1.2, label=f"{label} (#{int(g['final_rank'].iloc[0])})")
    ax.set_yscale("log")
    worst = int(max(df["rank"].max(), 2)) if len(df) else 2
    ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000) if t <= worst * 1.5]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(worst * 1.3, 0.8)  # inverted: rank 1 at the top
    ax.set_xlabel("kept samples used")
    ax.set_ylabel("rank among all heads (1 = best, log scale)")
    ax.set_title(plain(f"{name + ': ' if name else ''}rank of the final top heads as samples accumulate (Fig. 13)"))
    ax.legend(
        fontsize=7,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="head (final rank)",
        title_fontsize=7,
    )
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_niah(grid: pd.DataFrame, name: str = "", value: str = "answer recall") -> Figure:
    """The classic needle-in-a-haystack map: depth (y) x context length (x), 0 red to 1 green."""
    fig, ax = plt.subplots(figsize=(min(3.5 + 0.5 * grid.shape[1], 12), min(2.2 + 0.35 * grid.shape[0], 8)))
    im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"mean {value}")
    ax.set_xticks(range(grid.shape[1]), [str(int(c)) for c in grid.columns], rotation=45 if grid.shape[1] > 8 else 0)
    ax.set_yticks(range(grid.shape[0]), [f"{d:g}" for d in grid.index])
    if grid.size <= 150:
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(plain(f"{name + ': ' if name else ''}needle retrieval over length x depth"))
    fig.tight_layout()
    return fig


def plot_correlation(matrix: pd.DataFrame, method: str = "pearson") -> Figure:
    """Result x result correlation matrix of score maps (Fig. 6), annotated, -1 blue to 1 red."""
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(3.2 + 0.85 * n, 2.6 + 0.7 * n))
    im = ax.imshow(matrix.to_numpy(dtype=float), cmap="coolwarm", vmin=-1, vmax=1)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"{method} correlation")
    names = [plain(c) for c in matrix.columns]
    ax.set_xticks(range(n), names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for (i, j), v in np.ndenumerate(matrix.to_numpy(dtype=float)):
        ax.text(
            j,
            i,
            "nan" if not np.isfinite(v) else f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if np.isfinite(v) and abs(v) > 0.6 else "black",
        )
    ax.set_xlabel("run")
    ax.set_ylabel("run")
    ax.set_title(f"{method.capitalize()} correlation of retrieval-score maps (Fig. 6)")
    fig.tight_layout()
    return fig
