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
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import ConfigError, DataError
from .models import current_umask
from .userfiles import MAX_SCORES, MAX_SUMMARY, read_text

_KEY = re.compile(r"^(\d+)-(\d+)$")
# Bounds checked before anything is allocated: the largest models have ~128 layers x 128 heads.
MAX_LAYERS = 4096
MAX_HEADS = 4096


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
            raise DataError(f"{source}: bad key {str(key)[:40]!r}; expected '<layer>-<head>'")
        # compare digit counts first: a 400-digit index never becomes an int
        l_txt, h_txt = m.group(1), m.group(2)
        if len(l_txt) > 6 or len(h_txt) > 6 or int(l_txt) >= MAX_LAYERS or int(h_txt) >= MAX_HEADS:
            raise DataError(
                f"{source}: head {str(key)[:40]!r} is out of range (at most {MAX_LAYERS} layers x {MAX_HEADS} heads)"
            )
        if not isinstance(val, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in val):
            raise DataError(f"{source}: value of {key!r} is not a list of numbers")
        try:
            floats = [float(v) for v in val]
        except OverflowError:  # an integer too large for a float
            raise DataError(f"{source}: value of {key!r} holds a number out of range") from None
        if any(not math.isfinite(v) or v < 0 for v in floats):
            raise DataError(f"{source}: value of {key!r} holds a negative or non-finite score")
        cells[(int(l_txt), int(h_txt))] = floats
    n_layers = max(l for l, _ in cells) + 1
    n_heads = max(h for _, h in cells) + 1
    if len(cells) != n_layers * n_heads:
        # the first missing head only: listing them all would allocate n_layers x n_heads names
        first = next(f"{l}-{h}" for l in range(n_layers) for h in range(n_heads) if (l, h) not in cells)
        n_missing = n_layers * n_heads - len(cells)
        raise DataError(f"{source}: {n_missing} head(s) missing, e.g. {first} (file truncated?)")
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


def read_json(path: str | Path, limit: int = MAX_SCORES) -> Any:
    """A JSON file's content (a regular file of at most `limit` bytes); unreadable or invalid
    files are one clear DataError."""
    p = Path(path)
    text = read_text(p, limit)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}; truncated?)") from None
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, nesting too deep
        raise DataError(f"{p}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
    return obj


def read_json_or_none(path: str | Path) -> Any:
    """`read_json`, or None when the file is missing or not valid JSON (deciding whose file it is)."""
    try:
        return read_json(path, MAX_SUMMARY)
    except DataError:
        return None


def scores_to_obj(per_sample: np.ndarray) -> dict[str, list[float]]:
    _n, n_layers, n_heads = per_sample.shape
    return {f"{l}-{h}": [float(x) for x in per_sample[:, l, h]] for l in range(n_layers) for h in range(n_heads)}


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write a file via a temp file in the same folder and rename, so readers never see half a
    file; `write` fills the open binary file. The file gets the user's umask (0644 by default),
    as `open()` would give, not mkstemp's 0600."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a folder; give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{p}: cannot create a file under {p.parent} (a part of the path is a file)") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:  # name the target, not the temp file
        raise type(e)(e.errno, e.strerror, str(p)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) atomically; see `atomic_write`."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_scores(path: str | Path, per_sample: np.ndarray) -> None:
    atomic_write_text(path, json.dumps(scores_to_obj(per_sample)))
