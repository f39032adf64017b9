"""Causal test (paper section 4, Fig. 7 and 9): mask the top-K retrieval heads vs K random heads
and measure needle retrieval on needles disjoint from the detection needles.

    lm = load_model("smollm2-135m")
    result = mask_eval(lm, DetectionResult.load("runs/smollm2-135m"),
                       MaskEvalConfig(ks=(0, 5, 10), random_seeds=(0, 1, 2)), out="runs/smollm2-135m-mask")
    print(result.table())

Conditions (`conditions.build_conditions`): K = 0 (nothing masked, the baseline), and for each
K > 0 the top-K heads by retrieval score and, per seed, K heads drawn from outside that top-K set.

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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..masking import head_means
from ..models import LoadedModel
from ..needles import EVALUATION_NEEDLES, Needle, Sample
from ..results import DetectionResult
from ..tasks.niah import ERROR_KINDS, NIAH, content_recall, error_kind
from .conditions import Answer, Condition, build_conditions, check_masking, count_tokens, prompts, run_masked, score_map
from .runner import ExperimentResult, Run, check_scores, run_header

LOCATIONS = ("sink", "needle", "elsewhere")


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


# ----------------------------------------------------------------------------------- result
@dataclass
class MaskEvalResult(ExperimentResult):
    """Records of every (condition, sample) and the conditions; aggregates computed on demand."""

    kind = "mask-eval"
    name: str
    conditions: list[Condition]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_run(cls, config: dict[str, Any], records: list[dict[str, Any]], **kwargs: Any) -> MaskEvalResult:
        return cls(config["model"], [Condition.from_dict(c) for c in config["conditions"]], records, config)

    def _by(self, cid: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["condition"] == cid]

    @property
    def ks(self) -> list[int]:
        return sorted({c.k for c in self.conditions})

    def curves(self) -> dict[str, Any]:
        """Per K: top and random mean NIAH score (0-100) and exact-match rate; random as the mean
        over seeds with min/max over seeds. K = 0 is the baseline, shared by both curves."""
        out: dict[str, Any] = {
            "k": self.ks,
            "top_score": [],
            "top_exact": [],
            "random_score": [],
            "random_score_min": [],
            "random_score_max": [],
            "random_exact": [],
            "random_exact_min": [],
            "random_exact_max": [],
            "random_draws": [],
        }
        for k in self.ks:
            conds = [c for c in self.conditions if c.k == k]
            base = [c for c in conds if c.kind == "base"]
            top = base or [c for c in conds if c.kind == "top"]
            rand = base or [c for c in conds if c.kind == "random"]
            ts, te = self._means(top[0].id)
            out["top_score"].append(ts)
            out["top_exact"].append(te)
            # random draws not yet run, or cut short (a run stopped early), are left out
            full = max((len(self._by(c.id)) for c in self.conditions), default=0)
            per = [self._means(c.id) for c in rand if self._by(c.id) and (base or len(self._by(c.id)) == full)]
            out["random_draws"].append(0 if base else len(per))
            for key, vals in (("score", [p[0] for p in per]), ("exact", [p[1] for p in per])):
                out[f"random_{key}"].append(float(np.mean(vals)) if vals else float("nan"))
                out[f"random_{key}_min"].append(float(np.min(vals)) if vals else float("nan"))
                out[f"random_{key}_max"].append(float(np.max(vals)) if vals else float("nan"))
        return out

    def _means(self, cid: str) -> tuple[float, float]:
        rs = self._by(cid)
        if not rs:
            return float("nan"), float("nan")
        return float(np.mean([r["niah_score"] for r in rs])), float(np.mean([r["exact"] for r in rs]))

    def errors(self) -> list[dict[str, Any]]:
        """Per condition: counts of each error kind and, over failed samples (not retrieved), the
        mean attention shares of the watched heads."""
        rows = []
        for c in self.conditions:
            rs = self._by(c.id)
            failed = [r for r in rs if r["error_kind"] != "retrieved"]
            loc = {
                k: (float(np.nanmean([r["attention"][k] for r in failed])) if failed else float("nan"))
                for k in LOCATIONS
            }
            ok = [r for r in rs if r["error_kind"] == "retrieved"]
            loc_ok = {
                k: (float(np.nanmean([r["attention"][k] for r in ok])) if ok else float("nan")) for k in LOCATIONS
            }
            rows.append(
                {
                    "condition": c.id,
                    "kind": c.kind,
                    "k": c.k,
                    "seed": c.seed,
                    "n": len(rs),
                    **{e: sum(r["error_kind"] == e for r in rs) for e in ERROR_KINDS},
                    "attention_failed": loc,
                    "attention_retrieved": loc_ok,
                }
            )
        return rows

    def examples(self, per_kind: int = 2) -> list[dict[str, Any]]:
        """A few failed samples of each error kind, from the largest K first."""
        out = []
        order = sorted(self.records, key=lambda r: (-r["k"], r["condition"], r["sample_id"]))
        for kind in ERROR_KINDS[1:]:
            for r in [r for r in order if r["error_kind"] == kind][:per_kind]:
                out.append(
                    {
                        k: r[k]
                        for k in (
                            "condition",
                            "sample_id",
                            "answer",
                            "generated_text",
                            "niah_score",
                            "error_kind",
                            "copied_span",
                            "attention",
                        )
                    }
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_records": len(self.records),
            "config": self.config,
            "conditions": [c.to_dict() for c in self.conditions],
            "curves": self.curves(),
            "errors": self.errors(),
            "examples": self.examples(),
        }

    def table(self) -> str:
        """Markdown: score vs K for top vs random, then error kinds and attention per condition."""
        cv = self.curves()
        lines = [
            "| K | top-K NIAH | top-K exact | random NIAH mean [min, max] | random exact mean [min, max] | random draws |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for i, k in enumerate(cv["k"]):
            lines.append(
                f"| {k} | {cv['top_score'][i]:.1f} | {cv['top_exact'][i]:.0%} | "
                f"{cv['random_score'][i]:.1f} [{cv['random_score_min'][i]:.1f}, {cv['random_score_max'][i]:.1f}] | "
                f"{cv['random_exact'][i]:.0%} [{cv['random_exact_min'][i]:.0%}, {cv['random_exact_max'][i]:.0%}] | "
                f"{cv['random_draws'][i] or '-'} |"
            )
        lines += [
            "",
            "| condition | n | retrieved | incomplete | hallucination | wrong extraction | "
            "failed: attn sink / needle / elsewhere |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for e in self.errors():
            a = e["attention_failed"]
            att = "-" if np.isnan(a["sink"]) else f"{a['sink']:.0%} / {a['needle']:.0%} / {a['elsewhere']:.0%}"
            lines.append(
                f"| {e['condition']} | {e['n']} | {e['retrieved']} | {e['incomplete']} | "
                f"{e['hallucination']} | {e['wrong_extraction']} | {att} |"
            )
        return "\n".join(lines)


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
) -> MaskEvalResult:
    """Run every (condition, sample); with `out`, records stream to a run folder and a rerun resumes.

    `scores`: a DetectionResult or a `[n_layers, n_heads]` array of retrieval scores.
    """
    s = score_map(scores)
    _validate(lm, s, config)
    conditions = build_conditions(s, config.ks, config.random_seeds, config.watch)
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
    result = MaskEvalResult.from_run(header, run.records)
    if out is not None:
        result.save(out)
    return result
