"""DetectionResult: per-head retrieval scores and activation frequency, loadable from a run folder
or from any authors'-format score file; `require_kept`: what every consumer of a detection run
calls before using its scores (refuses a run that kept no sample, warns below `MIN_KEPT`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, DataError
from .heads import rank_heads, top_heads
from .reference import is_reference, is_reference_map, parse_reference_map, reference_path
from .runs import (
    CONFIG_FILE,
    RECORDS_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    read_config,
    read_numbered_records,
    strict_json,
)
from .scorefile import MAX_HEADS, MAX_LAYERS, atomic_write_text, parse_scores, read_json, read_scores, write_scores
from .scoring import aggregate, check_records

# Bootstrap of the per-head scores over kept samples (intervals, top-K stability); saved in summaries.
N_BOOT, CI, BOOT_SEED = 1000, 0.95, 0

SCORES_DIR = "scores"  # the other scores, one authors'-format file each

RETRIEVAL_THRESHOLD = 0.1  # paper: a head is a retrieval head when its score > 0.1

# Fewer kept samples than this: the scores are used and shown, with a warning (a top-10 built on a
# handful of samples changes with every resample; see `top_k_stability`).
MIN_KEPT = 5

logger = logging.getLogger(__name__)


def _score_map(value: Any, what: str) -> np.ndarray:
    """A summary's map as floats (null -> NaN, not scored); a negative or infinite score is a
    ValueError: ranking by it would put a corrupted head first."""
    a = np.asarray(value, dtype=float)
    if np.any(np.isinf(a)) or np.any(a < 0):
        raise ValueError(f"{what} holds a negative or infinite score")
    return a


@dataclass(frozen=True)
class HeadScore:
    layer: int
    head: int
    score: float
    activation_frequency: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "head": self.head,
            "score": self.score,
            "activation_frequency": self.activation_frequency,
        }


def sparsity(scores: np.ndarray) -> dict[str, float]:
    """Share of heads with score = 0, in (0, 0.1], in (0.1, 0.5], > 0.5 (paper Fig. 3); NaN
    when no head is scored."""
    s = np.asarray(scores, dtype=float)
    s = s[~np.isnan(s)]
    if not s.size:  # no scored head: undefined (null in JSON), not 0 %
        return dict.fromkeys(("zero", "(0,0.1]", "(0.1,0.5]", ">0.5"), float("nan"))
    n = s.size
    return {
        "zero": float((s == 0).sum() / n),
        "(0,0.1]": float(((s > 0) & (s <= 0.1)).sum() / n),
        "(0.1,0.5]": float(((s > 0.1) & (s <= 0.5)).sum() / n),
        ">0.5": float((s > 0.5).sum() / n),
    }


def _json_map(a: np.ndarray) -> list[Any]:
    """NaN -> None (JSON null), as nested lists."""
    nested: list[Any] = strict_json(np.asarray(a, dtype=float).tolist())
    return nested


def _json_float(x: float) -> float | None:
    out: float | None = strict_json(float(x))
    return out


@dataclass
class DetectionResult:
    """Scores of one model. Arrays are `[n_layers, n_heads]`; NaN means not scored.

    A result is in one of two modes (`mode`):
    - "records": a full run (a run folder's records, detection in this process, an authors'-format
      score file): `per_sample` `[n_kept, n_layers, n_heads]` holds the kept samples' scores in
      run order, so bootstrap intervals, rank stability and every other score (`with_score`) are
      available; `records` holds every sample's record (kept or not) when loaded from a run.
    - "summary": aggregates only (a run's summary.json, e.g. a docs/runs snapshot, or a shipped
      reference map): `aggregates` = (retrieval score, activation frequency, n_kept) and
      `per_sample` is empty `[0, L, H]`. Rankings, top heads and sparsity work as in a full run;
      intervals and stability are NaN; `with_score` takes another score's mean map (a summary
      keeps one per score); `require_records` raises one ConfigError.

    extra: the other scores of the same kept samples, name -> `[n_kept, n_layers, n_heads]`
    (topk_mass, needle_mass, distant_mass; see `scoring.attention_scores`). `per_sample` is the
    copy score (the paper's retrieval score); `with_score(name)` makes any of them the score.
    A run that kept no sample (`n_kept == 0`) scores no head: every score is NaN, `top` is empty;
    consumers refuse it through `require_kept`.
    """

    name: str
    per_sample: np.ndarray
    records: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    aggregates: tuple[np.ndarray, np.ndarray, int] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    score_name: str = "copy"

    def score_names(self) -> list[str]:
        """The scores this result holds: the current one first."""
        return [self.score_name, *(n for n in self.extra if n != self.score_name)]

    def with_score(self, name: str) -> DetectionResult:
        """The same result with `name` as its score (rankings, top heads, sparsity follow it)."""
        if name == self.score_name:
            return self
        if self.aggregates is not None:
            return self._summary_with_score(name)
        pool = {self.score_name: self.per_sample, **self.extra}
        if name not in pool:
            raise ConfigError(f"{self.name} has no score {name!r}; it has: {', '.join(self.score_names())}")
        rest = {n: v for n, v in pool.items() if n != name}
        return DetectionResult(self.name, pool[name], self.records, self.config, None, rest, name)

    def _summary_with_score(self, name: str) -> DetectionResult:
        """`with_score` on a summary: the other score's mean map (a summary keeps one per score).
        Its activation frequency is not stored; a head counts as active where its mean is > 0."""
        assert self.aggregates is not None
        scores, _, n_kept = self.aggregates
        pool = {self.score_name: scores[None], **self.extra}
        if name not in pool:
            raise ConfigError(f"{self.name} has no score {name!r}; it has: {', '.join(self.score_names())}")
        m = np.asarray(pool[name][0], dtype=float)
        freq = np.where(np.isnan(m), np.nan, (m > 0).astype(float))
        rest = {n: v for n, v in pool.items() if n != name}
        return replace(self, aggregates=(m, freq, n_kept), extra=rest, score_name=name)

    def intervals(
        self, *, n_boot: int = N_BOOT, ci: float = CI, seed: int = BOOT_SEED
    ) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap interval of each head's score over kept samples: (low, high), each
        `[n_layers, n_heads]` (NaN without per-sample scores)."""
        means = self._bootstrap_means(n_boot, seed)
        if means is None:
            nan = np.full(self.shape, np.nan)
            return nan, nan.copy()
        lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
        return lo.reshape(self.shape), hi.reshape(self.shape)

    def top_k_stability(self, k: int = 10, *, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> float:
        """Mean Jaccard index between the top-k heads and the top-k of each bootstrap resample of
        the kept samples (1 = the same heads whatever the resample; NaN without per-sample scores)."""
        means = self._bootstrap_means(n_boot, seed)
        if means is None:
            return float("nan")
        ref = set(top_heads(self.scores, k))
        jac = []
        for m in means:
            other = set(top_heads(m.reshape(self.shape), k))
            jac.append(len(ref & other) / len(ref | other))
        return float(np.mean(jac))

    def _bootstrap_means(self, n_boot: int, seed: int) -> np.ndarray | None:
        """`[n_boot, n_layers * n_heads]` means over resampled kept samples (seeded)."""
        n = self.per_sample.shape[0]
        if not self.has_per_sample or n < 2:
            return None
        rng = np.random.default_rng(seed)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])  # [B, n]
        means: np.ndarray = counts @ self.per_sample.reshape(n, -1) / n
        return means

    @classmethod
    def from_aggregate(
        cls,
        name: str,
        scores: np.ndarray,
        activation_frequency: np.ndarray,
        n_kept: int,
        config: dict[str, Any] | None = None,
    ) -> DetectionResult:
        s, f = np.asarray(scores, dtype=float), np.asarray(activation_frequency, dtype=float)
        return cls(name, np.zeros((0, *s.shape)), [], dict(config or {}), (s, f, int(n_kept)))

    @classmethod
    def from_summary(cls, summary: Any, config: dict[str, Any], source: str) -> DetectionResult:
        """From a run's summary.json: its main score's aggregates (no per-sample scores, so no
        intervals); the other scores' means are kept only to break ties as the full run does."""
        if not isinstance(summary, dict):
            raise DataError(f"{source}: must be a JSON object")
        try:
            scores = _score_map(summary["scores"], "scores")  # null (not scored) -> NaN
            freq = _score_map(summary["activation_frequency"], "activation_frequency")
            if np.any(freq > 1):
                raise ValueError("activation_frequency above 1")
            n_kept = summary["n_kept"]
            if not isinstance(n_kept, int) or isinstance(n_kept, bool) or n_kept < 0:
                raise ValueError(f"n_kept must be a count, not {str(n_kept)[:20]}")
            other_scores = summary.get("other_scores") or {}
            if not isinstance(other_scores, dict) or not all(isinstance(m, dict) for m in other_scores.values()):
                raise ValueError("other_scores must map a score name to {'scores': [[...]]}")
            if scores.ndim != 2 or freq.shape != scores.shape:
                raise ValueError("maps are not [layer][head] of one shape")
            if not (0 < scores.shape[0] <= MAX_LAYERS and 0 < scores.shape[1] <= MAX_HEADS):
                raise ValueError(f"shape {scores.shape} out of bounds")
            name = str(summary.get("name") or config.get("model", "run"))
            others = {
                str(n): _score_map(m["scores"], f"other_scores[{str(n)[:20]!r}]")[None]  # one row: the mean
                for n, m in other_scores.items()
            }
            if any(o.shape[1:] != scores.shape for o in others.values()):
                raise ValueError("other scores are not of the main score's shape")
            result = replace(
                cls.from_aggregate(name, scores, freq, n_kept, config),
                score_name=str(summary.get("score", "copy")),
                extra=others,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{source} is not a detection summary ({e})") from None
        return result

    @property
    def mode(self) -> Literal["records", "summary"]:
        """ "records" (per-sample scores of a full run) or "summary" (aggregates only); see the class."""
        return "summary" if self.aggregates is not None else "records"

    @property
    def has_per_sample(self) -> bool:
        """Whether per-sample scores exist (rank stability and bootstrap need them): mode "records"."""
        return self.mode == "records"

    def require_records(self, what: str) -> None:
        """One ConfigError when `what` needs the per-sample scores and this result is a summary."""
        if self.mode == "summary":
            raise ConfigError(
                f"{self.name} holds aggregates of its {self.score_name!r} score only (a summary, snapshot or"
                f" shipped map); {what} needs the run folder with its records"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.per_sample.shape[1:])

    @property
    def scores(self) -> np.ndarray:
        return self.aggregates[0] if self.aggregates else aggregate(self.per_sample)[0]

    @property
    def activation_frequency(self) -> np.ndarray:
        return self.aggregates[1] if self.aggregates else aggregate(self.per_sample)[1]

    @property
    def n_kept(self) -> int:
        return self.aggregates[2] if self.aggregates else int(self.per_sample.shape[0])

    @property
    def tiebreak(self) -> np.ndarray | None:
        """The second score that breaks ties in every ranking of this result: `topk_mass` for the
        copy score (dense: it orders the many heads that never copy), the copy score for any other
        score, else the activation frequency; never the layer index (that comes only after)."""
        second = "topk_mass" if self.score_name == "copy" else "copy"
        pool = {self.score_name: self.per_sample, **self.extra}
        if second in pool and pool[second].shape[0]:
            return np.asarray(pool[second].mean(axis=0), dtype=float)
        return self.activation_frequency if self.n_kept else None

    def ranking_scores(self) -> np.ndarray:
        """A `[n_layers, n_heads]` map whose order is this result's ranking (score, then the
        tie-break score): n_heads_total - position, NaN where not scored. For consumers that take
        one map to rank by (KV-head rankings, masking conditions)."""
        s = self.scores
        order = rank_heads(s, self.tiebreak)
        out = np.full(s.shape, np.nan)
        for pos, (layer, head) in enumerate(order):
            if not np.isnan(s[layer, head]):
                out[layer, head] = float(len(order) - pos)
        return out

    def top(self, k: int = 20) -> list[HeadScore]:
        """The k best-ranked scored heads (`heads.rank_heads`): highest score first, ties broken by
        the `tiebreak` score, then the lower layer and head. Heads not scored (NaN) are never
        listed: a run that kept no sample has no top heads."""
        s, f = self.scores, self.activation_frequency
        heads = [(l, h) for l, h in top_heads(s, k, self.tiebreak) if not np.isnan(s[l, h])]
        return [HeadScore(l, h, float(s[l, h]), float(f[l, h])) for l, h in heads]

    def retrieval_table(self) -> list[dict[str, Any]]:
        """Per (length, depth) cell of the detection grid, from the records: samples run, kept, mean
        answer recall (where the model stops retrieving; the NIAH heatmap of the grid itself).
        Empty without records (a summary or a score file)."""
        cells: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
        for r in self.records:
            at = (r.get("length"), r.get("depth"))
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in at):  # numbers sort
                cells.setdefault(at, []).append(r)
        table = []
        for (length, depth), rs in sorted(cells.items()):
            recalls = [float(r["answer_recall"]) for r in rs if isinstance(r.get("answer_recall"), (int, float))]
            table.append(
                {
                    "length": length,
                    "depth": depth,
                    "run": len(rs),
                    "kept": sum(r.get("kept") is True for r in rs),
                    "mean_recall": round(float(np.mean(recalls)), 4) if recalls else None,
                }
            )
        return table

    def retrieval_heads(self, threshold: float = RETRIEVAL_THRESHOLD) -> list[tuple[int, int]]:
        return [(int(l), int(h)) for l, h in zip(*np.nonzero(np.nan_to_num(self.scores) > threshold), strict=True)]

    def sparsity(self) -> dict[str, float]:
        return sparsity(self.scores)

    def summary(self, k: int = 20) -> dict[str, Any]:
        """What summary.json holds (strict JSON once `runs.strict_json` turns NaN into null). A run
        that kept no sample: `n_kept` 0, every score null, no top heads."""
        low, high = self.intervals()
        maps = {n: self.with_score(n) for n in self.score_names()}
        table = self.retrieval_table()
        return {
            "score": self.score_name,
            "name": self.name,
            "shape": list(self.shape),
            "n_samples": len(self.records) if self.records else self.n_kept,
            "n_kept": self.n_kept,
            "sparsity": self.sparsity(),
            "n_retrieval_heads": len(self.retrieval_heads()) if self.n_kept else None,
            "top": [h.to_dict() for h in self.top(k)],
            "scores": _json_map(self.scores),
            "activation_frequency": _json_map(self.activation_frequency),
            "intervals": {
                "method": "percentile bootstrap over kept samples",
                "n_boot": N_BOOT,
                "ci": CI,
                "seed": BOOT_SEED,
                "low": _json_map(low),
                "high": _json_map(high),
            },
            "top_10_stability": _json_float(self.top_k_stability(10)),
            "other_scores": {
                n: {
                    "scores": _json_map(r.scores),
                    "top": [h.to_dict() for h in r.top(k)],
                    "top_10_stability": _json_float(r.top_k_stability(10)),
                }
                for n, r in maps.items()
                if n != self.score_name
            },
            **({"retrieval_by_cell": table} if table else {}),
        }

    def save(self, folder: str | Path) -> None:
        """Write the authors' score file and a summary (atomically) into `folder`."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        # a summary has no per-sample rows: its mean map is written as the one row (same scores on load)
        write_scores(d / SCORES_FILE, self.per_sample if self.aggregates is None else self.scores[None])
        for name, per in self.extra.items():  # every other score, in the authors' format too
            (d / SCORES_DIR).mkdir(exist_ok=True)
            write_scores(d / SCORES_DIR / f"{name}.json", per)
        atomic_write_text(d / SUMMARY_FILE, json.dumps(strict_json(self.summary()), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> DetectionResult:
        """From a run folder (records + config), an authors'-format JSON file, or a shipped
        reference map (`ref:<name>`, see `retrieval_heads.reference`)."""
        if is_reference(path):
            path = reference_path(str(path))
        p = Path(path)
        if p.is_dir():
            numbered = read_numbered_records(p / RECORDS_FILE)
            cfg_path = p / CONFIG_FILE
            config = read_config(cfg_path) if cfg_path.exists() else {}
            if numbered:
                records = [r for _, r in numbered]
                name = str(config.get("model", p.name))
                lines = [i for i, _ in numbered]
                return cls.from_records(name, records, config, source=str(p / RECORDS_FILE), lines=lines)
            if (p / SCORES_FILE).exists():
                return cls(config.get("model", p.name), read_scores(p / SCORES_FILE), [], config)
            if (p / SUMMARY_FILE).exists():  # a snapshot (docs/runs/): aggregates only
                return cls.from_summary(read_json(p / SUMMARY_FILE), config, str(p / SUMMARY_FILE))
            raise DataError(f"{p}: no records, score file or summary in this folder")
        if not p.exists():
            raise DataError(f"{p}: not found")
        obj = read_json(p)
        if is_reference_map(obj):
            scores, freq, n_kept, provenance = parse_reference_map(obj, str(p))
            return cls.from_aggregate(
                provenance.get("name") or p.stem,
                scores,
                freq,
                n_kept,
                {"model": provenance.get("name") or p.stem, "reference": provenance},
            )
        return cls(p.stem, parse_scores(obj, str(p)))

    @classmethod
    def from_records(
        cls,
        name: str,
        records: list[dict[str, Any]],
        config: dict[str, Any] | None = None,
        *,
        source: str = "records",
        lines: Sequence[int] | None = None,
    ) -> DetectionResult:
        """From detection records (validated by `check_records`; errors name `source:line`)."""
        check_records(records, source, lines)
        kept = [r for r in records if r.get("kept")]
        if records:
            shape = np.asarray(records[0]["copy_counts"]).shape
        else:
            shape = (0, 0)
        per = np.zeros((len(kept), *shape))
        for i, r in enumerate(kept):
            # runs before the answer span scored the whole needle: needle_tokens is their span
            per[i] = np.asarray(r["copy_counts"], dtype=float) / float(r.get("span_tokens", r["needle_tokens"]))
        names = sorted(kept[0].get("attention_scores") or {}) if kept else []  # records are written key-sorted
        extra = {n: np.array([np.asarray(r["attention_scores"][n], dtype=float) for r in kept]) for n in names}
        return cls(name, per, list(records), dict(config or {}), extra=extra)


def require_kept(result: DetectionResult, source: str | Path | None = None) -> DetectionResult:
    """What every consumer of a detection run (mask-eval, task-eval, kv-eval, export-heads,
    attribute, the kvpress press, the Trainer callback) calls before using its scores: a run that
    kept no sample is refused with one ConfigError line (its scores are undefined); fewer than
    `MIN_KEPT` kept samples log a warning. Returns `result`."""
    where = str(source) if source is not None else result.name
    if result.n_kept == 0:
        ran = f" (0 of {len(result.records)} samples retrieved the needle)" if result.records else ""
        raise ConfigError(
            f"{where}: no kept detection sample{ran}, so its head scores are undefined; "
            "run detect again with shorter --lengths or a lower --recall-threshold"
        )
    if result.n_kept < MIN_KEPT:
        logger.warning(
            "%s: head scores from only %d kept detection sample(s), fewer than %d: the ranking of heads is unstable",
            where,
            result.n_kept,
            MIN_KEPT,
        )
    return result
