"""Statistics of the experiments: percentile bootstrap intervals of a mean over examples."""

from __future__ import annotations

from collections.abc import Sequence

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
