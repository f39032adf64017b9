"""The authors' head-score file: `{"<layer>-<head>": [score per kept sample, ...]}`, 0-based.

This is the interop format (nightdessert/Retrieval_Head, FYYFU/HeadKV). A head's retrieval score
is the mean of its list. Files are validated on read; any problem is one DataError line naming
the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

_KEY = re.compile(r"^(\d+)-(\d+)$")


def parse_scores(obj: Any, source: str = "<scores>") -> np.ndarray:
    """Per-sample scores `[n_samples, n_layers, n_heads]` from the authors' JSON object.

    Heads with fewer entries than the longest list (never seen in real files) are refused.
    """
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{source}: expected a non-empty JSON object mapping 'layer-head' to a list of scores")
    cells: dict[tuple[int, int], list[float]] = {}
    for key, val in obj.items():
        m = _KEY.match(str(key))
        if not m:
            raise DataError(f"{source}: bad key {key!r}; expected '<layer>-<head>'")
        if not isinstance(val, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in val):
            raise DataError(f"{source}: value of {key!r} is not a list of numbers")
        if any(not math.isfinite(v) or v < 0 for v in val):
            raise DataError(f"{source}: value of {key!r} holds a negative or non-finite score")
        cells[(int(m.group(1)), int(m.group(2)))] = [float(v) for v in val]
    n_layers = max(l for l, _ in cells) + 1
    n_heads = max(h for _, h in cells) + 1
    if len(cells) != n_layers * n_heads:
        missing = [f"{l}-{h}" for l in range(n_layers) for h in range(n_heads) if (l, h) not in cells]
        raise DataError(f"{source}: {len(missing)} head(s) missing, e.g. {missing[0]} (file truncated?)")
    lengths = {len(v) for v in cells.values()}
    if len(lengths) != 1:
        raise DataError(f"{source}: heads have different numbers of samples ({sorted(lengths)[:4]})")
    n = lengths.pop()
    out = np.zeros((n, n_layers, n_heads))
    for (l, h), v in cells.items():
        out[:, l, h] = v
    return out


def read_scores(path: str | Path) -> np.ndarray:
    """Read and validate an authors'-format file; returns `[n_samples, n_layers, n_heads]`."""
    return parse_scores(read_json(path), str(path))


def read_json(path: str | Path) -> Any:
    """A JSON file's content; unreadable or invalid files are one clear DataError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read ({e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}; truncated?)") from None
    return obj


def scores_to_obj(per_sample: np.ndarray) -> dict[str, list[float]]:
    n, n_layers, n_heads = per_sample.shape
    return {f"{l}-{h}": [float(x) for x in per_sample[:, l, h]] for l in range(n_layers) for h in range(n_heads)}


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_scores(path: str | Path, per_sample: np.ndarray) -> None:
    atomic_write_text(path, json.dumps(scores_to_obj(per_sample)))
