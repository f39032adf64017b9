"""KV-head lists for other tools: the authors' score-file format and DuoAttention-style 0/1 tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..scorefile import atomic_write_text


def export_authors_json(path: str | Path, kv_scores: np.ndarray) -> None:
    """The authors' score-file format `{"<layer>-<kv head>": [score]}` over KV heads (NaN -> 0)."""
    s = np.nan_to_num(np.asarray(kv_scores, dtype=float), nan=0.0)
    obj = {f"{l}-{k}": [float(s[l, k])] for l in range(s.shape[0]) for k in range(s.shape[1])}
    atomic_write_text(path, json.dumps(obj))


def export_duo_tsv(path: str | Path, whole: np.ndarray) -> None:
    """DuoAttention-style full-attention-head pattern: one line per layer, one tab-separated
    0/1 per KV head (1 = keep the whole cache)."""
    rows = ["\t".join(str(int(x)) for x in row) for row in np.asarray(whole, dtype=bool)]
    atomic_write_text(path, "\n".join(rows) + "\n")


def read_duo_tsv(path: str | Path) -> np.ndarray:
    """Read a DuoAttention-style pattern back as bool `[n_layers, n_kv_heads]` (values >= 0.5 are 1)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows = [line.split() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        arr = np.array([[float(x) for x in r] for r in rows])
    except ValueError:
        raise DataError(f"{p}: expected rows of numbers separated by tabs") from None
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{p}: rows have different lengths or the file is empty")
    return arr >= 0.5
