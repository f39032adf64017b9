"""Reference score maps shipped with the package: the authors' seven models, HeadKV's files and
our own default detection runs, as compact derived data (per head: retrieval score, activation
frequency; kept-sample count) with the model's shape (layers, query heads, KV heads).

    DetectionResult.load("ref:Mistral-7B-v0.2-hf")   # aggregates only, no per-sample scores
    reference_names()                                # the maps shipped
    reference_info("Mistral-7B-v0.2-hf")             # its shape and provenance (`retrieval-heads refs`)

Provenance (repository, path, commit, SHA-256 of the raw file; where the KV-head count comes from)
is inside each map; `scripts/derive_reference.py` and `scripts/derive_default_maps.py` rebuild the
maps. Commands accept a shipped map as `ref:<name>` wherever they accept a score file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .scorefile import MAX_HEADS, MAX_LAYERS, read_json  # the bounds every score reader uses

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
PREFIX = "ref:"
FORMAT = "retrieval-heads reference map v1"
PROVENANCE = ("name", "source", "repository", "path", "commit", "raw_sha256", "score", "shape_source")


@dataclass(frozen=True)
class ReferenceInfo:
    """What `retrieval-heads refs` lists of a shipped map: its model's shape and where it comes from."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int | None  # None: unknown (KV-cache exports refuse such a map)
    n_kept: int
    score: str  # copy_paste (the paper's retrieval score) or retrieval_reasoning (HeadKV)
    source: str  # authors, HeadKV, or our own detection run
    origin: str  # repository/path@commit, or the run snapshot
    shape_source: str | None


def reference_names() -> list[str]:
    """Names of the shipped reference maps."""
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.json"))


def is_reference(spec: str | Path) -> bool:
    return str(spec).startswith(PREFIX)


def reference_path(spec: str) -> Path:
    """The file of a shipped map, from `ref:<name>` or `<name>`."""
    name = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    path = REFERENCE_DIR / f"{name}.json"
    if "/" in name or not path.is_file():
        raise DataError(f"no reference map {name!r}; shipped: {', '.join(reference_names())}")
    return path


def reference_info(spec: str) -> ReferenceInfo:
    """Shape and provenance of a shipped map (`ref:<name>` or `<name>`), validated like a load."""
    path = reference_path(spec)
    scores, _, n_kept, prov = parse_reference_map(read_json(path), str(path))
    repo, where, commit = prov.get("repository"), prov.get("path") or path.name, prov.get("commit")
    origin = f"{repo}/{where}" if repo else str(where)
    return ReferenceInfo(
        name=str(prov.get("name") or path.stem),
        n_layers=scores.shape[0],
        n_heads=scores.shape[1],
        n_kv_heads=prov["n_kv_heads"],
        n_kept=n_kept,
        score=str(prov.get("score") or "copy_paste"),
        source=str(prov.get("source") or "?"),
        origin=f"{origin}@{str(commit)[:12]}" if commit else origin,
        shape_source=prov.get("shape_source"),
    )


def is_reference_map(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def parse_reference_map(obj: dict[str, Any], source: str) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """(retrieval score, activation frequency, n_kept, provenance) of a map, validated. The
    provenance holds the model's shape too: n_layers, n_heads, n_kv_heads (None when the map does
    not say)."""
    try:
        n_layers, n_heads, n_kept = int(obj["n_layers"]), int(obj["n_heads"]), int(obj["n_kept"])
        if not (0 < n_layers <= MAX_LAYERS and 0 < n_heads <= MAX_HEADS and n_kept >= 0):
            raise ValueError("shape or count out of range")
        n_kv = None if obj.get("n_kv_heads") is None else int(obj["n_kv_heads"])
        if n_kv is not None and not (0 < n_kv <= n_heads and n_heads % n_kv == 0):
            raise ValueError(f"{n_heads} query heads cannot be grouped into {n_kv} KV heads")
        scores = np.asarray(obj["retrieval_score"], dtype=float)
        freq = np.asarray(obj["activation_frequency"], dtype=float)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{source}: malformed reference map ({e})") from None
    if scores.shape != (n_layers, n_heads) or freq.shape != scores.shape:
        raise DataError(f"{source}: maps do not have the shape {n_layers}x{n_heads}")
    if (
        not (np.isfinite(scores).all() and np.isfinite(freq).all())
        or (scores < 0).any()
        or ((freq < 0) | (freq > 1)).any()
    ):
        raise DataError(f"{source}: scores must be finite and >= 0, frequencies within [0, 1]")
    provenance = {k: obj.get(k) for k in PROVENANCE}
    provenance.update(n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv)
    return scores, freq, n_kept, provenance
