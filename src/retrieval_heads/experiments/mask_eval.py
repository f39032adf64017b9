"""Causal test (paper section 4, Fig. 7 and 9): mask the top-K retrieval heads vs K random heads
and measure needle retrieval on needles disjoint from the detection needles.

    lm = load_model("smollm2-135m")
    result = mask_eval(lm, DetectionResult.load("runs/smollm2-135m"),
                       MaskEvalConfig(ks=(0, 5, 10), random_seeds=(0, 1, 2)), out="runs/smollm2-135m-mask")
    print(result.table())

Conditions (`conditions.build_conditions`): K = 0 (nothing masked, the baseline), and for each
K > 0 the top-K heads by retrieval score and, per seed, K heads drawn from outside that top-K set
(`random_pool`: by default non-retrieval heads, score <= 0.1).

Paired difference (`MaskEvalResult.paired`): per K, the top-K NIAH score minus the random-K one on
the same sample (random: the mean over the seeds that finished that sample), with a percentile
bootstrap interval over samples (`stats.paired_difference`; `n_boot`, seed saved in the summary).

The samples are the `niah` task's (`tasks.niah`), run through `conditions.run_masked` like any
task. Per sample: NIAH score = ROUGE-1 recall x 100 of the needle's answer in the response (the
authors'), exact match, an error kind (`tasks.niah.error_kind`: retrieved, incomplete,
hallucination, wrong extraction) and where the strongest unmasked retrieval heads attended.

Attention location: at each generated token, each of the W highest-scoring heads that are *not*
masked in the condition (W = `watch`, default 10) has an argmax key position; it is classed as
``sink`` (one of the first `sink_tokens` = 4 prompt positions), ``needle`` (inside the needle's
token span) or ``elsewhere``. A sample's shares are over all (step, head) pairs. Masked heads are
left out because a uniformly masked head's argmax is meaningless (all weights equal).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..masking import head_means
from ..models import LoadedModel
from ..needles import EVALUATION_NEEDLES, Needle, Sample
from ..results import DetectionResult
from ..tasks.niah import NIAH, content_recall, error_kind
from .conditions import (
    DEFAULT_RANDOM_POOL,
    Answer,
    build_conditions,
    check_masking,
    count_tokens,
    prompts,
    run_masked,
    score_map,
    tiebreak_map,
)
from .mask_results import LOCATIONS, MaskEvalResult
from .runner import Run, check_scores, run_header


# ----------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MaskEvalConfig:
    """What a mask-eval run computes. Grid: lengths (document tokens) x depths (%) x needles."""

    ks: tuple[int, ...] = (0, 5, 10, 20, 50, 100)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    method: str = "uniform"
    phase: str = "all"
    lengths: tuple[int, ...] = (500, 1000)
    depths: tuple[float, ...] = (10.0, 50.0, 90.0)
    needles: tuple[Needle, ...] = EVALUATION_NEEDLES
    max_new_tokens: int = 32
    chat: bool = True
    haystack: str | None = None
    watch: int = 10
    sink_tokens: int = 4
    random_pool: str = DEFAULT_RANDOM_POOL  # conditions.RANDOM_POOLS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ks"], d["random_seeds"] = list(self.ks), list(self.random_seeds)
        d["lengths"], d["depths"] = list(self.lengths), list(self.depths)
        d["needles"] = [n.to_dict() for n in self.needles]
        return d


def locate(argmax: np.ndarray, sample: Sample, sink_tokens: int) -> dict[str, float]:
    """Shares of argmax positions `[steps, watched]` on the sink, the needle span, elsewhere."""
    a = np.asarray(argmax)
    if a.size == 0:
        return {k: float("nan") for k in LOCATIONS}
    sink = a < sink_tokens
    needle = (a >= sample.needle_start) & (a < sample.needle_end) & ~sink
    return {"sink": float(sink.mean()), "needle": float(needle.mean()), "elsewhere": float((~sink & ~needle).mean())}


# ----------------------------------------------------------------------------------- experiment
def _validate(lm: LoadedModel, scores: np.ndarray, cfg: MaskEvalConfig) -> None:
    check_masking(cfg.method, cfg.phase)
    check_scores(lm, scores)
    for length in cfg.lengths:
        if length < 64 or length + cfg.max_new_tokens + 200 > lm.spec.max_context:
            raise ConfigError(f"length {length} must be within 64..{lm.spec.max_context - cfg.max_new_tokens - 200}")
    if not cfg.ks:
        raise ConfigError("no K values")
    if not cfg.needles:
        raise ConfigError("no needles")


def mask_eval(
    lm: LoadedModel,
    scores: DetectionResult | np.ndarray,
    config: MaskEvalConfig = MaskEvalConfig(),
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    scores_source: str = "",
    n_boot: int = 2000,
    boot_seed: int = 0,
) -> MaskEvalResult:
    """Run every (condition, sample); with `out`, records stream to a run folder and a rerun resumes.

    `scores`: a DetectionResult or a `[n_layers, n_heads]` array of retrieval scores.
    """
    s = score_map(scores)
    _validate(lm, s, config)
    conditions = build_conditions(
        s, config.ks, config.random_seeds, config.watch, pool=config.random_pool, tiebreak=tiebreak_map(scores)
    )
    task = NIAH(config.needles, config.lengths, config.depths, config.haystack, config.max_new_tokens)
    task.prepare(lm.tokenizer, config.chat)
    header = run_header(
        lm,
        "mask-eval",
        config.to_dict(),
        scores=s,
        scores_source=scores_source,
        haystack=task.haystack,
        haystack_name=config.haystack,
    )
    header["conditions"] = [c.to_dict() for c in conditions]
    means = None
    if config.method == "mean":  # per-head mean outputs over the start of the haystack
        import torch

        ref = lm.tokenizer(task.haystack[:20000], add_special_tokens=False)["input_ids"][:512]
        means = head_means(lm.model, torch.tensor([ref]))

    def record(a: Answer) -> dict[str, Any]:
        sample: Sample = a.prompt.doc.fields["sample"]
        answer, text = sample.needle.answer, a.text
        kind, span = error_kind(sample, text)
        recall = a.scores["answer_recall"]
        return {
            "sample_id": sample.id,
            **sample.params(),
            "answer": answer,
            "prompt_tokens": len(a.prompt.ids),
            "needle_start": sample.needle_start,
            "needle_end": sample.needle_end,
            "generated_text": text,
            "generated_ids": a.generated_ids,
            "answer_recall": recall,
            "niah_score": 100.0 * recall,
            "exact": bool(a.scores["exact"]),
            "content_recall": content_recall(answer, text),
            "error_kind": kind,
            "copied_span": span,
            "attention": locate(a.argmax, sample, config.sink_tokens),
            "watch_argmax": a.argmax.tolist(),
        }

    with Run(
        header,
        out=out,
        overwrite=overwrite,
        total=len(conditions) * task.size,
        desc=f"mask-eval {lm.spec.name}",
        unit="sample",
        show_progress=show_progress,
    ) as run:
        items = prompts(lm, task, task.docs(task.size, 0, count_tokens(lm)), "answer-only", config.chat)
        run_masked(
            lm,
            task,
            "answer-only",
            items,
            conditions,
            run,
            method=config.method,
            phase=config.phase,
            means=means,
            record=record,
        )
    result = MaskEvalResult.from_run(header, run.records, n_boot=n_boot, boot_seed=boot_seed)
    if out is not None:
        result.save(out)
    return result
