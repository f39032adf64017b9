"""Run folders: the saved config, per-sample JSONL records appended and flushed one by one, resume.

A run folder holds `config.json` (the full config), `records.jsonl` (one line per finished sample)
and the final files written atomically. Rerunning into the same folder with the same config skips
finished samples; a different config is refused unless `overwrite=True`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from .errors import DataError, RunConflictError
from .scorefile import atomic_write_text, read_json
from .userfiles import MAX_CONFIG, MAX_RECORDS, read_bytes

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# The files of every run folder (detection and experiments alike).
CONFIG_FILE = "config.json"
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
SCORES_FILE = "retrieval_scores.json"  # authors' format (detection)
LOCK_FILE = ".lock"  # the writer lock (RunLock)
FIGURE_STEMS = ("kv_eval", "mask_eval", "task_eval", "finetune_eval")  # the figure a command draws into its run folder
# Everything a run writes into its folder: `--overwrite` removes these and nothing else.
RUN_FILES = frozenset(
    {CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, TABLE_FILE, SCORES_FILE, LOCK_FILE}
    | {f"{stem}.{ext}" for stem in FIGURE_STEMS for ext in ("png", "svg")}
)
SHARD_DIR = re.compile(r"rank-\d+")  # the shard folders of a distributed run
SCORE_MAPS_DIR = "scores"  # detection's other score maps, one authors'-format JSON each (results.SCORES_DIR)
RUN_CONFIG_KEYS = ("version", "model")  # every run's config has these

# Config keys that do not change results (how the run is executed, not what it computes).
# `created` and `machine` say when and where a run ran (`run_stamp`); a resumed run keeps its first `created`.
NON_SEMANTIC_KEYS = frozenset({"show_progress", "device", "batch_size", "out", "overwrite", "created", "machine"})


def run_stamp(device: Any, dtype: str | None = None) -> dict[str, Any]:
    """`created` (UTC, ISO 8601) and `machine` (platform, CPU count, the model's resolved device
    and dtype, torch version; the GPU's name on CUDA) of a run's config. Non-semantic: a key added
    here never makes an older run's config count as different."""
    import torch

    machine: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        **({"dtype": dtype} if dtype else {}),
        "torch": torch.__version__,
    }
    if str(device).startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine}


def strict_json(obj: Any) -> Any:
    """NaN and infinities -> None, tuples -> lists: what strict JSON readers accept. The one JSON
    sanitiser of the package (summaries, score maps, attribution files)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def read_numbered_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) of a JSONL file. Every record is an object with a unique
    string "id". A torn last line (the run was killed mid-write) is ignored; anything malformed
    elsewhere is a DataError naming `file:line`."""
    p = Path(path)
    if not p.exists():
        return []
    data = read_bytes(p, MAX_RECORDS)
    lines = data.split(b"\n")
    out: list[tuple[int, dict[str, Any]]] = []
    first_line: dict[str, int] = {}
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, a 4300-digit integer, deep nesting
            if i == len(lines):  # no trailing newline: the write was interrupted
                logger.warning("%s: ignoring a torn last line", p)
                continue
            raise DataError(f"{p}:{i}: malformed record line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{i}: a record must be a JSON object")
        rid = rec.get("id")
        if not isinstance(rid, str):
            raise DataError(f'{p}:{i}: a record needs a string "id"')
        if rid in first_line:
            raise DataError(f"{p}:{i}: duplicate record id {rid[:80]!r} (first at line {first_line[rid]})")
        first_line[rid] = i
        out.append((i, rec))
    return out


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, validated as in `read_numbered_records`."""
    return [rec for _, rec in read_numbered_records(path)]


def read_config(path: str | Path) -> dict[str, Any]:
    """A run's `config.json` (a file or its folder): a JSON object whose `model` (when present) is
    text, else one DataError line."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    obj = read_json(p, MAX_CONFIG)
    if not isinstance(obj, dict):
        raise DataError(f"{p}: a run config must be a JSON object, not {type(obj).__name__}")
    if "model" in obj and not (isinstance(obj["model"], str) and obj["model"].strip()):
        raise DataError(f"{p}: the run config's model must be a model name, not {json.dumps(obj['model'])[:40]}")
    return obj


def is_run_config(obj: Any) -> bool:
    """Whether a parsed config.json is one of ours (every run writes these keys)."""
    return isinstance(obj, dict) and all(k in obj for k in RUN_CONFIG_KEYS)


def semantic(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}
    if isinstance(out.get("task"), str) and "kind" not in out:  # the kind, saved under "task" by older runs
        out["kind"] = out.pop("task")
    return out


def _is_run_file(name: str) -> bool:
    # a final file, or the temp file of an atomic write interrupted before its rename
    return name in RUN_FILES or any(name.startswith(f".{f}.") for f in RUN_FILES)


def run_files(folder: Path, *, score_maps: bool = False) -> tuple[list[Path], list[Path]]:
    """(what a run writes, anything else) in `folder`; shard folders (`rank-<r>/`) and the
    score-map folder are looked into, their contents listed before them."""
    ours: list[Path] = []
    other: list[Path] = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.is_symlink():
            if not score_maps and (SHARD_DIR.fullmatch(child.name) or child.name == SCORE_MAPS_DIR):
                sub_ours, sub_other = run_files(child, score_maps=child.name == SCORE_MAPS_DIR)
                ours += [*sub_ours, child]
                other += sub_other
            else:
                other.append(child)
        elif score_maps and (child.name.endswith(".json") or child.name.endswith(".tmp")):
            ours.append(child)
        elif not score_maps and _is_run_file(child.name):
            ours.append(child)
        else:
            other.append(child)
    return ours, other


class RunLock:
    """The one-writer lock of a run folder: `.lock` inside it, locked exclusively (flock) and
    holding the holder's pid. A second process is refused at once with one line; within one
    process the lock is re-entrant. Closing the file (also by the process dying) releases it."""

    _held: ClassVar[dict[str, list[Any]]] = {}  # lock file -> [open handle, count]

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.file = self.folder / LOCK_FILE
        self._key = os.path.realpath(self.file)
        self.acquired = False

    def acquire(self) -> RunLock:
        if self.acquired:
            return self
        held = RunLock._held.get(self._key)
        if held is not None:
            held[1] += 1
        else:
            RunLock._held[self._key] = [self._lock(), 1]
        self.acquired = True
        return self

    def _lock(self) -> Any:
        if fcntl is None:  # not POSIX: filelock, without the holder's pid
            import filelock

            lock = filelock.FileLock(str(self.file), timeout=0)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise self._busy("unknown") from None
            return lock
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise self._busy(pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _busy(self, pid: str) -> RunConflictError:
        return RunConflictError(
            f"{self.folder} is in use by another run (pid {pid}); wait for it to finish or use another --out"
        )

    def release(self) -> None:
        if not self.acquired:
            return
        self.acquired = False
        held = RunLock._held[self._key]
        held[1] -= 1
        if held[1] == 0:
            del RunLock._held[self._key]
            if isinstance(held[0], int):
                os.close(held[0])
            else:
                held[0].release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class RunFolder:
    """One run's folder. `open()` takes the folder's writer lock, checks the config and returns
    the finished records; `close()` releases the lock.

    `overwrite=True` replaces a run of another config, removing only the files a run writes; a
    folder holding anything else is refused, never deleted.
    """

    def __init__(self, path: str | Path, config: dict[str, Any], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.config = config
        self.overwrite = overwrite
        self.lock = RunLock(self.path)

    @property
    def records_path(self) -> Path:
        return self.path / RECORDS_FILE

    def open(self) -> list[dict[str, Any]]:
        """Lock and prepare the folder; return the records already finished (resume)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunConflictError(f"output path {self.path} exists and is not a folder")
        self._check(clear=False)  # refuse a foreign folder before creating anything in it
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            self._check(clear=True)  # again, now that no other writer can change the folder
            atomic_write_text(self.path / CONFIG_FILE, json.dumps(self.config, indent=1, sort_keys=True))
            records = read_records(self.records_path)
            self._repair_tail()
        except BaseException:
            self.close()
            raise
        return records

    def close(self) -> None:
        """Release the writer lock (idempotent)."""
        self.lock.release()

    def _check(self, *, clear: bool) -> None:
        if not self.path.is_dir():
            return
        cfg_path = self.path / CONFIG_FILE
        ours, other = run_files(self.path)
        if cfg_path.exists():
            try:
                old = read_config(cfg_path)
            except DataError:
                old = {}
            if not is_run_config(old):
                raise RunConflictError(
                    f"{cfg_path} is not the config of a retrieval-heads run (unreadable or another tool's); "
                    f"{self.path} is left as it is: use another --out"
                )
            if semantic(old) == semantic(self.config):
                if "created" in old and "created" in self.config:
                    self.config["created"] = old["created"]  # resume: the run was created then
                return  # resume
            if not self.overwrite:
                keys = set(semantic(old)) | set(semantic(self.config))
                diff = sorted(k for k in keys if old.get(k) != self.config.get(k))
                raise RunConflictError(
                    f"{self.path} holds a run with a different config (differs in: {', '.join(diff)}); "
                    "use --overwrite or another --out"
                )
        elif other or any(p.is_dir() or p.name in RUN_FILES - {LOCK_FILE} for p in ours):
            if other or not self.overwrite:
                raise RunConflictError(
                    f"{self.path} is not empty and holds no run config; use another --out"
                    + ("" if other else " or --overwrite")
                )
        else:
            return  # empty, or only a lock file and temp files of ours
        if other:
            raise RunConflictError(
                f"{self.path} holds files that no run writes (e.g. {other[0].name}); "
                "--overwrite replaces only a run folder: move them or use another --out"
            )
        if clear:
            self._clear(ours)

    def _clear(self, ours: list[Path]) -> None:
        # Only the files a run writes; shard folders only while no shard writer holds them.
        shard_locks = [RunLock(p).acquire() for p in ours if p.is_dir() and SHARD_DIR.fullmatch(p.name)]
        try:
            for p in ours:
                if p.is_dir():
                    (p / LOCK_FILE).unlink(missing_ok=True)
                    p.rmdir()
                elif p != self.lock.file:
                    p.unlink(missing_ok=True)
        finally:
            for lock in shard_locks:
                lock.release()

    def _repair_tail(self) -> None:
        # A last line without its newline: keep it when it is a complete record (add the
        # newline), drop it when it is torn, so the next append starts on a fresh line.
        p = self.records_path
        if not p.exists():
            return
        data = read_bytes(p, MAX_RECORDS)
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                json.loads(data[cut:].decode("utf-8"))
                complete = True
            except (ValueError, RecursionError):
                complete = False
            with p.open("r+b") as f:
                if complete:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())

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


def config_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as saved in `config.json`: `dataclasses.asdict` (nested dataclasses such
    as needles become dicts), every tuple a list."""
    from dataclasses import asdict

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v

    return plain(asdict(config))  # type: ignore[no-any-return]
