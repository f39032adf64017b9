"""Statistics of the experiments: percentile bootstrap intervals of a mean over examples, and of a
paired difference (two conditions on the same examples)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of `scores` separating positive from negative `labels`: the
    probability that a random positive scores above a random negative (ties count one half; the
    Mann-Whitney U statistic). NaN scores rank lowest; NaN when a class is empty."""
    from scipy.stats import rankdata

    s = np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auroc(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(AUROC, low, high): percentile bootstrap over examples, resampled within each class (the
    class sizes stay fixed) with `numpy.random.default_rng(seed)`."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    return _within_class_bootstrap(auroc(s, y), lambda idx: auroc(s[idx], y[idx]), y, n_boot, ci, seed)


def bootstrap_auroc_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    labels: Sequence[bool] | np.ndarray,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(AUROC(a) - AUROC(b), low, high): two scores of the same examples, compared on the same
    bootstrap resamples (within each class, as `bootstrap_auroc`), so the interval is paired."""
    x, z, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float), np.asarray(labels, dtype=bool)
    point = auroc(x, y) - auroc(z, y)
    return _within_class_bootstrap(
        point, lambda idx: auroc(x[idx], y[idx]) - auroc(z[idx], y[idx]), y, n_boot, ci, seed
    )


def _within_class_bootstrap(
    point: float, statistic: Callable[[np.ndarray], float], y: np.ndarray, n_boot: int, ci: float, seed: int
) -> tuple[float, float, float]:
    """(point, low, high): the percentile interval of `statistic(idx)` over `n_boot` resamples of
    the example indices, drawn within each class of `y` (the class sizes stay fixed) with
    `numpy.random.default_rng(seed)`; NaN bounds when the point estimate is NaN."""
    if np.isnan(point):
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    pos, neg = np.nonzero(y)[0], np.nonzero(~y)[0]
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        vals.append(statistic(idx))
    lo, hi = np.quantile(vals, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return point, float(lo), float(hi)
