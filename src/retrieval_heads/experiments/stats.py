"""Statistics of the experiments: percentile bootstrap intervals of a mean over examples, and of a
paired difference (two conditions on the same examples)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def bootstrap_ci(
    x: Sequence[float], *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean over examples, `n_boot` resamples from
    `numpy.random.default_rng(seed)`. NaN for no data; one value is its own interval."""
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(a.mean())
    if a.size == 1:
        return m, m, m
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return m, float(lo), float(hi)


def paired_difference(
    a: Mapping[str, float], b: Mapping[str, float], *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of `a[x] - b[x]` over the examples x in both (paired), with its percentile bootstrap
    interval (`bootstrap_ci`): {"mean", "low", "high", "n"}. NaN values are left out."""
    diffs = [a[x] - b[x] for x in a if x in b and not (np.isnan(a[x]) or np.isnan(b[x]))]
    mean, low, high = bootstrap_ci(diffs, n_boot=n_boot, ci=ci, seed=seed)
    return {"mean": mean, "low": low, "high": high, "n": len(diffs)}


def named(d: Mapping[str, float], prefix: str) -> dict[str, float]:
    """A `paired_difference` under row keys: {prefix, prefix_low, prefix_high, prefix_n}."""
    return {prefix: d["mean"], f"{prefix}_low": d["low"], f"{prefix}_high": d["high"], f"{prefix}_n": d["n"]}


def fmt_interval(d: Mapping[str, Any] | None, prefix: str = "", *, scale: float = 1.0, digits: int = 1) -> str:
    """'+1.2 [-0.3, +2.5]' of a {"mean", "low", "high"} dict (with `prefix`: of the keys `named`
    writes), scaled; '-' when there is no value."""
    keys = (prefix, f"{prefix}_low", f"{prefix}_high") if prefix else ("mean", "low", "high")
    vals = [float("nan") if d is None or d.get(k) is None else float(d[k]) for k in keys]
    if any(np.isnan(v) for v in vals):
        return "-"
    m, lo, hi = (scale * v for v in vals)
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
