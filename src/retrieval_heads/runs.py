"""Run folders: the saved config, per-sample JSONL records appended and flushed one by one, resume.

A run folder holds `config.json` (the full config), `records.jsonl` (one line per finished sample)
and the final files written atomically. Rerunning into the same folder with the same config skips
finished samples; a different config is refused unless `overwrite=True`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import DataError, RunConflictError
from .scorefile import atomic_write_text

logger = logging.getLogger(__name__)

# The files of every run folder (detection and experiments alike).
CONFIG_FILE = "config.json"
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"

# Config keys that do not change results (how the run is executed, not what it computes).
NON_SEMANTIC_KEYS = frozenset({"show_progress", "device", "batch_size", "out", "overwrite"})


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file. A torn last line (the run was killed mid-write) is ignored;
    a malformed line elsewhere is an error."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_text(encoding="utf-8").split("\n")
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no trailing newline: the write was interrupted
                logger.warning("%s: ignoring a torn last line", p)
                continue
            raise DataError(f"{p}:{i + 1}: malformed record line") from None
    return out


def semantic(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}


class RunFolder:
    """One run's folder. `open()` checks the config and returns the finished sample ids."""

    def __init__(self, path: str | Path, config: dict[str, Any], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.config = config
        self.overwrite = overwrite

    @property
    def records_path(self) -> Path:
        return self.path / RECORDS_FILE

    def open(self) -> list[dict[str, Any]]:
        """Prepare the folder; return the records already finished (resume)."""
        cfg_path = self.path / CONFIG_FILE
        if self.path.exists() and not self.path.is_dir():
            raise RunConflictError(f"output path {self.path} exists and is not a folder")
        if cfg_path.exists():
            try:
                old = json.loads(cfg_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                old = None
            if old is None or semantic(old) != semantic(self.config):
                if not self.overwrite:
                    diff = sorted(
                        k
                        for k in set(semantic(old or {})) | set(semantic(self.config))
                        if (old or {}).get(k) != self.config.get(k)
                    )
                    raise RunConflictError(
                        f"{self.path} holds a run with a different config (differs in: {', '.join(diff) or 'unreadable config'}); "
                        "use --overwrite or another --out"
                    )
                shutil.rmtree(self.path)
        elif self.path.exists() and any(self.path.iterdir()) and not self.overwrite:
            raise RunConflictError(
                f"{self.path} is not empty and holds no run config; use --overwrite or another --out"
            )
        elif self.path.exists() and self.overwrite:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_path, json.dumps(self.config, indent=1, sort_keys=True))
        records = read_records(self.records_path)
        self._repair_tail()
        return records

    def _repair_tail(self) -> None:
        # Drop a torn last line so the next append starts on a fresh line.
        p = self.records_path
        if not p.exists():
            return
        data = p.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with p.open("r+b") as f:
                f.truncate(cut)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk before the next sample starts."""
        line = json.dumps(record, sort_keys=True) + "\n"
        with self.records_path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def append_many(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.append(r)
