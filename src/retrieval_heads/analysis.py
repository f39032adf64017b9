"""Statistics over detection results: the paper's property figures as tables.

- sparsity_table: share of heads per score bin and the retrieval-head count (paper Fig. 3);
- top_heads: top heads with retrieval score and activation frequency (Fig. 4);
- rank_stability: rank of the final top heads as kept samples accumulate (Fig. 13);
- correlation_matrix: Spearman / Pearson correlation of score maps of one shape (Fig. 6);
- niah_grid: needle success over context length x depth from per-sample records;
- score_agreement: how the scores of one run agree (a summary's score maps suffice);
- skipped_note: what a summary, shipped map or score file cannot show (no per-sample records).

Every function takes `DetectionResult`s (load them with `load_results`) and returns a pandas
DataFrame; statistics come from pandas and scipy. Score maps are `[n_layers, n_heads]`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from .errors import DataError
from .heads import rank_heads
from .results import RETRIEVAL_THRESHOLD, DetectionResult, sparsity

log = logging.getLogger(__name__)

SPARSITY_BINS = ("zero", "(0,0.1]", "(0.1,0.5]", ">0.5")
Method = Literal["pearson", "spearman"]


class ShapeMismatchError(DataError):
    """Score maps of different shapes cannot be correlated head by head."""


def head_label(layer: int, head: int) -> str:
    """`"L{layer}-H{head}"`, 0-based, the way heads are named in tables and figures."""
    return f"L{layer}-H{head}"


def load_results(paths: Iterable[str | Path]) -> list[DetectionResult]:
    """Load run folders or authors'-format JSON files; equal names get the file or folder name
    appended, then a number, so every result has a unique name."""
    folders = [Path(p) for p in paths]
    if not folders:
        raise DataError("no run folder or score file given")
    results = [DetectionResult.load(p) for p in folders]
    names = [r.name for r in results]
    for r, p in zip(results, folders, strict=True):
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({p.name})"
    if len({r.name for r in results}) < len(results):
        for i, r in enumerate(results, 1):
            r.name = f"{r.name} #{i}"
    return results


def n_retrieval_heads(scores: np.ndarray, threshold: float = RETRIEVAL_THRESHOLD) -> int:
    """Number of heads with score > threshold (NaN heads are not counted)."""
    return int((np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf) > threshold).sum())


def sparsity_table(results: Sequence[DetectionResult], threshold: float = RETRIEVAL_THRESHOLD) -> pd.DataFrame:
    """One row per result: shape, samples, share of heads in each score bin, retrieval heads.

    Columns: model, layers, heads, n_heads, n_samples, n_kept, zero, (0,0.1], (0.1,0.5], >0.5,
    n_retrieval_heads (score > threshold), retrieval_share. Shares are fractions in [0, 1].
    """
    rows = []
    for r in results:
        n_layers, n_heads = r.shape
        s = r.scores
        row = {
            "model": r.name,
            "layers": n_layers,
            "heads": n_heads,
            "n_heads": n_layers * n_heads,
            "n_samples": len(r.records) if r.records else r.n_kept,
            "n_kept": r.n_kept,
        }
        row.update(sparsity(s))
        n_ret = n_retrieval_heads(s, threshold)
        row["n_retrieval_heads"] = n_ret
        row["retrieval_share"] = n_ret / max(n_layers * n_heads, 1)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["threshold"] = threshold
    return df


def top_heads(result: DetectionResult, k: int = 20) -> pd.DataFrame:
    """The k best heads: rank, layer, head, label, score, its 95 % bootstrap interval over kept
    samples (ci_low, ci_high; NaN without per-sample scores), activation_frequency.

    activation_frequency is NaN where the result holds no kept sample.
    """
    low, high = result.intervals()
    rows = [
        {
            "model": result.name,
            "rank": i,
            "layer": h.layer,
            "head": h.head,
            "label": head_label(h.layer, h.head),
            "score": h.score,
            "ci_low": float(low[h.layer, h.head]),
            "ci_high": float(high[h.layer, h.head]),
            "activation_frequency": h.activation_frequency,
        }
        for i, h in enumerate(result.top(k), 1)
    ]
    cols = ["model", "rank", "layer", "head", "label", "score", "ci_low", "ci_high", "activation_frequency"]
    return pd.DataFrame(rows, columns=cols)


def score_map(result: DetectionResult, name: str) -> np.ndarray:
    """The `[n_layers, n_heads]` map of one of the result's scores. A summary (or snapshot) keeps
    only the means of its other scores, which is all a map needs."""
    if name == result.score_name:
        return result.scores
    if result.has_per_sample:
        return result.with_score(name).scores
    return np.asarray(result.extra[name].mean(axis=0), dtype=float)


def skipped_note(result: DetectionResult) -> str | None:
    """One line on what analyze and report leave out for this result because it holds no
    per-sample records (a summary, snapshot, shipped map or score file), else None."""
    parts = [] if result.has_per_sample else ["rank stability"]
    if result.n_kept and not has_records(result):
        parts.append("the NIAH grid")
    if not parts:
        return None
    return f"{result.name}: skipped {' and '.join(parts)} (they need the run folder's per-sample records)"


def score_agreement(result: DetectionResult, k: int = 10) -> pd.DataFrame:
    """How the scores of one detection run agree, per pair of scores: Spearman correlation of the
    head maps and the overlap of their top-k heads (shared heads / k). Works on a summary too."""
    names = result.score_names()
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sa, sb = score_map(result, a), score_map(result, b)
            x, y = sa.ravel(), sb.ravel()
            ok = ~(np.isnan(x) | np.isnan(y))
            rho = float(stats.spearmanr(x[ok], y[ok]).statistic) if ok.sum() > 2 else float("nan")
            overlap = len(set(rank_heads(sa)[:k]) & set(rank_heads(sb)[:k])) / k
            rows.append({"model": result.name, "score_a": a, "score_b": b, "spearman": rho, f"top{k}_overlap": overlap})
    return pd.DataFrame(rows, columns=["model", "score_a", "score_b", "spearman", f"top{k}_overlap"])


def _descending_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank of every head, 1 = best; ties share the best rank (scipy 'min')."""
    flat = np.nan_to_num(np.asarray(scores, dtype=float).ravel(), nan=-np.inf)
    return stats.rankdata(-flat, method="min").reshape(np.shape(scores))


def rank_stability(result: DetectionResult, k: int = 10, n_points: int = 20) -> pd.DataFrame:
    """Rank of the final top-k heads when only the first n kept samples are used (Fig. 13).

    Long format, one row per (n_samples, head): n_samples, label, layer, head, final_rank, rank,
    score, and overlap = share of the final top-k that is in the top-k at n_samples. Samples are
    taken in run order (the order of the score lists in the authors' files).
    """
    if not result.has_per_sample:
        raise DataError(f"{result.name}: only aggregate scores (a reference map), no per-sample scores to follow")
    per = result.per_sample  # [n_kept, L, H]
    n = per.shape[0]
    if n == 0:
        raise DataError(f"{result.name}: no kept sample, so no ranking to follow")
    final = result.top(k)
    steps = np.unique(np.linspace(1, n, num=min(n_points, n)).round().astype(int))
    cum = np.cumsum(per, axis=0)  # [n_kept, L, H]
    rows = []
    final_set = {(h.layer, h.head) for h in final}
    for m in steps:
        mean = cum[m - 1] / m
        ranks = _descending_ranks(mean)
        top_now = set(rank_heads(mean)[:k])
        overlap = len(final_set & top_now) / max(len(final_set), 1)
        for fr, h in enumerate(final, 1):
            rows.append(
                {
                    "n_samples": int(m),
                    "label": head_label(h.layer, h.head),
                    "layer": h.layer,
                    "head": h.head,
                    "final_rank": fr,
                    "rank": int(ranks[h.layer, h.head]),
                    "score": float(mean[h.layer, h.head]),
                    "overlap": overlap,
                }
            )
    return pd.DataFrame(rows)


def check_same_shape(results: Sequence[DetectionResult]) -> tuple[int, int]:
    shapes = {r.name: r.shape for r in results}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{n} {s[0]}x{s[1]}" for n, s in shapes.items())
        raise ShapeMismatchError(
            f"score maps differ in shape (layers x heads): {desc}; "
            "only runs of one architecture can be compared head by head"
        )
    return next(iter(shapes.values()))


def score_frame(results: Sequence[DetectionResult]) -> pd.DataFrame:
    """Heads as rows (index `L{l}-H{h}`), one column of retrieval scores per result."""
    n_layers, n_heads = check_same_shape(results)
    index = [head_label(l, h) for l in range(n_layers) for h in range(n_heads)]
    return pd.DataFrame({r.name: r.scores.ravel() for r in results}, index=index)


def correlation_matrix(results: Sequence[DetectionResult], method: Method = "pearson") -> pd.DataFrame:
    """Correlation of the score maps, result x result (Fig. 6). Heads NaN in either map are left
    out of that pair; a constant map gives NaN. Raises ShapeMismatchError for different shapes."""
    if method not in ("pearson", "spearman"):
        raise DataError(f"unknown correlation method {method!r}; use pearson or spearman")
    return score_frame(results).corr(method=method)


def correlation_pairs(results: Sequence[DetectionResult]) -> pd.DataFrame:
    """Every pair a < b: pearson r and p-value, spearman rho and p-value (scipy.stats)."""
    frame = score_frame(results)
    rows = []
    names = list(frame.columns)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = frame[a].to_numpy(), frame[b].to_numpy()
            ok = ~(np.isnan(x) | np.isnan(y))
            x, y = x[ok], y[ok]
            if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
                pr = pp = sr = sp = float("nan")
            else:
                pr, pp = stats.pearsonr(x, y)
                sr, sp = stats.spearmanr(x, y)
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "n_heads": int(ok.sum()),
                    "pearson": float(pr),
                    "pearson_p": float(pp),
                    "spearman": float(sr),
                    "spearman_p": float(sp),
                }
            )
    return pd.DataFrame(rows, columns=["a", "b", "n_heads", "pearson", "pearson_p", "spearman", "spearman_p"])


def niah_grid(result: DetectionResult, value: Literal["answer_recall", "kept"] = "answer_recall") -> pd.DataFrame:
    """Needle success, depth (rows, %) x context length (columns, tokens), mean over needles.

    `answer_recall` is the ROUGE-1 recall of the answer; `kept` the share of samples retrieved.
    Raises DataError when the result holds no per-sample records (an authors' score file).
    """
    if not result.records:
        raise DataError(f"{result.name}: no per-sample records (needle success needs a run folder)")
    df = pd.DataFrame(result.records)
    missing = {"length", "depth", value} - set(df.columns)
    if missing:
        raise DataError(f"{result.name}: records lack {sorted(missing)}")
    df[value] = df[value].astype(float)
    grid = df.pivot_table(index="depth", columns="length", values=value, aggfunc="mean")
    return grid.sort_index().sort_index(axis=1)


def has_records(result: DetectionResult) -> bool:
    return bool(result.records) and all("length" in r and "depth" in r for r in result.records[:1])
