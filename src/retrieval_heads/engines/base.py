"""The engine interface shared by every detection engine."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..decoding import StopFn
from ..needles import Sample


@dataclass
class EngineOutput:
    """Greedy generation of one sample and, per generated token, each head's attention argmax.

    argmax: int64 `[n_steps, n_layers, n_heads]`, absolute prompt/cache position of the key with
    the largest attention weight in the row of the query position that produced token t.
    Ties go to the lowest position (torch.argmax returns the first maximal index).
    """

    generated_ids: list[int]
    argmax: np.ndarray
    # attention scores of the same rows: name -> float `[n_steps, n_layers, n_heads]` (ROW_SCORES)
    row_scores: dict[str, np.ndarray] | None = None
    # scores of the prompt's question rows during prefill: name -> float `[n_layers, n_heads]`
    prompt_scores: dict[str, np.ndarray] | None = None


# Attention-based scores read from the same query rows as the argmax (see `row_scores`).
ROW_SCORES = ("topk_mass", "needle_mass", "distant_mass")
SINK_TOKENS = 4  # the attention sink: the first prompt positions
LOCAL_WINDOW = 64  # "local" keys for distant_mass: the last LOCAL_WINDOW positions up to the query


def row_scores(
    weights: torch.Tensor,
    key_pos: torch.Tensor,
    query_pos: torch.Tensor,
    spans: torch.Tensor,
    *,
    window: int = LOCAL_WINDOW,
    sink: int = SINK_TOKENS,
) -> torch.Tensor:
    """Per row and head, three attention scores of one query row each, stacked `[3, batch, heads]`:

    - topk_mass (HeadKV-R2): the weights of the row's top-k keys (k = span length) that lie
      inside the span, summed (no token match);
    - needle_mass: the attention mass on the span;
    - distant_mass (DuoAttention-like): the mass on keys beyond the last `window` positions up to
      the query, the first `sink` positions excluded.

    weights: float `[batch, heads, K]` (softmax probabilities); key_pos: long `[batch, K]` absolute
    position of each key (negative: padding); query_pos: long `[batch]`; spans: long `[batch, 2]`
    `[start, end)` of the scored span (the answer's tokens by default).
    """
    w = weights.float()
    b, h, k_len = w.shape
    start, end = spans[:, :1], spans[:, 1:]
    in_span = (key_pos >= start) & (key_pos < end)  # [b, K]
    needle = (w * in_span[:, None, :]).sum(-1)
    lens = (spans[:, 1] - spans[:, 0]).clamp(min=0)
    kmax = int(min(int(lens.max()), k_len)) if b else 0
    if kmax > 0:
        vals, idx = w.topk(kmax, dim=-1)  # [b, h, kmax], largest first
        hit = in_span[:, None, :].expand(b, h, k_len).gather(-1, idx)
        rank_ok = torch.arange(kmax, device=w.device)[None, None, :] < lens[:, None, None]
        topk = (vals * (hit & rank_ok)).sum(-1)
    else:
        topk = torch.zeros_like(needle)
    distant_keys = (key_pos >= sink) & (key_pos <= query_pos[:, None] - window)
    distant = (w * distant_keys[:, None, :]).sum(-1)
    return torch.stack([topk, needle, distant])


class Engine(Protocol):
    name: str
    span: str  # the span the row scores measure: "answer" or "needle"

    def run(self, sample: Sample, *, max_new_tokens: int, stop: StopFn) -> EngineOutput: ...

    def run_many(
        self, samples: Iterable[Sample], *, max_new_tokens: int, stop: StopFn
    ) -> Iterator[tuple[Sample, EngineOutput]]: ...


def query_focus(
    weights: torch.Tensor, key_pos: torch.Tensor, span: tuple[int, int], doc: tuple[int, int]
) -> torch.Tensor:
    """QRHead-like query focus of the question's rows, per head `[heads]`: for each question token,
    the share of its attention on the document that lands on the span (the answer's tokens by
    default), averaged over the question's tokens; a row with no attention on the document adds 0.

    weights: float `[heads, n_question_rows, K]`; key_pos: long `[K]` absolute key positions;
    span, doc: `[start, end)` token spans.
    """
    w = weights.float()
    in_span = ((key_pos >= span[0]) & (key_pos < span[1])).to(w.dtype)
    in_doc = ((key_pos >= doc[0]) & (key_pos < doc[1])).to(w.dtype)
    on_span = w @ in_span  # [heads, rows]
    on_doc = w @ in_doc
    share = torch.where(on_doc > 0, on_span / on_doc.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(on_doc))
    return share.mean(-1)
