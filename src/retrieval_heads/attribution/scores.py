"""Token and answer scores from a Trace.

Per answer token t and watched head (the top-K heads of a detection run, a score file or a shipped
map), the argmax key of the row that produced t decides where the head copies t from:

- the **context**: the key lies in a document and holds the same token id as t (the paper's
  copy-paste criterion); ``copy`` = share of watched heads doing so (**the support score**);
- the **question**: the key lies in the question and holds the same word as t (case and
  leading space aside: "What is the password" restated as "The password"); ``question_copy``
  = share of watched heads doing so.

``context_mass`` = mean mass of the watched heads on the context; the **source sentence** = the
context sentence with the largest mean mass of the watched heads. The same two scores over *all*
heads (``all_copy``, ``all_context_mass``) and the model's own log-probability and entropy of t
are kept as the baselines of the grounding evaluation.

A content token (one with a letter or digit) is in one of three states: copied from the context
(a watched head copies it), *from the question* (no watched head copies it from the context, and
it restates the question: a watched head copies its word from the question, or the word is one of
the question's and comes before the answer's first token copied from the context, as in "The
password to the old lighthouse is ..."), or *unsupported* (neither). The answer's scores are means
over its content tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .context import CONTEXT, SINK, TracePrompt
from .tracing import Trace

SCORE_FIELDS = ("copy", "context_mass", "all_copy", "all_context_mass", "logprob", "entropy", "sink_mass")
STATES = ("context", "question", "unsupported", "other")  # other: a token without letter or digit


def is_content(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def word(text: str) -> str:
    """A token's text compared between answer and question: no surrounding space, lowercase."""
    return text.strip().lower()


@dataclass(frozen=True)
class TokenAttribution:
    """One answer token: its scores (see the module docstring) and where the watched heads look."""

    index: int
    token_id: int
    text: str
    content: bool
    copy: float
    context_mass: float
    sink_mass: float
    all_copy: float
    all_context_mass: float
    logprob: float
    entropy: float
    sentence: int | None  # index into the prompt's sentences, None when no sentence gets attention
    sentence_share: float  # that sentence's share of the watched heads' mass on the context
    argmax: tuple[int, ...]  # the watched heads' argmax positions
    copying_heads: tuple[str, ...]
    question_copy: float = 0.0  # share of watched heads copying the token's word from the question
    restated: bool = False  # the token restates the question (see the module docstring)

    @property
    def state(self) -> str:
        """context, question, unsupported (a content token no watched head copies) or other."""
        if self.copy > 0:
            return "context"
        if self.content and self.restated:
            return "question"
        return "unsupported" if self.content else "other"

    @property
    def supported(self) -> bool:
        """Not flagged: copied from the context or the question, or not a content token."""
        return self.state != "unsupported"


def token_scores(prompt: TracePrompt, tr: Trace, tokenizer: Any) -> list[TokenAttribution]:
    """Per answer token, the scores of the module docstring from a Trace."""
    region = prompt.regions()
    ids = np.asarray(prompt.ids)
    q_words = {p: word(tokenizer.decode([ids[p]])) for p in range(*prompt.question)}
    out: list[TokenAttribution] = []
    copied_before = False  # a token of the answer so far was copied from the context
    wl = [l for l, _ in tr.watched]
    wh = [h for _, h in tr.watched]
    for t, tok in enumerate(tr.generated_ids):
        a = tr.argmax[t]  # [L, H]
        inside = a < prompt.n
        safe = np.where(inside, a, 0)
        copies = inside & (region[safe] == CONTEXT) & (ids[safe] == tok)
        text = tokenizer.decode([tok], skip_special_tokens=True)
        w = word(text)
        from_question = [bool(w) and q_words.get(int(a[l, h])) == w for l, h in tr.watched]
        mass = tr.region_mass[t]  # [L, H, 4]
        sm = tr.sentence_mass[t]
        ctx = float(mass[wl, wh, CONTEXT].mean()) if tr.watched else float("nan")
        best = int(sm.argmax()) if sm.size and sm.max() > 0 else None
        out.append(
            TokenAttribution(
                index=t,
                token_id=int(tok),
                text=text,
                content=is_content(text),
                copy=float(copies[wl, wh].mean()) if tr.watched else float("nan"),
                context_mass=ctx,
                sink_mass=float(mass[wl, wh, SINK].mean()) if tr.watched else float("nan"),
                all_copy=float(copies.mean()),
                all_context_mass=float(mass[..., CONTEXT].mean()),
                logprob=float(tr.logprob[t]),
                entropy=float(tr.entropy[t]),
                sentence=best,
                sentence_share=float(sm[best] / ctx) if best is not None and ctx > 0 else 0.0,
                argmax=tuple(int(x) for x in a[wl, wh]),
                copying_heads=tuple(f"L{l}-H{h}" for l, h in tr.watched if copies[l, h]),
                question_copy=float(np.mean(from_question)) if tr.watched else float("nan"),
                restated=any(from_question) or (bool(w) and w in q_words.values() and not copied_before),
            )
        )
        copied_before = copied_before or out[-1].copy > 0
    return out


def answer_scores(tokens: Sequence[TokenAttribution]) -> dict[str, float]:
    """Means over the answer's content tokens (all tokens when none is a content token; NaN for
    no token) of each token score, plus the shares of unsupported content tokens and of those
    copied from the question."""
    chosen = [t for t in tokens if t.content] or list(tokens)
    if not chosen:
        nan = float("nan")
        return {**dict.fromkeys(SCORE_FIELDS, nan), "unsupported": nan, "from_question": nan, "n_tokens": 0}
    out = {f: float(np.mean([getattr(t, f) for t in chosen])) for f in SCORE_FIELDS}
    out["unsupported"] = float(np.mean([t.state == "unsupported" for t in chosen]))
    out["from_question"] = float(np.mean([t.state == "question" for t in chosen]))
    out["n_tokens"] = len(chosen)
    return out
