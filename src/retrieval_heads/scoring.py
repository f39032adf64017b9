"""Copy-paste decisions and retrieval scores (paper Eq. 1). Plain arrays, no model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np


def copy_events(
    argmax: np.ndarray,
    generated_ids: Sequence[int],
    prompt_ids: Sequence[int],
    needle_start: int,
    needle_end: int,
) -> np.ndarray:
    """Boolean `[n_steps, n_layers, n_heads]`: head copy-pastes generated token t.

    Head h copies token w (generated at step t) when its argmax position j lies inside the needle
    span [needle_start, needle_end) and the prompt token at j equals w. That w is a needle token
    follows from the second condition.
    """
    argmax = np.asarray(argmax, dtype=np.int64)  # [step, layer, head]
    if argmax.shape[0] == 0:
        return np.zeros(argmax.shape, dtype=bool)
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    gen = np.asarray(generated_ids[: argmax.shape[0]], dtype=np.int64)  # [step]
    inside = (argmax >= needle_start) & (argmax < needle_end)
    safe = np.clip(argmax, 0, len(prompt) - 1)
    same = prompt[safe] == gen[:, None, None]
    events: np.ndarray = inside & same
    return events


def copy_counts(events: np.ndarray) -> np.ndarray:
    """int64 `[n_layers, n_heads]`: copy events per head over the generated tokens."""
    counts: np.ndarray = events.sum(axis=0).astype(np.int64)
    return counts


def sample_scores(counts: np.ndarray, needle_len: int) -> np.ndarray:
    """Per-sample retrieval score: copy events / needle tokens (can exceed 1, per the paper)."""
    return counts.astype(np.float64) / float(needle_len)


def attention_scores(row_scores: dict[str, np.ndarray], span_len: int) -> dict[str, np.ndarray]:
    """Per-sample attention scores `[n_layers, n_heads]` from the per-step row scores
    (`engines.base.row_scores`, each `[n_steps, n_layers, n_heads]`):

    - topk_mass: summed over the generated tokens, divided by the span length (HeadKV-R2's
      normalisation, the same as the copy score's);
    - needle_mass, distant_mass: the mean over the generated tokens.
    """
    out: dict[str, np.ndarray] = {}
    for name, per_step in row_scores.items():
        a = np.asarray(per_step, dtype=np.float64)
        if name == "topk_mass":
            out[name] = a.sum(axis=0) / float(max(span_len, 1))
        else:
            out[name] = a.mean(axis=0) if a.shape[0] else np.zeros(a.shape[1:])
    return out


@lru_cache(maxsize=2)
def _rouge(stem: bool) -> Any:  # rouge_score has no types
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=stem)


def answer_recall(answer: str, generated: str, *, stem: bool = True) -> float:
    """ROUGE-1 recall of the needle's answer against the generated text (rouge-score), with
    Porter stemming as the authors (`use_stemmer=True`)."""
    return float(_rouge(stem).score(answer, generated)["rouge1"].recall)


def aggregate(per_sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval score and activation frequency from kept samples' scores `[n_kept, L, H]`.

    Returns (mean score, share of kept samples with a copy event), each `[L, H]`; NaN when no
    sample was kept (never -1).
    """
    if per_sample.shape[0] == 0:
        nan = np.full(per_sample.shape[1:], np.nan)
        return nan, nan.copy()
    return per_sample.mean(axis=0), (per_sample > 0).mean(axis=0)
