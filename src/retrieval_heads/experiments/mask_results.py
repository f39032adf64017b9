"""What a mask-eval run's records mean (`task_eval.mask_eval` runs it): NIAH score vs K for the top-K and
random-K conditions, the paired top-minus-random differences, error kinds and where the watched
heads attended; the summary and the Markdown table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..tasks.niah import ERROR_KINDS
from .conditions import Condition, random_pool_line, random_pool_of
from .null import null_lines, null_test
from .stats import fmt_interval, paired_difference
from .task_results import MaskingResult, by_doc, seed_mean

LOCATIONS = ("sink", "needle", "elsewhere")


@dataclass
class MaskEvalResult(MaskingResult):
    """A mask-eval run: NIAH score vs K, paired differences, error kinds; computed on demand."""

    kind = "mask-eval"

    @classmethod
    def from_run(cls, config: dict[str, Any], records: list[dict[str, Any]], **kwargs: Any) -> MaskEvalResult:
        """`kwargs`: n_boot, ci, boot_seed of the bootstrap of the paired differences."""
        return cls(config["model"], [Condition.from_dict(c) for c in config["conditions"]], records, config, **kwargs)

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

    def paired(self) -> dict[str, list[Any]]:
        """Per K > 0: top-K minus random-K NIAH score (0-100), paired by sample, with its bootstrap
        interval; a sample's random score is the mean over the seeds that finished it."""
        out: dict[str, list[Any]] = {"k": [], "n": [], "mean": [], "low": [], "high": []}
        for k in (k for k in self.ks if k > 0):
            top = by_doc(self.records, f"top-k{k}", _niah_score, "sample_id")
            draws = [c.id for c in self.conditions if c.kind == "random" and c.k == k]
            rand = seed_mean(self.records, draws, _niah_score, "sample_id")
            d = paired_difference(top, rand, n_boot=self.n_boot, ci=self.ci, seed=self.boot_seed)
            out["k"].append(k)
            for key in ("n", "mean", "low", "high"):
                out[key].append(d[key])
        return out

    def null(self) -> list[dict[str, Any]]:
        """Per K > 0: the top-K effect on the mean NIAH score (top-K minus K = 0) placed in the null
        of the random draws' effects, each finished draw one sample (`null.null_test`). Without K = 0
        in the sweep the effects are the mean NIAH scores themselves (`effect: "metric"`)."""
        unmasked = 0 in self.ks
        base = self._means("base")[0] if unmasked else 0.0
        full = max((len(self._by(c.id)) for c in self.conditions), default=0)
        out = []
        for k in (k for k in self.ks if k > 0):
            draws = [c for c in self.conditions if c.kind == "random" and c.k == k and len(self._by(c.id)) == full]
            effects = [self._means(c.id)[0] - base for c in draws]
            t = {"k": k, **null_test(self._means(f"top-k{k}")[0] - base, effects)}
            out.append(t if unmasked else {**t, "effect": "metric"})
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
            ok = [r for r in rs if r["error_kind"] == "retrieved"]
            loc = {k: _mean_share(failed, k) for k in LOCATIONS}
            loc_ok = {k: _mean_share(ok, k) for k in LOCATIONS}
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
            "random_pool": random_pool_of(self.config),
            "paired_top_minus_random": self.paired(),
            "null_distribution": self.null(),
            "bootstrap": self.bootstrap(),
            "errors": self.errors(),
            "examples": self.examples(),
        }

    def table(self) -> str:
        """Markdown: score vs K for top vs random, then error kinds and attention per condition."""
        cv, pd = self.curves(), self.paired()
        paired = {k: {x: pd[x][i] for x in ("mean", "low", "high")} for i, k in enumerate(pd["k"])}
        lines = [
            random_pool_line(self.config),
            "",
            "| K | top-K NIAH | top-K exact | random NIAH mean [min, max] | random exact mean [min, max] | "
            f"random draws | top minus random NIAH, paired [{round(self.ci * 100)}% CI] |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for i, k in enumerate(cv["k"]):
            lines.append(
                f"| {k} | {cv['top_score'][i]:.1f} | {cv['top_exact'][i]:.0%} | "
                f"{cv['random_score'][i]:.1f} [{cv['random_score_min'][i]:.1f}, {cv['random_score_max'][i]:.1f}] | "
                f"{cv['random_exact'][i]:.0%} [{cv['random_exact_min'][i]:.0%}, {cv['random_exact_max'][i]:.0%}] | "
                f"{cv['random_draws'][i] or '-'} | {fmt_interval(paired.get(k))} |"
            )
        null = null_lines(self.kind, self.null())
        lines += ["", *null] if null else []
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


def _niah_score(r: dict[str, Any]) -> float:
    return float(r["niah_score"])


def _mean_share(records: list[dict[str, Any]], location: str) -> float:
    """Mean attention share at `location` over records that have one (None/NaN: no watched head
    attended, e.g. every watched head masked); NaN when none has."""
    vals = [v for v in (r["attention"][location] for r in records) if v is not None and v == v]
    return float(np.mean(vals)) if vals else float("nan")
