"""Run folders as the generated tables of README.md and docs/*.md read them (see
`retrieval_heads.docs_tables`): a folder's config and summary (never its records), a detection run or
a shipped map as a DetectionResult, the provenance line under a table, and the number formats the
tables share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .heads import top_heads
from .reference import is_reference
from .results import DetectionResult
from .runs import CONFIG_FILE, SUMMARY_FILE, is_run_config, read_config
from .scorefile import read_json
from .userfiles import MAX_SUMMARY

COMMAND = "retrieval-heads docs-tables"


# ---------------------------------------------------------------- sources
@dataclass(frozen=True)
class SavedRun:
    """A run folder as the tables see it: its config, its summary, the folder."""

    source: str
    folder: Path
    config: dict[str, Any]
    summary: dict[str, Any]


def read_run(source: str, root: Path, where: str, *, summary: bool = True) -> SavedRun:
    folder = root / source
    if not folder.is_dir():
        raise DataError(f"{where}: source {source!r} is not a run folder (looked in {folder})")
    try:
        config = read_config(folder / CONFIG_FILE)
        obj = read_json(folder / SUMMARY_FILE, MAX_SUMMARY) if summary else {}
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if not is_run_config(config):
        raise DataError(f"{where}: {folder / CONFIG_FILE} is not the config of a retrieval-heads run")
    if not isinstance(obj, dict):
        raise DataError(f"{where}: {folder / SUMMARY_FILE} must be a JSON object")
    return SavedRun(source, folder, config, obj)


EXPERIMENT_KINDS = ("mask-eval", "kv-eval", "task-eval", "grounding-eval", "passage-rank", "finetune-eval")


def experiment_kind(config: dict[str, Any]) -> str | None:
    """The experiment kind of a run's config (one of EXPERIMENT_KINDS), None for detection."""
    for key in ("kind", "task"):  # the kind is saved under "kind"; older mask-eval/kv-eval runs used "task"
        if config.get(key) in EXPERIMENT_KINDS:
            return str(config[key])
    return None


def detection_run(source: str, root: Path, where: str) -> tuple[SavedRun, DetectionResult]:
    """A detection run folder (only its config and summary) as a DetectionResult of aggregates."""
    run = read_run(source, root, where)
    other = experiment_kind(run.config)
    if other:
        raise DataError(f"{where}: {source} is a {other} run, not a detection run")
    try:
        result = DetectionResult.from_summary(run.summary, run.config, str(run.folder / SUMMARY_FILE))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    return run, result


def detection_result(source: str, root: Path, where: str) -> tuple[SavedRun | None, DetectionResult]:
    """A detection run folder, or a shipped map (`ref:<name>`; no run, aggregates only)."""
    if not is_reference(source):
        return detection_run(source, root, where)
    try:
        return None, DetectionResult.load(source)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


@dataclass(frozen=True)
class TaskSummary:
    """What the tables read of a task-eval run's summary: its first metric, the no-mask, top-K and
    random-K (seed mean; None without random draws) rows, K and the number of random seeds."""

    task: str
    style: str
    metric: str
    k: int
    seeds: int
    base: dict[str, Any]
    top: dict[str, Any]
    random: dict[str, Any] | None


def task_summary(run: SavedRun, where: str) -> TaskSummary:
    if experiment_kind(run.config) != "task-eval":
        raise DataError(f"{where}: {run.source} is not a task-eval run")
    s = run.summary
    try:
        rows = {r["kind"]: r for r in s["rows"]}
        return TaskSummary(
            task=str(s["task"]),
            style=str(s["style"]),
            metric=str(s["metrics"][0]),
            k=max(int(c["k"]) for c in run.config["conditions"]),
            seeds=sum(1 for r in s["rows"] if r["kind"] == "random-seed"),
            base=rows["base"],
            top=rows["top"],
            random=rows.get("random"),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"{where}: {run.folder / SUMMARY_FILE} is not a task-eval summary ({e})") from None


# ---------------------------------------------------------------- provenance line
def when(config: dict[str, Any]) -> str:
    created = config.get("created")
    if not created:
        return "date not recorded"
    try:
        t = datetime.fromisoformat(str(created)).astimezone(timezone.utc)
    except ValueError:
        return f"run on {created}"
    return f"run on {t:%Y-%m-%d %H:%M} UTC"


def where_ran(config: dict[str, Any]) -> str:
    m = config.get("machine")
    if not m:
        return "machine not recorded"
    if not isinstance(m, dict):
        return str(m)
    device = f"{m.get('device', '?')}" + (f" ({m['gpu']})" if m.get("gpu") else "")
    return f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, {device}, torch {m.get('torch', '?')}"


def provenance(runs: Sequence[SavedRun], refs: Sequence[str]) -> str:
    """The line under a table: the command, and each source with the date and machine of its run."""
    parts = [f"{r.source} ({when(r.config)}, {where_ran(r.config)})" for r in runs]
    if refs:
        parts.append(f"{', '.join(refs)} (published score maps shipped with the package)")
    return f"Generated by `{COMMAND}` from {'; '.join(parts)}."


# ---------------------------------------------------------------- numbers
def fmt_number(x: Any, digits: int) -> str:
    """A number with `digits` decimals; "n/a" for null, NaN or anything that is not a number."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.{digits}f}" if np.isfinite(v) else "n/a"


def ranked_heads(stored: Any, scores: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k best heads in the order the run saved (`top` of its summary: ties there were broken by
    the second score, which needs the per-sample data a snapshot lacks); from the map when fewer
    than k were saved."""
    try:
        heads = [(int(h["layer"]), int(h["head"])) for h in stored or []]
    except (KeyError, TypeError, ValueError):
        heads = []
    return heads[:k] if len(heads) >= k else top_heads(scores, k)
