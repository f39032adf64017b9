"""DetectionResult: per-head retrieval scores and activation frequency, loadable from a run folder
or from any authors'-format score file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .scorefile import atomic_write_text, read_scores, write_scores
from .scoring import aggregate

SCORES_FILE = "retrieval_scores.json"  # authors' format
RECORDS_FILE = "records.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"

RETRIEVAL_THRESHOLD = 0.1  # paper: a head is a retrieval head when its score > 0.1


@dataclass(frozen=True)
class HeadScore:
    layer: int
    head: int
    score: float
    activation_frequency: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "score": self.score,
                "activation_frequency": self.activation_frequency}


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
    """

    name: str
    per_sample: np.ndarray
    records: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.per_sample.shape[1:])  # type: ignore[return-value]

    @property
    def scores(self) -> np.ndarray:
        return aggregate(self.per_sample)[0]

    @property
    def activation_frequency(self) -> np.ndarray:
        return aggregate(self.per_sample)[1]

    @property
    def n_kept(self) -> int:
        return int(self.per_sample.shape[0])

    def top(self, k: int = 20) -> list[HeadScore]:
        """The k heads with the highest retrieval score (ties: lower layer, then lower head)."""
        s, f = self.scores, self.activation_frequency
        flat = np.nan_to_num(s, nan=-np.inf).ravel()
        order = np.lexsort((np.arange(flat.size), -flat))[:k]
        n_heads = s.shape[1]
        return [HeadScore(int(i // n_heads), int(i % n_heads), float(s.flat[i]), float(f.flat[i])) for i in order]

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
    def load(cls, path: str | Path) -> "DetectionResult":
        """From a run folder (records + config) or an authors'-format JSON file."""
        p = Path(path)
        if p.is_dir():
            from .runs import read_records  # local import: runs imports this module

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
        return cls(p.stem, read_scores(p))

    @classmethod
    def from_records(cls, name: str, records: list[dict[str, Any]], config: dict[str, Any] | None = None) -> "DetectionResult":
        kept = [r for r in records if r.get("kept")]
        if records:
            shape = np.asarray(records[0]["copy_counts"]).shape
        else:
            shape = (0, 0)
        per = np.zeros((len(kept), *shape))
        for i, r in enumerate(kept):
            per[i] = np.asarray(r["copy_counts"], dtype=float) / float(r["needle_tokens"])
        return cls(name, per, list(records), dict(config or {}))
