"""Copy-paste decisions and retrieval scores (paper Eq. 1), and the check of the per-sample
records they are kept in (`check_records`). Plain arrays, no model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import DataError
from .scorefile import MAX_HEADS, MAX_LAYERS


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


# ----------------------------------------------------------------------------------- records
def _matrix(value: Any, where: str, what: str) -> np.ndarray:
    """A `[layers][heads]` list of finite numbers as an array, else one DataError line."""
    if not isinstance(value, list) or not value or len(value) > MAX_LAYERS:
        raise DataError(f"{where}: {what} must be a non-empty [layer][head] list (at most {MAX_LAYERS} layers)")
    try:
        a = np.asarray(value, dtype=float)
    except (ValueError, TypeError, OverflowError):
        raise DataError(f"{where}: {what} must be a [layer][head] list of numbers of one shape") from None
    if a.ndim != 2 or not 0 < a.shape[1] <= MAX_HEADS:
        raise DataError(f"{where}: {what} must be a [layer][head] list of numbers (at most {MAX_HEADS} heads)")
    if not np.isfinite(a).all():
        raise DataError(f"{where}: {what} holds a non-finite number")
    return a


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_records(records: Sequence[Any], source: str = "records", lines: Sequence[int] | None = None) -> None:
    """Detection records as `from_records` needs them, else one DataError naming `source:line`:
    objects with unique ids; `copy_counts` non-negative counts of one `[layers][heads]` shape;
    `kept` a boolean; `needle_tokens` (and `span_tokens`) positive integers; the other scores,
    when present, of the same shape and names in every kept record."""
    shape: tuple[int, ...] | None = None
    names: list[str] | None = None
    seen: dict[str, str] = {}
    for i, r in enumerate(records):
        where = f"{source}:{lines[i] if lines is not None else i + 1}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: a record must be a JSON object")
        rid = r.get("id")
        if rid is not None:
            if not isinstance(rid, str) or rid in seen:
                raise DataError(f"{where}: duplicate or non-string record id {str(rid)[:80]!r}")
            seen[rid] = where
        if "copy_counts" not in r:
            raise DataError(f"{where}: record has no copy_counts (not a detection record?)")
        counts = _matrix(r["copy_counts"], where, "copy_counts")
        if (counts < 0).any():
            raise DataError(f"{where}: copy_counts holds a negative count")
        if shape is None:
            shape = counts.shape
        elif counts.shape != shape:
            raise DataError(f"{where}: copy_counts has shape {counts.shape}, the first record {shape}")
        kept = r.get("kept", False)
        if not isinstance(kept, bool):
            raise DataError(f"{where}: kept must be true or false")
        for key in ("needle_tokens", "span_tokens"):
            if (kept and key == "needle_tokens") or key in r:
                if not _positive_int(r.get(key)):
                    raise DataError(f"{where}: {key} must be a positive integer, got {str(r.get(key))[:40]}")
        if kept:
            extra = r.get("attention_scores") or {}
            if not isinstance(extra, dict):
                raise DataError(f"{where}: attention_scores must be an object of [layer][head] maps")
            if names is None:
                names = sorted(extra)
            elif sorted(extra) != names:
                raise DataError(f"{where}: attention_scores names {sorted(extra)} differ from the first kept record's")
            for n, m in extra.items():
                if _matrix(m, where, f"attention_scores[{n!r}]").shape != shape:
                    raise DataError(f"{where}: attention_scores[{n!r}] does not have the shape {shape}")
