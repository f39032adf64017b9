"""The tracing engine: per answer token, every head's attention row of the query that produced it,
reduced to what attribution scores (argmax key, mass per prompt region and per context sentence).

    heads = watched_heads(DetectionResult.load("ref:smollm2-135m"), k=10)
    tr = trace(lm, prompt, heads)                    # greedy answer, traced
    tr = trace(lm, prompt, heads, answer_ids=ids)    # a given answer, teacher-forced

The rows are those detection reads: the last prompt position for the first token, then each
decode step. Two paths read the same rows: ``reference`` (eager attention with attention outputs,
the oracle, as `engines.reference`) and ``fast`` (SDPA, the rows recomputed by `engines.fast`'s
capture function); tests assert they agree. With `answer_ids` the model is fed the given tokens
instead of its own choices (teacher forcing), so an answer produced elsewhere (a RAG pipeline's)
is traced as if the model had written it.

Passage ranking (`question_attention`): the attention mass that the question's tokens pay to each
passage, per head, from one pass over the question's rows (`decoding.attention_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..decoding import StopRule, attention_rows, greedy, greedy_with_attentions
from ..errors import ConfigError, DataError
from ..heads import Head, top_heads
from ..masking import mask_heads
from ..models import LoadedModel, attention_implementation
from ..results import DetectionResult
from .context import REGIONS, TracePrompt

ENGINES = ("fast", "reference")
DEFAULT_K = 10


def watched_heads(scores: DetectionResult, k: int = DEFAULT_K, exclude: Sequence[Head] = ()) -> list[Head]:
    """The top-k heads of a detection result by its ranking (score, then its tie-break), leaving
    out `exclude` (masked heads, whose attention is meaningless)."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if np.isnan(scores.scores).all():
        raise ConfigError(f"{scores.name}: the score map scores no head")
    skip = set(exclude)
    ranked = [h for h in top_heads(scores.scores, scores.shape[0] * scores.shape[1], scores.tiebreak) if h not in skip]
    return ranked[:k]


@dataclass
class Trace:
    """Raw per-step readings of one answer (steps = answer tokens).

    argmax: int `[steps, L, H]` absolute key positions; region_mass: float `[steps, L, H, 4]` mass
    on the prompt regions (`REGIONS`); sentence_mass: float `[steps, n_sentences]` mean mass of the
    watched heads; logprob: `[steps]` the model's log-probability of each answer token (greedy:
    the maximum), entropy: `[steps]` of its next-token distribution (nats)."""

    generated_ids: list[int]
    argmax: np.ndarray
    region_mass: np.ndarray
    sentence_mass: np.ndarray
    logprob: np.ndarray
    entropy: np.ndarray
    watched: list[Head]


class _Reader:
    """Reduces each step's attention rows (per layer: fp32 weights `[H, K]` over the keys
    `[offset, offset + K)`) to a Trace's readings as they arrive (nothing O(n^2) is kept)."""

    def __init__(
        self, prompt: TracePrompt, watched: Sequence[Head], device: Any, forced: Sequence[int] | None = None
    ) -> None:
        import torch

        n = prompt.n
        self.n = n
        self.watched = list(watched)
        self.forced = forced
        self.region = torch.nn.functional.one_hot(torch.as_tensor(prompt.regions()), len(REGIONS)).float().to(device)
        sent = torch.as_tensor(prompt.sentence_of())
        n_sent = max(len(prompt.sentences), 1)
        onehot = torch.zeros(n, n_sent)
        inside = sent >= 0
        onehot[torch.nonzero(inside)[:, 0], sent[inside]] = 1.0
        self.sent = onehot.to(device)
        self.n_sent = len(prompt.sentences)
        self.steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = []

    def read(self, rows: Sequence[tuple[Any, int]], logits: Any) -> None:
        import torch

        argmax, mass = [], []
        sent = torch.zeros(self.sent.shape[1], device=self.sent.device)
        for layer, (w, off) in enumerate(rows):
            argmax.append(w.argmax(-1) + off)
            p = max(self.n - off, 0)  # keys of the row that are prompt positions
            mass.append(w[:, :p] @ self.region[off : off + p])
            for l, h in self.watched:
                if l == layer:
                    sent += w[h, :p] @ self.sent[off : off + p]
        logp = torch.log_softmax(logits.float(), -1)
        chosen = logp.max() if self.forced is None else logp[self.forced[len(self.steps)]]
        self.steps.append(
            (
                torch.stack(argmax).cpu().numpy().astype(np.int64),
                torch.stack(mass).cpu().numpy(),
                (sent / max(len(self.watched), 1)).cpu().numpy()[: self.n_sent],
                float(chosen),
                float(-(logp.exp() * logp).sum()),
            )
        )

    def trace(self, generated: list[int]) -> Trace:
        a, m, s, lp, ent = zip(*self.steps, strict=True) if self.steps else ((), (), (), (), ())
        return Trace(generated, np.stack(a), np.stack(m), np.stack(s), np.array(lp), np.array(ent), self.watched)


def _check(lm: LoadedModel, prompt: TracePrompt, watched: Sequence[Head], engine: str, new_tokens: int) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {new_tokens}")
    if prompt.n + new_tokens > lm.spec.max_context:
        raise ConfigError(
            f"prompt of {prompt.n} tokens + {new_tokens} answer tokens exceeds {lm.spec.name}'s "
            f"context of {lm.spec.max_context}"
        )
    L, H = lm.spec.shape
    for l, h in watched:
        if not (0 <= l < L and 0 <= h < H):
            raise ConfigError(f"head L{l}-H{h} is outside {lm.spec.name}'s {L} x {H} heads")


def trace(
    lm: LoadedModel,
    prompt: TracePrompt,
    watched: Sequence[Head],
    *,
    max_new_tokens: int = 48,
    stop: Callable[[list[int]], bool] | None = None,
    engine: str = "fast",
    masked: Sequence[Head] = (),
    answer_ids: Sequence[int] | None = None,
) -> Trace:
    """Read every head's attention row for each answer token (`engine`: fast or reference, the
    same readings): the model's greedy answer, or with `answer_ids` that answer teacher-forced
    (every token traced, no stop rule). `masked` heads are masked (uniform, prefill and decode)."""
    import torch

    if answer_ids is not None:
        if not answer_ids:
            raise ConfigError("the answer is empty")
        max_new_tokens, stop = len(answer_ids), (lambda generated: False)
    _check(lm, prompt, watched, engine, max_new_tokens)
    L = lm.spec.n_layers
    model = lm.model
    device = next(model.parameters()).device
    stop = stop or StopRule(lm.tokenizer)
    reader = _Reader(prompt, watched, device, answer_ids)
    ids = torch.tensor([prompt.ids], device=device)
    n = prompt.n
    with torch.no_grad(), mask_heads(model, list(masked)):
        if engine == "fast":
            from ..engines.capture import capture_argmax

            with capture_argmax(model) as rec:

                def fast_step(t: int, out: Any) -> None:
                    total = n + t  # keys up to the query that produces token t
                    rows = [(rec.rows[i][2][0], total - rec.rows[i][1]) for i in range(L)]
                    rec.rows.clear()
                    reader.read(rows, out.logits[0, -1])

                generated, _ = greedy(
                    model,
                    ids,
                    cache=None,
                    max_new_tokens=max_new_tokens,
                    stop=stop,
                    on_step=fast_step,
                    forced=answer_ids,
                )
        else:

            def eager_step(t: int, out: Any) -> None:
                total = n + t
                reader.read([(a[0, :, -1, :].float(), total - a.shape[-1]) for a in out.attentions], out.logits[0, -1])

            with attention_implementation(model, "eager"):
                generated = greedy_with_attentions(
                    model, ids, max_new_tokens=max_new_tokens, stop=stop, on_step=eager_step, forced=answer_ids
                )
    return reader.trace(generated)


def question_attention(lm: LoadedModel, prompt: TracePrompt) -> np.ndarray:
    """float `[L, H, n_passages]`: per head, the attention mass that the question's tokens pay to
    each passage, summed over the question's tokens. The prompt up to the question is prefilled
    with the model's own attention, then the question's rows are read with eager attention."""
    import torch

    q0, q1 = prompt.question
    if q0 < 1 or q1 <= q0:
        raise DataError("the prompt has no question after its context")
    device = next(lm.model.parameters()).device
    onehot = torch.zeros(q1, len(prompt.passages), device=device)
    for i, (s, e) in enumerate(prompt.passages):
        onehot[s:e, i] = 1.0
    with torch.no_grad():
        rows = attention_rows(lm.model, torch.tensor([prompt.ids], device=device), q0, q1)
    # rows.layers[l]: [1, H, question rows, K_l], the last K_l keys up to q1
    layers = [(a[0].float() @ onehot[rows.first_key(l) : q1]).sum(1) for l, a in enumerate(rows.layers)]
    return torch.stack(layers).cpu().numpy()
