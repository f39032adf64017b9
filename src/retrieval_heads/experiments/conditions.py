"""A task under masking conditions, shared by mask-eval and task-eval: nothing masked, the top-K
heads, K random heads; each condition's heads are masked while every document is answered.

Conditions: K = 0 (nothing masked, the baseline), and for each K > 0 the top-K heads by score and,
per seed, K heads drawn uniformly without replacement with `numpy.random.default_rng([seed, K])`
from a pool outside that top-K set (the authors meant to exclude the top heads and never did;
their draw was unseeded). Pools (`RANDOM_POOLS`): "non-retrieval" (default, as in the paper: heads
scoring <= 0.1, never a retrieval head ranked just below K) or "outside-top" (every other head,
scored or not; the pool of runs made before `random_pool` existed).

    conditions = build_conditions(scores, ks=(0, 20), random_seeds=(0, 1))
    with Run(header, out=out) as run:
        run_masked(lm, task, "answer-only", prompts(lm, task, docs, "answer-only", chat=True), conditions, run,
                   method="uniform", phase="all", record=lambda a: {"doc_id": a.prompt.doc.id, "scores": a.scores})

Decoding is greedy (`decoding.greedy`); the prompt's last token is the first decode step, so the
decode-phase masks and the watched heads' attention cover every generated token.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decoding import StopFn, cache_io, greedy
from ..errors import ConfigError
from ..heads import Head, random_heads, rank_heads
from ..masking import METHODS, PHASES, mask_heads
from ..models import LoadedModel, attention_implementation
from ..results import RETRIEVAL_THRESHOLD, DetectionResult
from ..tasks.base import Doc, Request, Task
from .runner import Run

# Where random-K heads are drawn from (always outside the top-K set): name -> how tables say it.
RANDOM_POOLS = {
    "non-retrieval": f"heads with score <= {RETRIEVAL_THRESHOLD:g} outside the top K",
    "outside-top": "every head outside the top K",
}
DEFAULT_RANDOM_POOL = "non-retrieval"
LEGACY_RANDOM_POOL = "outside-top"  # runs saved before the config recorded `random_pool`


def check_random_pool(pool: str) -> None:
    if pool not in RANDOM_POOLS:
        raise ConfigError(f"unknown random pool {pool!r}; choose from {', '.join(RANDOM_POOLS)}")


def random_pool_of(config: dict[str, Any]) -> str:
    """The pool a saved run drew its random heads from (old configs lack the key: outside-top)."""
    return str(config.get("random_pool", LEGACY_RANDOM_POOL))


def random_pool_line(config: dict[str, Any]) -> str:
    """The line a table shows above itself: where its random heads come from."""
    pool = random_pool_of(config)
    return f"random heads drawn from: {RANDOM_POOLS.get(pool, pool)} (pool {pool!r})"


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
        return {
            "id": self.id,
            "kind": self.kind,
            "k": self.k,
            "seed": self.seed,
            "heads": [list(h) for h in self.heads],
            "watch": [list(h) for h in self.watch],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, watch: bool = True) -> Condition:
        """Back from `to_dict` (a run's saved config); `watch=False` leaves the watched heads out."""
        return cls(
            d["kind"],
            d["k"],
            d["seed"],
            tuple((int(l), int(h)) for l, h in d["heads"]),
            tuple((int(l), int(h)) for l, h in d["watch"]) if watch else (),
        )


def score_map(scores: DetectionResult | np.ndarray) -> np.ndarray:
    """The `[n_layers, n_heads]` retrieval scores of a detection result or an array, as floats."""
    return np.asarray(scores.scores if isinstance(scores, DetectionResult) else scores, dtype=float)


def tiebreak_map(scores: DetectionResult | np.ndarray) -> np.ndarray | None:
    """The second score that breaks ties in the ranking (`DetectionResult.tiebreak`); None for a
    bare array (its ties then go to the lower layer and head)."""
    return scores.tiebreak if isinstance(scores, DetectionResult) else None


def count_tokens(lm: LoadedModel) -> Callable[[str], int]:
    """Text length in the model's tokens (what `Task.docs` pads contexts with)."""
    return lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_masking(method: str, phase: str) -> None:
    """A masking method and phase that `masking.mask_heads` knows (checked before any work)."""
    if method not in METHODS:
        raise ConfigError(f"unknown masking method {method!r}; choose from {', '.join(METHODS)}")
    if phase not in PHASES:
        raise ConfigError(f"unknown masking phase {phase!r}; choose from {', '.join(PHASES)}")


def random_pool(scores: np.ndarray, order: Sequence[Head], k: int, pool: str) -> list[Head]:
    """The heads random-K draws from, in ranking order: outside the top K, and for "non-retrieval"
    scoring <= 0.1 (unscored NaN heads are left out)."""
    check_random_pool(pool)
    rest = list(order[k:])
    if pool == "outside-top":
        return rest
    return [h for h in rest if scores[h] <= RETRIEVAL_THRESHOLD]


def build_conditions(
    scores: np.ndarray,
    ks: Sequence[int],
    random_seeds: Sequence[int],
    watch: int = 0,
    *,
    pool: str = DEFAULT_RANDOM_POOL,
    tiebreak: np.ndarray | None = None,
) -> list[Condition]:
    """Validate K values against the head count and build the conditions, base first.

    Top-K: the K best heads of `rank_heads(scores, tiebreak)` (ties by the second score).
    Random: per seed, K heads drawn from `random_pool(scores, order, K, pool)`
    (`heads.random_heads`). `watch`: per condition, the best-ranked heads that are not masked
    (whose attention an experiment may follow)."""
    n = int(scores.size)
    order = rank_heads(scores, tiebreak)
    out: list[Condition] = []
    check_random_pool(pool)
    if np.isnan(scores).all():
        raise ConfigError("the score file scores no head (no kept detection sample); run a larger detection")
    for k in sorted(set(ks)):
        if k < 0:
            raise ConfigError(f"K must be >= 0, got {k}")
        if k > n:
            raise ConfigError(f"K={k} is larger than the number of heads ({n})")
        if random_seeds and pool == "outside-top" and 2 * k > n:
            raise ConfigError(
                f"K={k}: cannot draw {k} random heads outside the top {k} of {n} heads; use K <= {n // 2}"
            )
        size = len(random_pool(scores, order, k, pool))
        if random_seeds and k > 0 and size < k:
            raise ConfigError(
                f"K={k}: cannot draw {k} random heads from the {size} {RANDOM_POOLS[pool]}; "
                "use a smaller K or --random-pool outside-top"
            )

    def watched(masked: tuple[Head, ...]) -> tuple[Head, ...]:
        m = set(masked)
        return tuple(h for h in order if h not in m)[:watch]

    for k in sorted(set(ks)):
        if k == 0:
            out.append(Condition("base", 0, None, (), watched(())))
            continue
        top = tuple(sorted(order[:k]))
        out.append(Condition("top", k, None, top, watched(top)))
        for s in random_seeds:
            r = random_heads(random_pool(scores, order, k, pool), k, s)
            out.append(Condition("random", k, s, r, watched(r)))
    return out


def execution_order(conditions: Sequence[Condition]) -> list[Condition]:
    """Base; then per K (ascending) the top-K and the first random draw; then the other draws seed
    by seed. A run stopped early (it resumes) already holds complete top-vs-random pairs."""
    seeds = sorted({c.seed for c in conditions if c.kind == "random" and c.seed is not None})
    first = seeds[0] if seeds else None

    def key(c: Condition) -> tuple[int, int, int]:
        if c.kind == "base":
            return (0, 0, 0)
        if c.kind == "top" or c.seed == first:
            return (1, c.k, 0 if c.kind == "top" else 1)
        assert c.seed is not None  # a random draw: always seeded
        return (2, seeds.index(c.seed), c.k)

    return sorted(conditions, key=key)


# ----------------------------------------------------------------------------------- decoding
def generate(
    lm: LoadedModel, prompt_ids: Sequence[int], max_new_tokens: int, stop: StopFn, watch: Sequence[Head] = ()
) -> tuple[list[int], np.ndarray]:
    """Greedy generation: prefill prompt[:-1], then the last prompt token is the first decode step.

    Returns the generated ids and the watched heads' argmax key positions `[steps, len(watch)]`
    (absolute positions). With watched heads, decode steps run with eager attention (weights
    needed); the prefill keeps the model's implementation (SDPA is ~2x faster on CPU).
    """
    import torch

    model = lm.model
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)  # [1, n]
    n = ids.shape[1]
    wl = torch.tensor([l for l, _ in watch], dtype=torch.long)
    wh = torch.tensor([h for _, h in watch], dtype=torch.long)
    steps: list[np.ndarray] = []

    def step_kwargs(t: int) -> dict[str, Any]:
        pos = n - 1 + t  # position of the query that produces token t
        return {
            "output_attentions": bool(watch),
            "cache_position": torch.tensor([pos], device=device),
            "position_ids": torch.tensor([[pos]], device=device),
        }

    def on_step(t: int, out: Any) -> None:
        if watch:  # per layer [1, head, 1, key_pos_l]; a sliding cache keeps its last key_pos_l keys
            rows = [a[0, :, -1, :].argmax(-1) + (n + t - a.shape[-1]) for a in out.attentions]
            steps.append(torch.stack(rows)[wl, wh].cpu().numpy())

    with torch.no_grad():
        _, attr = cache_io(model)
        cache = getattr(model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1), attr) if n > 1 else None
        with attention_implementation(model, "eager") if watch else contextlib.nullcontext():
            generated, _ = greedy(
                model,
                ids[:, -1:],
                cache=cache,
                max_new_tokens=max_new_tokens,
                stop=stop,
                step_kwargs=step_kwargs,
                on_step=on_step,
            )
    return generated, (np.stack(steps) if steps else np.zeros((0, len(watch)), np.int64))


# ----------------------------------------------------------------------------------- a task under conditions
@dataclass(frozen=True)
class Prompt:
    """One document as the model reads it: the task's request and the prompt's token ids."""

    doc: Doc
    request: Request
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Answer:
    """What the model answered to one prompt under one condition."""

    condition: Condition
    prompt: Prompt
    generated_ids: list[int]
    text: str  # decoded, cut where decoding stopped (`Task.stop_rule`)
    argmax: np.ndarray  # the watched heads' argmax key positions [steps, len(condition.watch)]
    prediction: str
    scores: dict[str, float]


def prompts(lm: LoadedModel, task: Task, docs: Sequence[Doc], style: str, chat: bool) -> list[Prompt]:
    """Each document's request, tokenized without special tokens (the prompt text holds them); a
    prompt that leaves no room for its answer in the model's context is an error."""
    tok = lm.tokenizer
    out = []
    for d in docs:
        req = task.request(d, style)
        ids = tok(req.prompt(tok, chat), add_special_tokens=False)["input_ids"]
        if len(ids) + req.max_new_tokens > lm.spec.max_context:
            raise ConfigError(
                f"{d.id}: prompt of {len(ids)} tokens + {req.max_new_tokens} new tokens exceeds "
                f"{lm.spec.name}'s context of {lm.spec.max_context}"
            )
        out.append(Prompt(d, req, tuple(ids)))
    return out


def answer(lm: LoadedModel, task: Task, style: str, condition: Condition, prompt: Prompt) -> Answer:
    """Greedy answer to one prompt (the condition's masks already active), extracted and scored."""
    stop = task.stop_rule(lm.tokenizer, prompt.request)
    gen, argmax = generate(lm, prompt.ids, prompt.request.max_new_tokens, stop, condition.watch)
    text = stop.cut(lm.tokenizer.decode(gen, skip_special_tokens=True))
    pred = task.extract_answer(text, prompt.doc, style)
    return Answer(condition, prompt, gen, text, argmax, pred, task.score(prompt.doc, pred))


def run_masked(
    lm: LoadedModel,
    task: Task,
    style: str,
    items: Sequence[Prompt],
    conditions: Sequence[Condition],
    run: Run,
    *,
    method: str,
    phase: str,
    means: Any = None,
    record: Callable[[Answer], dict[str, Any]],
) -> None:
    """Every (condition, prompt), conditions in `execution_order`, each with its heads masked
    (`masking.mask_heads`). A record is `{"id": "<condition>/<doc>", condition, kind, k, seed,
    **record(answer), seconds}`; finished records are reused, not generated again (`Run.item`)."""
    for cond in execution_order(conditions):
        with mask_heads(lm.model, cond.heads, method, phase=phase, means=means):  # type: ignore[arg-type]
            for p in items:

                def compute(cond: Condition = cond, p: Prompt = p) -> dict[str, Any]:
                    t0 = time.perf_counter()
                    fields = record(answer(lm, task, style, cond, p))
                    return {
                        "condition": cond.id,
                        "kind": cond.kind,
                        "k": cond.k,
                        "seed": cond.seed,
                        **fields,
                        "seconds": round(time.perf_counter() - t0, 3),
                    }

                run.item(f"{cond.id}/{p.doc.id}", compute)
