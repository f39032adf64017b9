"""DetectionResult: per-head retrieval scores and activation frequency, loadable from a run folder
or from any authors'-format score file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .heads import top_heads
from .reference import is_reference, is_reference_map, parse_reference_map, reference_path
from .runs import CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, read_records
from .scorefile import atomic_write_text, parse_scores, read_json, read_scores, write_scores
from .scoring import aggregate

SCORES_FILE = "retrieval_scores.json"  # authors' format

RETRIEVAL_THRESHOLD = 0.1  # paper: a head is a retrieval head when its score > 0.1


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


@dataclass
class DetectionResult:
    """Scores of one model. Arrays are `[n_layers, n_heads]`; NaN means not scored.

    per_sample: `[n_kept, n_layers, n_heads]`, the kept samples' scores in run order.
    records: the per-sample records (all samples, kept or not) when loaded from a run folder.
    aggregates: (retrieval score, activation frequency, n_kept) of a result known only by its
    aggregates (the shipped reference maps); `per_sample` is then empty `[0, L, H]`.
    """

    name: str
    per_sample: np.ndarray
    records: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    aggregates: tuple[np.ndarray, np.ndarray, int] | None = None

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

    @property
    def has_per_sample(self) -> bool:
        """Whether per-sample scores exist (rank stability and bootstrap need them)."""
        return self.aggregates is None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.per_sample.shape[1:])  # type: ignore[return-value]

    @property
    def scores(self) -> np.ndarray:
        return self.aggregates[0] if self.aggregates else aggregate(self.per_sample)[0]

    @property
    def activation_frequency(self) -> np.ndarray:
        return self.aggregates[1] if self.aggregates else aggregate(self.per_sample)[1]

    @property
    def n_kept(self) -> int:
        return self.aggregates[2] if self.aggregates else int(self.per_sample.shape[0])

    def top(self, k: int = 20) -> list[HeadScore]:
        """The k heads with the highest retrieval score (NaN last; ties: lower layer, then lower head)."""
        s, f = self.scores, self.activation_frequency
        return [HeadScore(l, h, float(s[l, h]), float(f[l, h])) for l, h in top_heads(s, k)]

    def retrieval_heads(self, threshold: float = RETRIEVAL_THRESHOLD) -> list[tuple[int, int]]:
        return [(int(l), int(h)) for l, h in zip(*np.nonzero(np.nan_to_num(self.scores) > threshold))]

    def sparsity(self) -> dict[str, float]:
        return sparsity(self.scores)

    def summary(self, k: int = 20) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "n_samples": len(self.records) if self.records else self.n_kept,
            "n_kept": self.n_kept,
            "sparsity": self.sparsity(),
            "n_retrieval_heads": len(self.retrieval_heads()),
            "top": [h.to_dict() for h in self.top(k)],
            "scores": np.where(np.isnan(self.scores), None, self.scores).tolist(),
            "activation_frequency": np.where(
                np.isnan(self.activation_frequency), None, self.activation_frequency
            ).tolist(),
        }

    def save(self, folder: str | Path) -> None:
        """Write the authors' score file and a summary (atomically) into `folder`."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        write_scores(d / SCORES_FILE, self.per_sample)
        atomic_write_text(d / SUMMARY_FILE, json.dumps(self.summary(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> DetectionResult:
        """From a run folder (records + config), an authors'-format JSON file, or a shipped
        reference map (`ref:<name>`, see `retrieval_heads.reference`)."""
        if is_reference(path):
            path = reference_path(str(path))
        p = Path(path)
        if p.is_dir():
            records = read_records(p / RECORDS_FILE)
            cfg_path = p / CONFIG_FILE
            config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
            if records:
                return cls.from_records(config.get("model", p.name), records, config)
            if (p / SCORES_FILE).exists():
                return cls(config.get("model", p.name), read_scores(p / SCORES_FILE), [], config)
            raise DataError(f"{p}: no records or score file in this folder")
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
        cls, name: str, records: list[dict[str, Any]], config: dict[str, Any] | None = None
    ) -> DetectionResult:
        kept = [r for r in records if r.get("kept")]
        if records:
            shape = np.asarray(records[0]["copy_counts"]).shape
        else:
            shape = (0, 0)
        per = np.zeros((len(kept), *shape))
        for i, r in enumerate(kept):
            per[i] = np.asarray(r["copy_counts"], dtype=float) / float(r["needle_tokens"])
        return cls(name, per, list(records), dict(config or {}))
