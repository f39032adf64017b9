"""What a finetune-eval run's records mean: the score maps before and after training, how much
they agree (Pearson over all heads, top-k overlap and Jaccard), needle retrieval before and after,
and the trajectory the Trainer callback recorded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from ..analysis import head_label
from ..integrations.transformers import agreement, top_of
from ..results import DetectionResult
from ..runner import ExperimentResult

TABLE_HEADER = (
    "| condition | training | steps | loss first → last | NIAH, eval needles (step 0 → end) "
    "| NIAH, detection grid (before → after) | kept (before → after) | Pearson before/after "
    "| top-{k} overlap | s per callback call | training s (with callback) |\n"
    "|---|---|---:|---|---|---|---|---:|---:|---:|---:|"
)


def _f(x: Any, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{float(x):.{digits}f}"


class FinetuneResult(ExperimentResult):
    kind: ClassVar[str] = "finetune-eval"

    def __init__(
        self,
        config: dict[str, Any],
        before: DetectionResult,
        after: DetectionResult,
        watches: list[dict[str, Any]],
        losses: list[dict[str, Any]],
        train: dict[str, Any],
    ) -> None:
        self.config, self.before, self.after = config, before, after
        self.watches = sorted(watches, key=lambda w: int(w["step"]))
        self.losses = sorted(losses, key=lambda h: int(h["step"]))
        self.train = train

    @classmethod
    def from_run(cls, config: dict[str, Any], records: list[dict[str, Any]], **kwargs: Any) -> FinetuneResult:
        def phase(name: str) -> list[dict[str, Any]]:
            return [r for r in records if r.get("phase") == name]

        def detection(name: str) -> DetectionResult:
            return DetectionResult.from_records(f"{config['model']} {name}", phase(name), config)

        train = next(iter(phase("train")), {})
        return cls(config, detection("before"), detection("after"), phase("watch"), phase("loss"), train)

    @property
    def label(self) -> str:
        c = self.config
        cond = str(c["condition"])
        if cond == "control":
            cond += f" ({c['control']}" + (f" top-{c['control_k']})" if c["control"] == "mask" else ")")
        return cond

    @property
    def training(self) -> str:
        c = self.config
        return (f"LoRA r={c['lora_r']}" if c["lora"] else "full") + f", lr {c['learning_rate']:g}, {c['seq_len']} tok"

    def niah(self, result: DetectionResult) -> float:
        recalls = [float(r["answer_recall"]) for r in result.records]
        return 100 * float(np.mean(recalls)) if recalls else float("nan")

    def comparison(self) -> dict[str, Any]:
        k = int(self.config["k"])
        jac, pearson = agreement(self.after, self.before, k)
        shared = set(top_of(self.before, k)) & set(top_of(self.after, k))
        w0, w1 = (self.watches[0], self.watches[-1]) if self.watches else ({}, {})
        return {
            "pearson": pearson,
            f"top{k}_jaccard": jac,
            f"top{k}_overlap": len(shared),
            "niah_before": self.niah(self.before),
            "niah_after": self.niah(self.after),
            "kept_before": self.before.n_kept,
            "kept_after": self.after.n_kept,
            "watch_niah_start": w0.get("niah_score"),
            "watch_niah_end": w1.get("niah_score"),
            "loss_first": self.losses[0]["loss"] if self.losses else None,
            "loss_last": self.losses[-1]["loss"] if self.losses else None,
            "watch_calls": len(self.watches),
            "watch_seconds_mean": float(np.mean([w["seconds"] for w in self.watches])) if self.watches else None,
            "train_seconds": self.train.get("seconds"),
            "masked": self.train.get("masked", []),
        }

    def trajectory(self, n_heads: int = 5) -> dict[str, Any]:
        """Per callback call: step, NIAH score, Jaccard and Pearson vs step 0, and the scores of
        the step-0 map's top `n_heads` heads (the callback's grid and needles)."""
        first = np.array(self.watches[0]["scores"], dtype=float) if self.watches else np.zeros((0, 0))
        watched = [] if np.isnan(first).all() else top_of(DetectionResult.from_aggregate("", first, first, 1), n_heads)
        return {
            "step": [int(w["step"]) for w in self.watches],
            "niah_score": [w["niah_score"] for w in self.watches],
            "jaccard": [w["jaccard"] for w in self.watches],
            "pearson": [w["pearson"] for w in self.watches],
            "seconds": [w["seconds"] for w in self.watches],
            "heads": {head_label(l, h): [w["scores"][l][h] for w in self.watches] for l, h in watched},
            "loss_step": [int(h["step"]) for h in self.losses],
            "loss": [h["loss"] for h in self.losses],
        }

    def to_dict(self) -> dict[str, Any]:
        k = int(self.config["k"])
        return {
            "kind": self.kind,
            "model": self.config["model"],
            "label": self.label,
            "training": self.training,
            "config": {key: self.config.get(key) for key in ("condition", "control", "steps", "lora", "seed")},
            "comparison": self.comparison(),
            "trajectory": self.trajectory(),
            "top_before": [h.to_dict() for h in self.before.top(k)],
            "top_after": [h.to_dict() for h in self.after.top(k)],
            "scores_before": self.before.scores.tolist(),
            "scores_after": self.after.scores.tolist(),
        }

    def row(self) -> str:
        c = self.comparison()
        k = int(self.config["k"])
        return (
            f"| {self.label} | {self.training} | {self.config['steps']} "
            f"| {_f(c['loss_first'], 2)} → {_f(c['loss_last'], 2)} "
            f"| {_f(c['watch_niah_start'])} → {_f(c['watch_niah_end'])} "
            f"| {_f(c['niah_before'])} → {_f(c['niah_after'])} "
            f"| {c['kept_before']}/{len(self.before.records)} → {c['kept_after']}/{len(self.after.records)} "
            f"| {_f(c['pearson'], 3)} | {c[f'top{k}_overlap']}/{k} "
            f"| {_f(c['watch_seconds_mean'])} | {_f(c['train_seconds'], 0)} |"
        )

    def table(self) -> str:
        return finetune_table([self])


def finetune_table(results: Sequence[FinetuneResult]) -> str:
    """One row per run (condition): before/after agreement, needle retrieval, cost."""
    k = int(results[0].config["k"]) if results else 10
    return "\n".join([TABLE_HEADER.format(k=k), *(r.row() for r in results)])
