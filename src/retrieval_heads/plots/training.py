"""Figure of the fine-tuning experiment (the paper's "intrinsic" Fig. 6, on our own fine-tunes): per
run (one column each), the retrieval score of every head before vs after training, and the
trajectory the Trainer callback recorded (the step-0 top heads' scores, top-k Jaccard and NIAH
score over steps). Drawn from `FinetuneResult.to_dict()` (a run's summary.json). Agg, PNG + SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from ..errors import DataError
from .common import plain, save_figure  # also selects the Agg backend


def _num(values: Any) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def plot_training(summaries: Sequence[dict[str, Any]], stem: str | Path) -> list[Path]:
    """Write `stem.png` and `stem.svg` for one or several finetune-eval summaries; a malformed
    summary is one DataError line and writes nothing."""
    n = max(len(summaries), 1)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7.2), squeeze=False)
    col = 0
    try:
        for col, s in enumerate(summaries):
            _draw(axes[:, col], s)
        fig.suptitle(plain(f"{summaries[0]['model'] if summaries else ''}: retrieval heads through fine-tuning"))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        plt.close(fig)
        what = f"{type(e).__name__}: {str(e)[:80]}"
        raise DataError(f"finetune-eval summary {col + 1} is malformed ({what})") from None
    fig.tight_layout()
    return save_figure(fig, stem)


def _draw(axes: Any, s: dict[str, Any]) -> None:
    """One run's column: before vs after scores above, the callback's trajectory below."""
    c = s["comparison"]
    before = _num([v for row in s["scores_before"] for v in row])
    after = _num([v for row in s["scores_after"] for v in row])
    ax = axes[0]
    ax.scatter(before, after, s=10, alpha=0.6, color="tab:blue")
    top = max(np.nanmax(np.r_[before, after, 0.1]), 0.1) * 1.05
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlim(-0.02, top)
    ax.set_ylim(-0.02, top)
    ax.set_xlabel("retrieval score before training")
    ax.set_ylabel("retrieval score after training")
    k = next((key[3:-8] for key in c if key.startswith("top") and key.endswith("_overlap")), "10")
    pearson = "-" if c.get("pearson") is None else f"{c['pearson']:.3f}"
    ax.set_title(
        plain(f"{s['label']}\n{s['training']}\nPearson {pearson}, top-{k} overlap {c.get(f'top{k}_overlap')}/{k}"),
        fontsize=9,
    )
    ax.grid(alpha=0.3)

    t = s["trajectory"]
    steps = np.array(t["step"], dtype=float)
    ax = axes[1]
    for label, values in t["heads"].items():
        ax.plot(steps, _num(values), "o-", markersize=3, linewidth=1, label=label)
    ax.plot(steps, _num(t["jaccard"]), "k--", linewidth=1.5, label=f"top-{k} Jaccard vs step 0")
    ax.plot(steps, _num(t["niah_score"]) / 100, ":", color="tab:grey", linewidth=2, label="NIAH score / 100")
    ax.set_xlabel("training step")
    ax.set_ylabel("retrieval score (callback grid)")
    ax.set_ylim(-0.03, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
