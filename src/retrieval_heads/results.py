"""DetectionResult: per-head retrieval scores and activation frequency, loadable from a run folder
or from any authors'-format score file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError
from .heads import rank_heads, top_heads
from .reference import is_reference, is_reference_map, parse_reference_map, reference_path
from .runs import CONFIG_FILE, RECORDS_FILE, SCORES_FILE, SUMMARY_FILE, read_config, read_numbered_records
from .scorefile import MAX_HEADS, MAX_LAYERS, atomic_write_text, parse_scores, read_json, read_scores, write_scores
from .scoring import aggregate

# Bootstrap of the per-head scores over kept samples (intervals, top-K stability); saved in summaries.
N_BOOT, CI, BOOT_SEED = 1000, 0.95, 0

SCORES_DIR = "scores"  # the other scores, one authors'-format file each

RETRIEVAL_THRESHOLD = 0.1  # paper: a head is a retrieval head when its score > 0.1


def _matrix(value: Any, where: str, what: str) -> np.ndarray:
    """A `[layers][heads]` list of finite numbers as an array, else one DataError line."""
    if not isinstance(value, list) or not value or len(value) > MAX_LAYERS:
        raise DataError(f"{where}: {what} must be a non-empty [layer][head] list (at most {MAX_LAYERS} layers)")
    try:
        a = np.asarray(value, dtype=float)
    except (ValueError, TypeError, OverflowError):
        raise DataError(f"{where}: {what} must be a [layer][head] list of numbers of one shape") from None
    if a.ndim != 2 or not 0 < a.shape[1] <= MAX_HEADS:
        raise DataError(f"{where}: {what} must be a [layer][head] list of numbers (at most {MAX_HEADS} heads)")
    if not np.isfinite(a).all():
        raise DataError(f"{where}: {what} holds a non-finite number")
    return a


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_records(records: Sequence[Any], source: str = "records", lines: Sequence[int] | None = None) -> None:
    """Detection records as `from_records` needs them, else one DataError naming `source:line`:
    objects with unique ids; `copy_counts` non-negative counts of one `[layers][heads]` shape;
    `kept` a boolean; `needle_tokens` (and `span_tokens`) positive integers; the other scores,
    when present, of the same shape and names in every kept record."""
    shape: tuple[int, ...] | None = None
    names: list[str] | None = None
    seen: dict[str, str] = {}
    for i, r in enumerate(records):
        where = f"{source}:{lines[i] if lines is not None else i + 1}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: a record must be a JSON object")
        rid = r.get("id")
        if rid is not None:
            if not isinstance(rid, str) or rid in seen:
                raise DataError(f"{where}: duplicate or non-string record id {str(rid)[:80]!r}")
            seen[rid] = where
        if "copy_counts" not in r:
            raise DataError(f"{where}: record has no copy_counts (not a detection record?)")
        counts = _matrix(r["copy_counts"], where, "copy_counts")
        if (counts < 0).any():
            raise DataError(f"{where}: copy_counts holds a negative count")
        if shape is None:
            shape = counts.shape
        elif counts.shape != shape:
            raise DataError(f"{where}: copy_counts has shape {counts.shape}, the first record {shape}")
        kept = r.get("kept", False)
        if not isinstance(kept, bool):
            raise DataError(f"{where}: kept must be true or false")
        for key in ("needle_tokens", "span_tokens"):
            if (kept and key == "needle_tokens") or key in r:
                if not _positive_int(r.get(key)):
                    raise DataError(f"{where}: {key} must be a positive integer, got {str(r.get(key))[:40]}")
        if kept:
            extra = r.get("attention_scores") or {}
            if not isinstance(extra, dict):
                raise DataError(f"{where}: attention_scores must be an object of [layer][head] maps")
            if names is None:
                names = sorted(extra)
            elif sorted(extra) != names:
                raise DataError(f"{where}: attention_scores names {sorted(extra)} differ from the first kept record's")
            for n, m in extra.items():
                if _matrix(m, where, f"attention_scores[{n!r}]").shape != shape:
                    raise DataError(f"{where}: attention_scores[{n!r}] does not have the shape {shape}")


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
    """Share of heads with score = 0, in (0, 0.1], in (0.1, 0.5], > 0.5 (paper Fig. 3)."""
    s = np.asarray(scores, dtype=float)
    s = s[~np.isnan(s)]
    n = max(s.size, 1)
    return {
        "zero": float((s == 0).sum() / n),
        "(0,0.1]": float(((s > 0) & (s <= 0.1)).sum() / n),
        "(0.1,0.5]": float(((s > 0.1) & (s <= 0.5)).sum() / n),
        ">0.5": float((s > 0.5).sum() / n),
    }


def _json_map(a: np.ndarray) -> list[Any]:
    """NaN -> None (JSON null), as nested lists."""
    out = a.astype(object)
    out[np.isnan(a)] = None
    nested: list[Any] = out.tolist()
    return nested


def _json_float(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


@dataclass
class DetectionResult:
    """Scores of one model. Arrays are `[n_layers, n_heads]`; NaN means not scored.

    per_sample: `[n_kept, n_layers, n_heads]`, the kept samples' scores in run order.
    records: the per-sample records (all samples, kept or not) when loaded from a run folder.
    aggregates: (retrieval score, activation frequency, n_kept) of a result known only by its
    aggregates (the shipped reference maps); `per_sample` is then empty `[0, L, H]`.
    extra: the other scores of the same kept samples, name -> `[n_kept, n_layers, n_heads]`
    (topk_mass, needle_mass, distant_mass; see `scoring.attention_scores`). `per_sample` is the
    copy score (the paper's retrieval score); `with_score(name)` makes any of them the score.
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
        if not self.has_per_sample:
            raise ConfigError(
                f"{self.name} holds aggregates of its {self.score_name!r} score only (a summary, snapshot or"
                f" shipped map); score {name!r} needs the run folder with its records"
            )
        pool = {self.score_name: self.per_sample, **self.extra}
        if name not in pool:
            raise ConfigError(f"{self.name} has no score {name!r}; it has: {', '.join(self.score_names())}")
        rest = {n: v for n, v in pool.items() if n != name}
        return DetectionResult(self.name, pool[name], self.records, self.config, None, rest, name)

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
            scores = np.asarray(summary["scores"], dtype=float)  # null (not scored) -> NaN
            freq = np.asarray(summary["activation_frequency"], dtype=float)
            if scores.ndim != 2 or freq.shape != scores.shape:
                raise ValueError("maps are not [layer][head] of one shape")
            if not (0 < scores.shape[0] <= MAX_LAYERS and 0 < scores.shape[1] <= MAX_HEADS):
                raise ValueError(f"shape {scores.shape} out of bounds")
            name = str(summary.get("name") or config.get("model", "run"))
            others = {
                str(n): np.asarray(m["scores"], dtype=float)[None]  # one row: its mean is the aggregate
                for n, m in (summary.get("other_scores") or {}).items()
            }
            if any(o.shape[1:] != scores.shape for o in others.values()):
                raise ValueError("other scores are not of the main score's shape")
            result = replace(
                cls.from_aggregate(name, scores, freq, int(summary["n_kept"]), config),
                score_name=str(summary.get("score", "copy")),
                extra=others,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{source} is not a detection summary ({e})") from None
        return result

    @property
    def has_per_sample(self) -> bool:
        """Whether per-sample scores exist (rank stability and bootstrap need them)."""
        return self.aggregates is None

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
        """The k heads with the highest retrieval score (NaN last; ties: lower layer, then lower head)."""
        s, f = self.scores, self.activation_frequency
        return [HeadScore(l, h, float(s[l, h]), float(f[l, h])) for l, h in top_heads(s, k, self.tiebreak)]

    def retrieval_heads(self, threshold: float = RETRIEVAL_THRESHOLD) -> list[tuple[int, int]]:
        return [(int(l), int(h)) for l, h in zip(*np.nonzero(np.nan_to_num(self.scores) > threshold), strict=True)]

    def sparsity(self) -> dict[str, float]:
        return sparsity(self.scores)

    def summary(self, k: int = 20) -> dict[str, Any]:
        low, high = self.intervals()
        maps = {n: self.with_score(n) for n in self.score_names()}
        return {
            "score": self.score_name,
            "name": self.name,
            "shape": list(self.shape),
            "n_samples": len(self.records) if self.records else self.n_kept,
            "n_kept": self.n_kept,
            "sparsity": self.sparsity(),
            "n_retrieval_heads": len(self.retrieval_heads()),
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
        }

    def save(self, folder: str | Path) -> None:
        """Write the authors' score file and a summary (atomically) into `folder`."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        write_scores(d / SCORES_FILE, self.per_sample)
        for name, per in self.extra.items():  # every other score, in the authors' format too
            (d / SCORES_DIR).mkdir(exist_ok=True)
            write_scores(d / SCORES_DIR / f"{name}.json", per)
        atomic_write_text(d / SUMMARY_FILE, json.dumps(self.summary(), indent=1))

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
