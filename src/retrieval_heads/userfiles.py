"""The one reader of user files: regular files only, bounded in size, every problem one DataError line.

A path that is (or links to) a named pipe, a device such as /dev/zero, a socket or a folder is refused
before a byte is read (a pipe would hang the command, /dev/zero would fill memory), and a file larger
than the limit of its kind is refused from its size, before anything is read or parsed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import DataError

MB = 1 << 20
# Limits by file kind: far above any real file of that kind, far below what would exhaust memory.
MAX_CONFIG = 16 * MB  # a run's config.json, a DuoAttention pattern's config, a docs-tables source
MAX_SUMMARY = 256 * MB  # summaries and snapshots, other score maps
MAX_SCORES = 1024 * MB  # an authors'-format score file (128 layers x 128 heads x thousands of samples)
MAX_RECORDS = 4096 * MB  # a run's records.jsonl
MAX_TEXT = 256 * MB  # haystacks, attribution contexts, questions, needles, task data, pattern tables
MAX_DATA = 2048 * MB  # downloaded task data (JSON, JSONL.gz, Arrow)


def _size(n: int) -> str:
    return f"{n / MB:.1f} MB" if n >= MB else f"{n} bytes"


def check_regular(path: str | Path) -> os.stat_result:
    """The stat of `path` (links followed) if it is a regular file, else one DataError line."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{p} is a folder; give a file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{p}: not a regular file (a pipe, device or socket); give a file")
    return st


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file `path`, refused with one DataError line when it is anything
    else or larger than `limit` bytes (checked from its size first, then while reading, since a
    file can grow)."""
    p = Path(path)
    st = check_regular(p)
    if st.st_size > limit:
        raise DataError(f"{p}: {_size(st.st_size)} is over the {_size(limit)} limit for this kind of file")
    try:
        # O_NONBLOCK: if the path was swapped for a pipe after the check, opening it does not hang
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise DataError(f"{p}: not a regular file (a pipe, device or socket); give a file")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise DataError(f"{p}: over the {_size(limit)} limit for this kind of file")
    return data


def read_text(path: str | Path, limit: int, *, errors: str = "strict") -> str:
    """`read_bytes` decoded as UTF-8; bad UTF-8 is one DataError line naming the line."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
