"""Figures of the masking experiment: NIAH score vs number of masked heads K, top-K retrieval
heads vs K random heads (paper Fig. 7: mean over seeds, min/max band), and the null distribution
of a mask-eval or task-eval run (the random draws' effects with the top-K effect marked). Agg
backend, PNG + SVG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np

from ..experiments.conditions import random_pool_of
from ..experiments.null import UNITS, null_rows
from .common import plain, save_figure  # also selects the Agg backend

if TYPE_CHECKING:
    from ..experiments.mask_results import MaskEvalResult
    from ..experiments.task_results import TaskEvalResult

NULL_STEM = "null_distribution"  # the null figure of a run folder: null_distribution.png/.svg


def plot_mask_eval(result: MaskEvalResult, stem: str | Path, *, title: str | None = None) -> list[Path]:
    """Write `stem.png` and `stem.svg`: NIAH score (left) and exact match (right) vs K."""
    cv = result.curves()
    k = np.asarray(cv["k"], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    for ax, key, label, scale in (
        (axes[0], "score", "NIAH score (ROUGE-1 recall x 100)", 1.0),
        (axes[1], "exact", "exact answer match (%)", 100.0),
    ):
        top = np.asarray(cv[f"top_{key}"], dtype=float) * scale
        rnd = np.asarray(cv[f"random_{key}"], dtype=float) * scale
        lo = np.asarray(cv[f"random_{key}_min"], dtype=float) * scale
        hi = np.asarray(cv[f"random_{key}_max"], dtype=float) * scale
        ax.plot(k, top, "o-", color="tab:red", label="top-K retrieval heads masked")
        ax.plot(k, rnd, "s--", color="tab:blue", label="K random heads masked (mean of seeds)")
        ax.fill_between(k, lo, hi, color="tab:blue", alpha=0.2, linewidth=0, label="random: min-max over seeds")
        ax.set_xlabel("number of masked heads K")
        ax.set_ylabel(label)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    cfg = result.config
    n_heads = cfg.get("model_spec", {}).get("n_layers", 0) * cfg.get("model_spec", {}).get("n_heads", 0)
    fig.suptitle(
        plain(
            title
            or f"{result.name}: masking retrieval vs random heads "
            f"({cfg.get('method', '?')}, phase {cfg.get('phase', '?')}, {n_heads} heads)"
        ),
        fontsize=10,
    )
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_null_distribution(result: MaskEvalResult | TaskEvalResult, stem: str | Path) -> list[Path]:
    """Write `stem.png` and `stem.svg`: one panel per K (task-eval: its K, first metric), three
    to a row, with the random draws' effects as a histogram, each draw ticked on the axis, and the
    top-K effect as a red line; the percentile and p-value in each panel's title, the pool in the
    figure's. Nothing is written (returns []) when the run has no finished random draw."""
    rows = [(label, t) for label, t in null_rows(result.null(), metrics=1) if t["n_draws"]]
    if not rows:
        return []
    unit, scale, key = UNITS[result.kind]
    relative = rows[0][1].get("effect", "delta") != "metric"  # "metric": no unmasked run in the sweep
    xlabel = f"{unit}: masked minus no mask" if relative else f"{unit} of the masked run (no unmasked run)"
    cols = min(3, len(rows))
    n_rows = -(-len(rows) // cols)
    fig, grid = plt.subplots(n_rows, cols, figsize=(3.6 * cols + 0.6, 3.0 * n_rows + 0.4), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    for ax, (label, t) in zip(axes, rows, strict=False):
        draws = np.asarray(t["draw_effects"], dtype=float) * scale
        top = float(t["top_effect"]) * scale
        bins = int(np.clip(2 * np.sqrt(draws.size), 3, 12))  # 3 draws: 3 bins, 20: 8, 36 or more: 12
        ax.hist(draws, bins=bins, color="tab:blue", alpha=0.6, label="random draws")
        ax.plot(draws, np.zeros_like(draws), "|", color="navy", markersize=14, zorder=3)
        if np.isfinite(top):
            ax.axvline(top, color="tab:red", linewidth=2, label="top-K heads")
        pct = "-" if np.isnan(t["percentile"]) else f"{t['percentile']:.0%}"
        p = "-" if np.isnan(t["p_value"]) else f"{t['p_value']:.3f}"
        ax.set_title(plain(f"{key} = {label}: percentile {pct}, p = {p} ({t['n_draws']} draws)"), fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("random draws")
        ax.yaxis.get_major_locator().set_params(integer=True)  # counts
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        plain(f"{result.name}: top-K effect in the null of K random heads (pool {random_pool_of(result.config)!r})"),
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, stem)
