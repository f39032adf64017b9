"""Reference score maps shipped with the package: the authors' seven models and HeadKV's files,
as compact derived data (per head: retrieval score, activation frequency; kept-sample count).

    DetectionResult.load("ref:Mistral-7B-v0.2-hf")   # aggregates only, no per-sample scores
    reference_names()                                # the maps shipped

Provenance (repository, path, commit, SHA-256 of the raw file) is inside each map;
`scripts/derive_reference.py` rebuilds the maps from the raw published files. Commands accept a
shipped map as `ref:<name>` wherever they accept a score file; raw files work as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .scorefile import MAX_HEADS, MAX_LAYERS  # the bounds every score reader uses

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
PREFIX = "ref:"
FORMAT = "retrieval-heads reference map v1"
AUTHORS_SEVEN = (
    "llama-2-7b-80k",
    "llama-2-13b-64k",
    "Mistral-7B-v0.2-hf",
    "Mixtral-8x7B-v0.1",
    "Yi-6B-200K",
    "Qwen1.5-14B",
    "Qwen1.5-14B-Chat",
)
HEADKV = ("Mistral-7B-Instruct-v0.2", "Meta-Llama-3-8B-Instruct")


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


def is_reference_map(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def parse_reference_map(obj: dict[str, Any], source: str) -> tuple[np.ndarray, np.ndarray, int, dict[str, Any]]:
    """(retrieval score, activation frequency, n_kept, provenance) of a map, validated."""
    try:
        n_layers, n_heads, n_kept = int(obj["n_layers"]), int(obj["n_heads"]), int(obj["n_kept"])
        if not (0 < n_layers <= MAX_LAYERS and 0 < n_heads <= MAX_HEADS and n_kept >= 0):
            raise ValueError("shape or count out of range")
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
    provenance = {k: obj.get(k) for k in ("name", "source", "repository", "path", "commit", "raw_sha256", "score")}
    return scores, freq, n_kept, provenance
