"""Capturing attention rows during an SDPA forward: the fast engine's (and attribution's) reader.

A custom attention function is registered under `retrieval_heads_argmax` (transformers'
`AttentionInterface`, with SDPA's mask builder). It receives exactly what SDPA would receive --
post-RoPE query states, the key states after the cache update (sliding layers: only the keys
inside the window) and the prepared mask -- computes the weights of the *last* query row only,

    w = softmax(q_last . K^T * scaling [tanh soft-cap] + mask, fp32).to(model dtype)

takes the argmax per query head (GQA: query head h reads KV head h // (n_heads / n_kv_heads), the
order of HF `repeat_kv`), then hands the call to SDPA for the actual output. The function is
active only inside `capture_argmax(model)`, which swaps the model's attention implementation and
always restores it. A prefill holding a sample's question also measures the question rows' query
focus (`FocusRequest`). Nothing O(n^2) is kept: per forward, one `[n_heads, key_pos]` row per layer.

Tie policy (same as the reference engine): the weights are rounded like eager attention's (softmax
in fp32, cast to the model dtype) and `argmax` returns the first maximal index, i.e. the lowest
key position.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import attention_implementation, attention_modules
from ..needles import Sample
from .base import query_focus

IMPL_NAME = "retrieval_heads_argmax"


@dataclass
class Recorder:
    """Rows recorded during one forward: layer -> (argmax `[batch, n_heads]`, key length K, the
    row's fp32 weights `[batch, n_heads, K]` for the attention scores)."""

    layer_of: dict[int, int]
    rows: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = field(default_factory=dict)
    active: bool = True
    # query focus of a prefill: what to measure, and layer -> `[n_requests, n_heads]`
    focus_requests: list[FocusRequest] = field(default_factory=list)
    focus: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FocusRequest:
    """Measure the query focus of batch row `b` in the next multi-token forward, whose first query
    sits at position `first`; positions of the question, the scored span and the document are in
    that forward's numbering (padded positions in a left-padded batch)."""

    b: int
    first: int
    question: tuple[int, int]
    span: tuple[int, int]
    document: tuple[int, int]


_RECORDER: ContextVar[Recorder | None] = ContextVar("retrieval_heads_recorder", default=None)


def last_row_argmax(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Argmax key index of `last_row_weights` rounded to the model dtype as eager attention's are,
    per batch and query head: int64 `[batch, n_heads]`; ties go to the lowest key position."""
    return weights.to(dtype).argmax(dim=-1)


def last_row_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The last query row's attention weights, fp32 `[batch, n_heads, key_len]`.

    query `[batch, n_heads, q_len, head_dim]`, key `[batch, n_kv_heads, key_len, head_dim]`,
    attention_mask `[batch|1, 1|n_heads, q_len, key_len]` (bool: True = attend; float: additive)
    or None. Rounded to the model dtype the weights are eager attention's."""
    b, h, _, d = query.shape
    kv, k_len = key.shape[1], key.shape[2]
    q = query[:, :, -1, :].reshape(b, kv, h // kv, d)  # [batch, kv_head, group, dim] = repeat_kv order
    scale = d**-0.5 if scaling is None else scaling
    logits = torch.matmul(q, key.transpose(-1, -2)) * scale  # [batch, kv_head, group, key_pos]
    mask = None if attention_mask is None else attention_mask[:, :, -1, -k_len:]  # [batch|1, 1|head, key_pos]
    return _softmax(logits.reshape(b, h, k_len), mask, softcap)


def _softmax(logits: torch.Tensor, mask: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """fp32 attention weights from scaled logits as the model computes them: [tanh soft-cap],
    the mask (bool: True = attend; float: additive), softmax in fp32."""
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def question_focus(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    req: FocusRequest,
) -> torch.Tensor:
    """`[n_heads]` query focus (`base.query_focus`) of the question's rows of batch row `req.b`,
    from the weights SDPA would compute for those rows (fp32 softmax, as `last_row_weights`)."""
    _, h, q_len, d = query.shape
    kv, k_len = key.shape[1], key.shape[2]
    r0, r1 = req.question[0] - req.first, req.question[1] - req.first
    q = query[req.b, :, r0:r1, :].reshape(kv, h // kv, r1 - r0, d)  # repeat_kv order
    scale = d**-0.5 if scaling is None else scaling
    logits = (torch.matmul(q, key[req.b, :, None].transpose(-1, -2)) * scale).reshape(h, r1 - r0, k_len)
    mask = None
    if attention_mask is not None:
        mask = attention_mask[min(req.b, attention_mask.shape[0] - 1), :, r0:r1, -k_len:]  # [1|heads, rows, K]
    weights = _softmax(logits, mask, softcap)
    last = req.first + q_len  # keys end at the forward's last query position
    key_pos = torch.arange(last - k_len, last, device=query.device)
    return query_focus(weights, key_pos, req.span, req.document)


def has_focus_spans(sample: Sample) -> bool:
    """Whether the sample locates its question and document (samples of `needles.make_sample` do)."""
    return sample.question_start > 0 and sample.question_end > sample.question_start and sample.document_start >= 0


def _delegate(module: torch.nn.Module, softcap: float | None) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if softcap is None:
        sdpa: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa
    # SDPA has no soft-capping: use the model's own eager function (e.g. Gemma-2).
    eager: Callable[..., Any] = sys.modules[type(module).__module__].eager_attention_forward
    return eager


def argmax_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """SDPA attention that also records the last query row's argmax of recorded modules. The
    arguments are an attention function's (`attention_mask`, then `dropout`, `scaling`, ... by
    keyword), all handed on unchanged to the function that computes the output."""
    attention_mask: torch.Tensor | None = args[0] if args else kwargs.get("attention_mask")
    scaling, softcap = kwargs.get("scaling"), kwargs.get("softcap")
    rec = _RECORDER.get()
    if rec is not None and rec.active and id(module) in rec.layer_of:
        w = last_row_weights(query, key, attention_mask, scaling, softcap)
        layer = rec.layer_of[id(module)]
        rec.rows[layer] = (last_row_argmax(w, query.dtype), key.shape[2], w)
        if rec.focus_requests and query.shape[2] > 1:  # a prefill holding the question's rows
            rec.focus[layer] = torch.stack(
                [question_focus(query, key, attention_mask, scaling, softcap, r) for r in rec.focus_requests]
            )
    out: tuple[torch.Tensor, Any] = _delegate(module, softcap)(module, query, key, value, *args, **kwargs)
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if IMPL_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:  # the mapping holds every registered name
        AttentionInterface.register(IMPL_NAME, argmax_attention)
        AttentionMaskInterface.register(IMPL_NAME, sdpa_mask)


@contextmanager
def capture_argmax(model: torch.nn.Module) -> Iterator[Recorder]:
    """Within the block, every forward records each layer's last-row argmax into the recorder."""
    _register()
    mods = attention_modules(model)
    rec = Recorder(layer_of={id(m): i for i, m in enumerate(mods)})
    with attention_implementation(model, IMPL_NAME), _recording(rec):
        yield rec


@contextmanager
def _recording(rec: Recorder) -> Iterator[None]:
    token = _RECORDER.set(rec)
    try:
        yield
    finally:
        _RECORDER.reset(token)
