"""The null distribution of a masking effect: is masking the top-K heads more harmful than masking
K random heads? Each random draw (one seed) is one sample of the null; the top-K effect is placed
in it by counting the draws at least as harmful.

An effect is a condition's metric minus the unmasked run's (higher metric is better, so a harmful
mask has a negative effect and a drop = -effect). With N random draws:

- `percentile`: the fraction of draws whose drop is at least the top-K drop (effect <= the top-K
  effect). Small means the top-K heads are more harmful than almost any draw; 0 means none of the
  N draws was as harmful.
- `p_value`: the permutation-style p-value (1 + #draws at least as harmful) / (1 + N): the chance,
  if the top-K heads were one more random draw, of a drop at least this large. It is never below
  1 / (1 + N), so 20 draws can show p = 0.048 at best.

    null_test(-0.4, [-0.1, -0.5, 0.0, -0.2])  # percentile 0.25, p_value 0.4

A sweep without K = 0 (`--mask-k 10`) has no unmasked run: its effects are then the conditions'
metrics themselves (`effect: "metric"` in the saved result). The unknown unmasked metric is the
same constant in the top-K effect and in every draw's, so it cancels in each comparison: the
percentile and the p-value are those of the sweep with K = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TIE = 1e-9  # effects are means of the same scores: equal drops must count as "at least as harmful"
# What an effect is (the saved result's "effect"; a result without the key is a "delta"): the table's line.
EFFECTS = {
    "delta": "effect = masked minus no mask",
    "metric": "effect = metric of the masked run; no unmasked run in this sweep",
}
# The experiments' units: kind -> (unit, scale from the saved metric, the label column).
UNITS = {"task-eval": ("points", 100.0, "K, metric"), "mask-eval": ("NIAH score", 1.0, "K")}


def null_rows(null: Any, metrics: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(label, `null_test` result) rows of a null distribution: mask-eval's list (one per K; label
    "K") or task-eval's dict (one per metric; label "K, metric", the first `metrics` of them). A
    null from summary.json reads as computed: its nulls (saved NaN) are NaN again."""
    if isinstance(null, dict):
        rows = [(f"{t['k']}, {m}", t) for m, t in list(null.items())[:metrics]]
    else:
        rows = [(str(t["k"]), t) for t in null]
    return [(label, {k: float("nan") if v is None else v for k, v in t.items()}) for label, t in rows]


def null_test(top_effect: float, draw_effects: Sequence[float]) -> dict[str, Any]:
    """The top-K effect against the draws' effects (NaN draws, e.g. unfinished, left out):
    {"top_effect", "draw_effects", "n_draws", "n_as_harmful", "percentile", "p_value"}; the last
    two NaN without a top-K effect or a draw."""
    draws = [float(e) for e in draw_effects if not np.isnan(e)]
    n = len(draws)
    top = float(top_effect)
    if n == 0 or np.isnan(top):
        harmful, percentile, p = 0, float("nan"), float("nan")
    else:
        harmful = sum(e <= top + TIE for e in draws)
        percentile, p = harmful / n, (1 + harmful) / (1 + n)
    return {
        "top_effect": top,
        "draw_effects": draws,
        "n_draws": n,
        "n_as_harmful": harmful,
        "percentile": percentile,
        "p_value": p,
    }


def null_table(
    rows: Sequence[tuple[str, dict[str, Any]]], unit: str, *, scale: float = 1.0, key: str = "K"
) -> list[str]:
    """Markdown lines: a line saying how to read it, then per (label, `null_test` result) the top-K
    effect, the draws' effects (mean [min, max]), N, the draws at least as harmful, the percentile
    and the p-value; `scale` turns a metric into its shown `unit`, `key` names the label column. No
    lines when no row has a draw."""
    if not any(t["n_draws"] for _, t in rows):
        return []
    effect = EFFECTS.get(str(next((t.get("effect", "delta") for _, t in rows), "delta")), EFFECTS["delta"])
    lines = [
        f"null distribution: {effect}; percentile = share of random draws at least "
        "as harmful as the top K; p-value = (1 + that count) / (1 + draws)",
        "",
        f"| {key} | top-K effect ({unit}) | random draws' effects ({unit}): mean [min, max] | draws | "
        "draws at least as harmful | percentile | p-value |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, t in rows:
        c = null_cells(t, scale)
        lines.append(
            f"| {label} | {c['top']} | {c['spread']} | {t['n_draws']} | {t['n_as_harmful']} | {c['percentile']} | "
            f"{c['p']} |"
        )
    return lines


def null_cells(t: dict[str, Any], scale: float = 1.0) -> dict[str, str]:
    """A `null_test` result as table cells ("-" where a number is missing): the top-K effect and
    the draws' effects (mean [min, max]) times `scale`, the percentile and the p-value."""
    d = np.asarray(t["draw_effects"], dtype=float) * scale
    return {
        "top": "-" if np.isnan(t["top_effect"]) else f"{scale * t['top_effect']:+.1f}",
        "spread": f"{d.mean():+.1f} [{d.min():+.1f}, {d.max():+.1f}]" if d.size else "-",
        "percentile": "-" if np.isnan(t["percentile"]) else f"{t['percentile']:.0%}",
        "p": "-" if np.isnan(t["p_value"]) else f"{t['p_value']:.3f}",
    }


def null_lines(kind: str, null: Any) -> list[str]:
    """`null_table` of a mask-eval or task-eval run's null distribution (`kind` picks its unit and
    label column, `UNITS`; `null` as computed or as saved in summary.json). No lines without a draw."""
    unit, scale, key = UNITS[kind]
    return null_table(null_rows(null), unit, scale=scale, key=key)
