"""Figure of the masking experiment (paper Fig. 7): NIAH score vs number of masked heads K,
top-K retrieval heads vs K random heads (mean over seeds, min/max band). Agg backend, PNG + SVG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np

from .common import plain, save_figure  # also selects the Agg backend

if TYPE_CHECKING:
    from ..experiments.mask_results import MaskEvalResult


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
