"""Agreement of two detection runs of one model: do they find the same heads? (e.g. a short and a
long context grid).

- run_agreement: for one score of both runs, the overlap of their top-K heads (shared heads), the
  Jaccard index of the two top-K sets and the Pearson correlation of the score maps, each with a
  95 % bootstrap interval over kept samples;
- agreement_table: the same for every pair of two or more runs;
- interval_note: one line naming the sources that give no interval (no per-sample records);
- length_prefixes: a run cut to its samples up to each of its lengths (how short may a grid be?);
- run_cost: what each run's grid cost (samples, prompt tokens, seconds summed over its records).

Each run is resampled on its own, with the draws its own `DetectionResult.intervals` uses
(N_BOOT resamples of its kept samples, seed BOOT_SEED): resample b of run A meets resample b of
run B. A run compared with itself therefore gets an interval of zero width at the point value.
The top-K of a resample is ranked as the run ranks its heads (`heads.rank_heads` with the run's
tie-break score, resampled too); heads not scored (NaN) are never in a top-K.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, DataError
from .heads import rank_heads
from .results import BOOT_SEED, CI, N_BOOT, DetectionResult

METRICS = ("overlap", "jaccard", "pearson")
COLUMNS = ["a", "b", "score", "k", "metric", "value", "ci_low", "ci_high", "n_boot"]


def _top_set(scores: np.ndarray, tiebreak: np.ndarray | None, k: int) -> set[tuple[int, int]]:
    """The k best-ranked scored heads of a `[n_layers, n_heads]` map (NaN heads left out)."""
    return {h for h in rank_heads(scores, tiebreak)[:k] if not np.isnan(scores[h])}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r over heads scored in both maps; NaN below three heads or for a constant map."""
    x, y = x.ravel(), y.ravel()
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _metrics(sa: np.ndarray, ta: np.ndarray | None, sb: np.ndarray, tb: np.ndarray | None, k: int) -> list[float]:
    """overlap, jaccard, pearson of two maps (with their tie-break maps)."""
    top_a, top_b = _top_set(sa, ta, k), _top_set(sb, tb, k)
    union = len(top_a | top_b)
    shared = len(top_a & top_b)
    return [float(shared), shared / union if union else float("nan"), _pearson(sa, sb)]


def _resampled(result: DetectionResult, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`[n_boot, n_layers, n_heads]` means of the score and of its tie-break score over resampled
    kept samples (the draws of `DetectionResult.intervals`); None without two kept samples."""
    per = result.per_sample
    n = per.shape[0]
    if not result.has_per_sample or n < 2:
        return None
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])  # [B, n]
    second = "topk_mass" if result.score_name == "copy" else "copy"  # as DetectionResult.tiebreak
    tie = result.extra.get(second)
    tie = tie if tie is not None and tie.shape == per.shape else (per > 0).astype(float)  # else frequency
    shape = (n_boot, *result.shape)
    return (counts @ per.reshape(n, -1) / n).reshape(shape), (counts @ tie.reshape(n, -1) / n).reshape(shape)


def no_interval_reason(result: DetectionResult) -> str | None:
    """Why this result gives no bootstrap interval, or None when it does."""
    if not result.has_per_sample:
        return "no per-sample records (a summary, snapshot or shipped map)"
    if result.n_kept < 2:
        return "fewer than 2 kept samples"
    return None


def check_k(k: int, result: DetectionResult) -> None:
    n = result.shape[0] * result.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k must be a whole number from 1 to {n} (the heads of one map), not {k!r}")


def run_agreement(
    a: DetectionResult,
    b: DetectionResult,
    score: str = "copy",
    k: int = 10,
    *,
    n_boot: int = N_BOOT,
    ci: float = CI,
    seed: int = BOOT_SEED,
) -> pd.DataFrame:
    """Do two runs of one model find the same heads under `score`? One row per metric:

    - overlap: |top-K(a) & top-K(b)|, heads in both top-K sets (K when they agree);
    - jaccard: |top-K(a) & top-K(b)| / |top-K(a) | top-K(b)|;
    - pearson: Pearson r of the two score maps, over heads scored in both.

    Columns: a, b, score, k, metric, value, ci_low, ci_high (the `ci` percentile bootstrap
    interval; NaN when either run holds no per-sample records, see `no_interval_reason`), n_boot.
    Raises ConfigError for a score either run lacks or a k outside 1..heads, DataError for maps of
    different shapes.
    """
    if a.shape != b.shape:
        raise DataError(
            f"{a.name} ({a.shape[0]}x{a.shape[1]}) and {b.name} ({b.shape[0]}x{b.shape[1]}) differ in shape"
        )
    check_k(k, a)
    ra, rb = a.with_score(score), b.with_score(score)
    values = _metrics(ra.scores, ra.tiebreak, rb.scores, rb.tiebreak, k)
    boot_a, boot_b = _resampled(ra, n_boot, seed), _resampled(rb, n_boot, seed)
    low = high = [float("nan")] * len(METRICS)
    if boot_a is not None and boot_b is not None:
        draws = np.array([_metrics(sa, ta, sb, tb, k) for sa, ta, sb, tb in zip(*boot_a, *boot_b, strict=True)])
        with np.errstate(all="ignore"):
            qs = [
                np.nanquantile(draws[:, i], [(1 - ci) / 2, 1 - (1 - ci) / 2])
                if np.isfinite(draws[:, i]).any()
                else [np.nan, np.nan]
                for i in range(len(METRICS))
            ]
        low, high = [float(q[0]) for q in qs], [float(q[1]) for q in qs]
    n = n_boot if boot_a is not None and boot_b is not None else 0
    rows = [
        [a.name, b.name, score, k, m, v, lo, hi, n] for m, v, lo, hi in zip(METRICS, values, low, high, strict=True)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def agreement_table(
    results: Sequence[DetectionResult], score: str | Sequence[str] = "copy", k: int = 10
) -> pd.DataFrame:
    """`run_agreement` for every score and every pair a < b of the results, one frame (checked
    before any is computed)."""
    scores = [score] if isinstance(score, str) else list(score)
    for r in results:
        check_k(k, r)
        for name in scores:
            r.with_score(name)
    frames = [run_agreement(a, b, name, k) for name in scores for i, a in enumerate(results) for b in results[i + 1 :]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def length_prefixes(result: DetectionResult) -> list[DetectionResult]:
    """The run cut to its samples of length <= L, for each of its lengths L (shortest first; the
    last is the whole run): the cheaper grids the run contains. Needs per-sample records."""
    result.require_records("comparing grids by length")
    lengths = sorted({int(r["length"]) for r in result.records})
    out = []
    for cut in lengths:
        records = [r for r in result.records if int(r["length"]) <= cut]
        name = f"{result.name} (lengths <= {cut})" if cut < lengths[-1] else result.name
        out.append(DetectionResult.from_records(name, records, result.config).with_score(result.score_name))
    return out


def run_cost(result: DetectionResult) -> dict[str, Any]:
    """What a run's grid cost: lengths, depths, needles (of its records, else of its config),
    samples, kept samples, prompt tokens and detection seconds summed over the samples (the two
    sums None for a source without records); `created` and `machine` say when and where it ran."""
    cfg, recs = result.config, result.records
    grid: dict[str, Any] = cfg["grid"] if isinstance(cfg.get("grid"), dict) else {}
    if recs:
        grid = {
            "lengths": sorted({int(r["length"]) for r in recs}),
            "depths": sorted({float(r["depth"]) for r in recs}),
            "needles": sorted({str(r["needle_id"]) for r in recs}),
        }
    return {
        "name": result.name,
        "created": cfg.get("created"),
        "machine": cfg.get("machine"),
        "lengths": grid.get("lengths"),
        "depths": grid.get("depths"),
        "n_needles": len(grid.get("needles") or []) or None,
        "n_samples": len(recs) if recs else None,
        "n_kept": result.n_kept,
        "prompt_tokens": sum(int(r.get("prompt_tokens", 0)) for r in recs) if recs else None,
        "seconds": round(sum(float(r.get("seconds", 0.0)) for r in recs), 1) if recs else None,
    }


def interval_note(results: Sequence[DetectionResult]) -> str | None:
    """One line naming the results without a bootstrap interval (their intervals show as n/a)."""
    by_reason: dict[str, list[str]] = {}
    for r in results:
        why = no_interval_reason(r)
        if why:
            by_reason.setdefault(why, []).append(r.name)
    if not by_reason:
        return None
    parts = "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())
    return f"agreement intervals shown as n/a (point values only) for {parts}"
