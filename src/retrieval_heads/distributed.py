"""Scale-out: deterministic shards of the sample grid, torch.distributed ranks, and merging runs.

A shard `i/n` takes the samples whose grid index is i modulo n. Under `torchrun`, rank r of
world w runs shard r/w into `OUT/rank-r/` and rank 0 merges. `merge_runs` combines record files
of separate jobs (e.g. a Slurm array with `--shard i/n`) into one result identical to a single
process: records are put back in grid order, whatever the order in which samples finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, RunConflictError
from .needles import sample_id
from .results import DetectionResult
from .runs import CONFIG_FILE, RECORDS_FILE, RunLock, read_config, read_records, semantic
from .scorefile import atomic_write_text


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ConfigError(f"cannot parse shard {text!r}; use i/n, e.g. 0/4") from None
        if n < 1 or not 0 <= i < n:
            raise ConfigError(f"shard {text!r}: need 0 <= i < n")
        return cls(i, n)

    def take(self, items: Sequence[Any]) -> list[Any]:
        return [x for k, x in enumerate(items) if k % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world


def init_process_group(device: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def grid_order(config: dict[str, Any]) -> list[str]:
    """Sample ids of a run's grid in the order a single process runs them."""
    g = config["grid"]
    return [sample_id(n["id"], int(L), float(d)) for n in g["needles"] for L in g["lengths"] for d in g["depths"]]


def merge_runs(runs: Sequence[str | Path], out: str | Path | None = None) -> DetectionResult:
    """Merge run folders of one config (shards, or resumed pieces) into one result.

    Refuses runs whose configs differ in anything but the shard, and duplicate samples whose
    records disagree. With `out`, writes config, records and final files there atomically.
    """
    if not runs:
        raise ConfigError("merge needs at least one run folder")
    configs: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    for r in runs:
        p = Path(r)
        cfg_path = p / CONFIG_FILE
        if not cfg_path.exists():
            raise DataError(f"{p}: not a run folder (no {CONFIG_FILE})")
        cfg = read_config(cfg_path)
        if "grid" not in cfg:
            raise DataError(f"{cfg_path}: not the config of a detection run (no grid)")
        configs.append(cfg)
        for rec in read_records(p / RECORDS_FILE):
            old = by_id.get(rec["id"])
            if old is not None and _result_fields(old) != _result_fields(rec):
                raise RunConflictError(f"sample {rec['id']} appears in two runs with different results")
            by_id[rec["id"]] = rec
    base = {k: v for k, v in semantic(configs[0]).items() if k != "shard"}
    for r, cfg in zip(runs, configs, strict=True):
        other = {k: v for k, v in semantic(cfg).items() if k != "shard"}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise RunConflictError(f"{r}: incompatible config (differs in: {', '.join(diff)})")
    try:
        order = grid_order(configs[0])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{runs[0]}: the config's grid is malformed ({type(e).__name__}: {str(e)[:80]})") from None
    unknown = set(by_id) - set(order)
    if unknown:
        raise RunConflictError(f"records not in the grid: {sorted(unknown)[:3]}")
    records = [by_id[i] for i in order if i in by_id]
    config = {k: v for k, v in configs[0].items() if k != "shard"}
    result = DetectionResult.from_records(config.get("model", "merged"), records, config)
    if out is not None:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        with RunLock(d):  # one writer per folder, as for a run
            atomic_write_text(d / CONFIG_FILE, json.dumps(config, indent=1, sort_keys=True))
            atomic_write_text(d / RECORDS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
            result.save(d)
    return result


def _result_fields(rec: dict[str, Any]) -> tuple:
    return (rec.get("generated_ids"), rec.get("copy_counts"), rec.get("kept"))
