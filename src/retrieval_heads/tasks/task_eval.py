"""Downstream impact of masking retrieval heads (paper section 4.2-4.3, Fig. 8 and 10).

    lm = load_model("smollm2-135m")
    res = task_eval(lm, DetectionResult.load("runs/smollm2-135m"),
                    TaskEvalConfig(task="extractive-qa", style="answer-only", k=20, random_seeds=(0, 1), limit=50),
                    out="runs/smollm2-135m-task-extractive-qa")
    print(res.table())

Conditions (shared with mask-eval, `tasks.niah.build_conditions`): nothing masked, the top-K heads
by retrieval score masked, and per seed K random heads drawn from outside the top-K set. Every
condition sees the same documents; greedy decoding (`tasks.niah.generate`) under `mask_heads`.

Statistics: per condition the mean of each metric with a percentile bootstrap interval over
examples, and the *paired* difference to the unmasked run (same examples) with its own bootstrap
interval. The random row averages each example's metric over the seeds before resampling.
Bootstrap: `n_boot` resamples from `numpy.random.default_rng(boot_seed)`; both are saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..errors import ConfigError
from ..masking import METHODS, PHASES, mask_heads
from ..models import LoadedModel
from ..results import CONFIG_FILE, RECORDS_FILE, DetectionResult
from ..runs import RunFolder, read_records
from ..scorefile import atomic_write_text
from .base import Doc, Request, Task, get_task
from .niah import Condition, MaskEvalConfig, _clean, build_conditions, execution_order, generate

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
PLOT_STEM = "task_eval"


@dataclass(frozen=True)
class TaskEvalConfig:
    """What a task-eval run computes. `task_args` go to the task's constructor."""

    task: str
    style: str = "answer-only"
    k: int = 20
    random_seeds: tuple[int, ...] = (0, 1)
    limit: int | None = None
    seed: int = 0
    task_args: dict[str, Any] = field(default_factory=dict)
    method: str = "uniform"
    phase: str = "all"
    chat: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["random_seeds"] = list(self.random_seeds)
        return d


# ----------------------------------------------------------------------------------- bootstrap
def bootstrap_ci(x: Sequence[float], *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean over examples. NaN for no data."""
    a = np.asarray(x, dtype=float)
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(a.mean())
    if a.size == 1:
        return m, m, m
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return m, float(lo), float(hi)


# ----------------------------------------------------------------------------------- prompts
def build_prompt(tokenizer: Any, req: Request, chat: bool) -> str:
    """The text given to the model: the chat template with the user message and the generation
    prompt (or the plain message) followed by the assistant prefix."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": req.user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        bos = tokenizer.bos_token or ""
        text = f"{bos}{req.user}\n\n"
    return text + req.assistant_prefix


class StopStrings:
    """Greedy decoding stops at EOS or once the text (after some non-space content) holds a stop
    string; `cut` trims the text at that stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        eos = tokenizer.eos_token_id
        ids = eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        self.eos_ids = frozenset(i for i in ids if i is not None)

    def cut(self, text: str) -> str:
        start = len(text) - len(text.lstrip())
        ends = [i for i in (text.find(s, start + 1) for s in self.stops) if i >= 0]
        return text[: min(ends)] if ends else text

    def __call__(self, generated: list[int]) -> bool:
        if generated[-1] in self.eos_ids:
            return True
        if not self.stops:
            return False
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return self.cut(text) != text


# ----------------------------------------------------------------------------------- result
@dataclass
class TaskEvalResult:
    name: str
    task: str
    style: str
    metrics: list[str]
    conditions: list[Condition]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    n_boot: int = 2000
    ci: float = 0.95
    boot_seed: int = 0

    def _values(self, cid: str, metric: str) -> dict[str, float]:
        return {r["doc_id"]: float(r["scores"][metric]) for r in self.records if r["condition"] == cid}

    def _random_ids(self) -> list[str]:
        return [c.id for c in self.conditions if c.kind == "random"]

    def _series(self, which: str, metric: str) -> dict[str, float]:
        """Per doc: the metric of a condition id, or for 'random' the mean over the seeds that
        finished that doc."""
        if which != "random":
            return self._values(which, metric)
        per = [self._values(cid, metric) for cid in self._random_ids()]
        docs = sorted(set().union(*per)) if per else []
        return {d: float(np.mean([p[d] for p in per if d in p])) for d in docs}

    def rows(self) -> list[dict[str, Any]]:
        """One row per shown condition: none, top-K, random-K (seed mean), each seed; per metric
        mean, CI and the paired difference to none with its CI."""
        k = max((c.k for c in self.conditions), default=0)
        shown = [("none", "base", "no mask"), (f"top-k{k}", "top", f"top-{k} retrieval heads")]
        if self._random_ids():
            shown.append(("random", "random", f"random {k} heads (mean of {len(self._random_ids())} seeds)"))
            shown += [(cid, "random-seed", f"  random {k}, seed {cid.rsplit('-s', 1)[1]}") for cid in self._random_ids()]
        rows = []
        for which, kind, label in shown:
            row: dict[str, Any] = {"condition": which, "kind": kind, "label": label}
            for m in self.metrics:
                cur = self._series("base" if which == "none" else which, m)
                base = self._series("base", m)
                row["n"] = len(cur)
                mean, lo, hi = bootstrap_ci(list(cur.values()), n_boot=self.n_boot, ci=self.ci, seed=self.boot_seed)
                paired = [cur[d] - base[d] for d in cur if d in base]
                dm, dlo, dhi = bootstrap_ci(paired, n_boot=self.n_boot, ci=self.ci, seed=self.boot_seed)
                row[m] = {"mean": mean, "low": lo, "high": hi, "delta": dm, "delta_low": dlo, "delta_high": dhi}
            rows.append(row)
        return rows

    def table(self) -> str:
        pct = int(round(self.ci * 100))
        head = " | ".join(f"{m} (%) [{pct}% CI] | Δ{m} vs none [{pct}% CI]" for m in self.metrics)
        lines = [f"| condition | n | {head} |", "|---|---:|" + "---:|---:|" * len(self.metrics)]
        for r in self.rows():
            cells = []
            for m in self.metrics:
                v = r[m]
                if np.isnan(v["mean"]):
                    cells += ["-", "-"]
                    continue
                cells.append(f"{100 * v['mean']:.1f} [{100 * v['low']:.1f}, {100 * v['high']:.1f}]")
                cells.append("-" if r["condition"] == "none" or np.isnan(v["delta"]) else
                             f"{100 * v['delta']:+.1f} [{100 * v['delta_low']:+.1f}, {100 * v['delta_high']:+.1f}]")
            lines.append(f"| {r['label']} | {r['n']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def examples(self, n: int = 3) -> list[dict[str, Any]]:
        """Docs the unmasked model got right (primary metric > 0.5) and top-K got wrong."""
        m = self.metrics[0]
        k = max((c.k for c in self.conditions), default=0)
        base, top = self._by_doc("base"), self._by_doc(f"top-k{k}")
        out = []
        for d, b in base.items():
            t = top.get(d)
            if t and b["scores"][m] > 0.5 >= t["scores"][m]:
                out.append({"doc_id": d, "answers": b["answers"], "none": b["generated_text"],
                            "top": t["generated_text"]})
        return out[:n]

    def _by_doc(self, cid: str) -> dict[str, dict[str, Any]]:
        return {r["doc_id"]: r for r in self.records if r["condition"] == cid}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "task": self.task, "style": self.style, "metrics": self.metrics,
                "n_records": len(self.records), "bootstrap": {"n_boot": self.n_boot, "ci": self.ci, "seed": self.boot_seed,
                                                              "method": "percentile, numpy default_rng"},
                "config": self.config, "rows": self.rows(), "examples": self.examples()}

    def save(self, folder: str | Path) -> None:
        d = Path(folder)
        atomic_write_text(d / SUMMARY_FILE, json.dumps(_clean(self.to_dict()), indent=1))
        atomic_write_text(d / TABLE_FILE, self.table() + "\n")

    @classmethod
    def load(cls, folder: str | Path, **kwargs: Any) -> "TaskEvalResult":
        d = Path(folder)
        config = json.loads((d / CONFIG_FILE).read_text())
        conds = [Condition(c["kind"], c["k"], c["seed"], tuple(tuple(h) for h in c["heads"]), ())
                 for c in config["conditions"]]
        return cls(config["model"], config["task"]["name"], config["style"], config["metrics"], conds,
                   read_records(d / RECORDS_FILE), config, **kwargs)


# ----------------------------------------------------------------------------------- experiment
def _validate(lm: LoadedModel, scores: np.ndarray, cfg: TaskEvalConfig, task: Task) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown masking method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.phase not in PHASES:
        raise ConfigError(f"unknown masking phase {cfg.phase!r}; choose from {', '.join(PHASES)}")
    task.check_style(cfg.style)
    if tuple(scores.shape) != lm.spec.shape:
        raise ConfigError(f"score file has shape {tuple(scores.shape)} (layers x heads) but {lm.spec.name} has "
                          f"{lm.spec.n_layers} x {lm.spec.n_heads} heads; scores of another model?")
    if cfg.k < 1:
        raise ConfigError(f"K must be >= 1, got {cfg.k}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit must be >= 1, got {cfg.limit}")


def task_eval(
    lm: LoadedModel,
    scores: DetectionResult | np.ndarray,
    config: TaskEvalConfig,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    scores_source: str = "",
    n_boot: int = 2000,
    ci: float = 0.95,
    boot_seed: int = 0,
) -> TaskEvalResult:
    """Run every (condition, doc); with `out`, records stream to a run folder and a rerun resumes.

    `scores`: a DetectionResult or a `[n_layers, n_heads]` array of retrieval scores.
    """
    s = np.asarray(scores.scores if isinstance(scores, DetectionResult) else scores, dtype=float)
    task = get_task(config.task, **config.task_args)
    _validate(lm, s, config, task)
    conditions = build_conditions(s, MaskEvalConfig(ks=(0, config.k), random_seeds=config.random_seeds, watch=0))
    tok = lm.tokenizer
    limit = config.limit or task.default_limit
    docs: list[Doc] = task.docs(limit, config.seed, lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    run_config = {
        "version": __version__, "kind": "task-eval", "model": lm.spec.name, "model_spec": lm.spec.to_dict(),
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""), "task": task.config(),
        **{k: v for k, v in config.to_dict().items() if k not in ("task", "task_args")}, "limit": limit,
        "metrics": [m.name for m in task.metrics], "scores_source": scores_source,
        "scores_sha256": hashlib.sha256(np.nan_to_num(s, nan=-1).tobytes()).hexdigest()[:16],
        "doc_ids": [d.id for d in docs], "conditions": [c.to_dict() for c in conditions],
    }
    folder = RunFolder(out, run_config, overwrite=overwrite) if out is not None else None
    done = {r["id"]: r for r in folder.open()} if folder else {}

    prompts = []
    for d in docs:
        req = task.request(d, config.style)
        ids = tok(build_prompt(tok, req, config.chat), add_special_tokens=False)["input_ids"]
        if len(ids) + req.max_new_tokens > lm.spec.max_context:
            raise ConfigError(f"{d.id}: prompt of {len(ids)} tokens + {req.max_new_tokens} new tokens exceeds "
                              f"{lm.spec.name}'s context of {lm.spec.max_context}")
        prompts.append((d, req, ids))

    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(conditions) * len(docs), desc=f"task-eval {task.name} {config.style}", unit="doc",
               disable=not show_progress)
    for cond in execution_order(conditions):
        with mask_heads(lm.model, cond.heads, config.method, phase=config.phase):  # type: ignore[arg-type]
            for d, req, ids in prompts:
                rid = f"{cond.id}/{d.id}"
                if rid in done:
                    records.append(done[rid])
                    bar.update(1)
                    continue
                t0 = time.perf_counter()
                stop = StopStrings(tok, req.stop)
                gen, _ = generate(lm, SimpleNamespace(prompt_ids=ids), req.max_new_tokens, stop, ())  # type: ignore[arg-type]
                text = stop.cut(tok.decode(gen, skip_special_tokens=True))
                pred = task.extract_answer(text, d, config.style)
                record = {"id": rid, "condition": cond.id, "kind": cond.kind, "k": cond.k, "seed": cond.seed,
                          "doc_id": d.id, "style": config.style, "prompt_tokens": len(ids),
                          "assistant_prefix": req.assistant_prefix, "generated_text": text,
                          "n_generated": len(gen), "prediction": pred, "answers": list(d.answers),
                          "scores": task.score(d, pred), "seconds": round(time.perf_counter() - t0, 3)}
                if folder:
                    folder.append(record)
                records.append(record)
                bar.update(1)
    bar.close()
    result = TaskEvalResult(lm.spec.name, task.name, config.style, [m.name for m in task.metrics], conditions,
                            records, run_config, n_boot=n_boot, ci=ci, boot_seed=boot_seed)
    if folder:
        result.save(folder.path)
        try:
            from ..task_plots import plot_task_eval

            plot_task_eval([result], folder.path / PLOT_STEM)
        except ImportError as e:  # matplotlib missing: the numbers are still saved
            logger.warning("no plot: %s", e)
    return result
