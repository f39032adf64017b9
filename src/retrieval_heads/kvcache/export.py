"""KV-head lists for other tools: the authors' score-file format, DuoAttention-style 0/1 tables and
DuoAttention attention patterns (the folder layout DuoAttention's `load_attn_pattern` and kvpress's
`DuoAttentionPress` read: `config.json` with `sink_size`/`recent_size` and `full_attention_heads.tsv`,
one row per layer, one tab-separated value in [0, 1] per KV head, higher = keep the whole cache)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..heads import rank_heads
from ..scorefile import atomic_write_text

PATTERN_TSV = "full_attention_heads.tsv"  # the file names DuoAttention and kvpress look for
PATTERN_CONFIG = "config.json"


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


def pattern_values(kv_scores: np.ndarray) -> np.ndarray:
    """`[n_layers, n_kv_heads]` values in [0, 1] in the order of `kv_scores` (NaN last): the best KV
    head 1, the worst 0, evenly spaced. Ranks, not raw scores: both readers only sort the values
    (kvpress keeps the top share, DuoAttention cuts at a sparsity quantile), and distinct values keep
    our tie-break instead of theirs (DuoAttention adds noise to ties, kvpress sorts ties by index)."""
    s = np.asarray(kv_scores, dtype=float)
    order = rank_heads(s)
    out = np.zeros(s.shape)
    n = len(order)
    for pos, (layer, head) in enumerate(order):
        out[layer, head] = 1.0 if n == 1 else (n - 1 - pos) / (n - 1)
    return out


def export_duo_pattern(
    folder: str | Path, kv_scores: np.ndarray, *, sink: int, recent: int, about: dict[str, Any] | None = None
) -> Path:
    """Write a DuoAttention attention pattern into `folder` (`pattern_values` of the KV-head scores,
    `config.json` with the streaming heads' sink and recent sizes plus `about`, our provenance)."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    values = pattern_values(kv_scores)
    atomic_write_text(d / PATTERN_TSV, "\n".join("\t".join(f"{x:.6f}" for x in row) for row in values) + "\n")
    config = {"sink_size": int(sink), "recent_size": int(recent), **(about or {})}
    atomic_write_text(d / PATTERN_CONFIG, json.dumps(config, indent=1))
    return d


def read_duo_pattern(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A DuoAttention pattern as (values `[n_layers, n_kv_heads]` clipped to [0, 1], its config or {}).
    `path`: the pattern folder or its `full_attention_heads.tsv`."""
    p = Path(path)
    tsv = p / PATTERN_TSV if p.is_dir() else p
    if not tsv.is_file():
        raise DataError(f"{tsv}: file not found (a DuoAttention pattern holds {PATTERN_TSV})")
    rows = [line.split() for line in tsv.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        values = np.array([[float(x) for x in r] for r in rows])
    except ValueError:
        raise DataError(f"{tsv}: expected rows of numbers separated by tabs") from None
    if values.ndim != 2 or values.size == 0:
        raise DataError(f"{tsv}: rows have different lengths or the file is empty")
    cfg_path = tsv.parent / PATTERN_CONFIG
    config: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{cfg_path}: not valid JSON ({e.msg})") from None
        if not isinstance(config, dict):
            raise DataError(f"{cfg_path}: expected a JSON object")
    return np.clip(values, 0.0, 1.0), config
