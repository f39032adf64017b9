"""The run of an experiment that reads the heads of a detection run (grounding-eval, passage-rank):
a header with the score map's fingerprint, one resumable record per item, then the result with its
bootstrap, saved next to the records.

    result = run_on_heads(lm, "passage-rank", cfg, scores, items, PassageResult, unit="question", out=out)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from ..models import LoadedModel
from ..results import DetectionResult
from ..runner import ExperimentResult, Run, check_bootstrap, run_header

if TYPE_CHECKING:
    from typing_extensions import Unpack

R = TypeVar("R", bound="BootstrapResult")


class BootstrapResult(ExperimentResult):
    """A result built from (config, records) whose intervals are bootstrapped: `n_boot` resamples
    seeded with `seed` (grounding-eval's AUROC, passage-rank's recall)."""

    def __init__(self, config: dict[str, Any], records: list[dict[str, Any]], n_boot: int, seed: int) -> None:
        self.config, self.records, self.n_boot, self.seed = config, records, n_boot, seed

    @classmethod
    def from_run(cls: type[R], config: dict[str, Any], records: list[dict[str, Any]], **kwargs: Any) -> R:
        return cls(config, records, int(kwargs.get("n_boot", 2000)), int(kwargs.get("seed", 0)))


class RunOptions(TypedDict, total=False):
    """The keyword options of grounding_eval and passage_rank, passed on to `run_on_heads`."""

    out: str | Path | None  # run folder: records stream there and a rerun resumes (None: nothing written)
    overwrite: bool  # replace a run with a different config in `out` (default False)
    show_progress: bool  # a progress bar (default True)
    scores_source: str  # where the score map came from, recorded in the config
    n_boot: int  # bootstrap resamples (default 2000)
    boot_seed: int  # bootstrap seed (default 0)


def run_on_heads(
    lm: LoadedModel,
    kind: str,
    config: dict[str, Any],
    scores: DetectionResult,
    items: Sequence[tuple[str, Callable[[], dict[str, Any]]]],
    result: type[R],
    *,
    unit: str,
    **run: Unpack[RunOptions],
) -> R:
    """Compute every (id, compute) item (reusing the finished records of `out`), then the result
    (`n_boot` bootstrap resamples seeded with `boot_seed`), saved to `out`."""
    out = run.get("out")
    check_bootstrap(run.get("n_boot", 2000))
    header = run_header(
        lm, kind, config, scores=scores.scores, scores_source=run.get("scores_source", ""), kind_key="kind"
    )
    progress = run.get("show_progress", True)
    with Run(
        header,
        out=out,
        overwrite=run.get("overwrite", False),
        total=len(items),
        desc=kind,
        unit=unit,
        show_progress=progress,
    ) as r:
        for rid, compute in items:
            r.item(rid, compute)
    res = result.from_run(header, r.records, n_boot=run.get("n_boot", 2000), seed=run.get("boot_seed", 0))
    if out is not None:
        res.save(out)
    return res
