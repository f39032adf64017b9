"""Mask attention heads of a Hugging Face model, as a context manager that always cleans up.

    with mask_heads(lm.model, [(17, 3), (18, 6)], method="uniform", phase="decode"):
        out = lm.model(input_ids=ids)

Methods (a head is `(layer, query_head)`, 0-based):

- ``uniform`` (the authors'): the head's query is set to zero, so its softmax is uniform over the
  keys it may see (causal mask, sliding window, padding all respected by the model's own mask) and
  it outputs the mean of those value vectors. The hook zeroes the head's rows of the query
  projection's output; zero stays zero through RoPE, Gemma3's q-norm, scaling and soft-capping,
  so this is exact for SDPA and eager attention alike.
- ``zero``: the head's output is zeroed before the output projection.
- ``mean``: the head's output is replaced by its mean output over a reference text
  (`head_means`), i.e. mean ablation.

Only the masked query head is touched: under GQA the other query heads of its KV group read the
same, unmodified keys and values. Phase ``all`` masks every forward call; ``decode`` masks only
calls whose query length is 1 (the authors' setting: the prompt is prefilled unmasked, every
token-producing step is masked; feed the last prompt token as the first decode step).

Hooks: a forward hook on the query projection (``uniform``) or a forward pre-hook on the output
projection (``zero``, ``mean``) of each attention module with masked heads. Supported module trees:
``q_proj``/``o_proj`` (Llama, Qwen2, Mistral, Gemma3 and most decoders) and GPT-2's fused
``c_attn``/``c_proj``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from .errors import ConfigError, check_choice
from .heads import Head
from .models import attention_modules, spec_from_config

Method = Literal["uniform", "zero", "mean"]
Phase = Literal["all", "decode"]
METHODS: tuple[str, ...] = get_args(Method)
PHASES: tuple[str, ...] = get_args(Phase)


@dataclass(frozen=True)
class AttentionParts:
    """The per-head projections of one layer's attention module.

    q_proj: module whose output holds the queries; queries are its output columns
    `[q_offset, q_offset + n_heads * head_dim)` in head-major order. o_proj: module whose input is
    the concatenated per-head outputs `[batch, seq, n_heads * head_dim]`.
    """

    attn: nn.Module
    q_proj: nn.Module
    o_proj: nn.Module
    q_offset: int
    n_heads: int
    head_dim: int


def attention_parts(model: nn.Module) -> list[AttentionParts]:
    """Per layer, the modules to hook. Raises ConfigError for an unsupported attention layout."""
    n_heads = spec_from_config(model.config, type(model).__name__).n_heads
    out = []
    for l, attn in enumerate(attention_modules(model)):
        if hasattr(attn, "q_proj") and hasattr(attn, "o_proj"):
            q, o, offset = attn.q_proj, attn.o_proj, 0
        elif hasattr(attn, "c_attn") and hasattr(attn, "c_proj"):  # GPT-2: fused [q | k | v]
            q, o, offset = attn.c_attn, attn.c_proj, 0
        else:
            raise ConfigError(
                f"layer {l}: attention {type(attn).__name__} has no q_proj/o_proj (or c_attn/c_proj); "
                "head masking does not support this architecture"
            )
        in_features = _in_features(o)
        if in_features % n_heads:
            raise ConfigError(f"layer {l}: output projection width {in_features} is not a multiple of {n_heads} heads")
        out.append(AttentionParts(attn, q, o, offset, n_heads, in_features // n_heads))
    return out


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)  # transformers Conv1D: weight [in, out]
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    raise ConfigError(f"cannot read the input width of {type(module).__name__}")


def validate_heads(heads: Iterable[Head], n_layers: int, n_heads: int) -> list[Head]:
    """Sorted unique heads, each checked against the model's shape."""
    out = set()
    for item in heads:
        try:
            l, h = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ConfigError(f"a head is a (layer, head) pair, got {item!r}") from None
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise ConfigError(f"head ({l}, {h}) is outside the model's {n_layers} layers x {n_heads} heads")
        out.add((l, h))
    return sorted(out)


def _active(phase: str, seq_len: int) -> bool:
    return phase == "all" or seq_len == 1


def _edit_heads(
    x: torch.Tensor, offset: int, n_heads: int, head_dim: int, heads: list[int], value: torch.Tensor | None
) -> torch.Tensor:
    """Copy of x `[batch, seq, width]` with columns of `heads` set to 0 (value None) or `value[h]`."""
    x = x.clone()
    block = x[..., offset : offset + n_heads * head_dim].unflatten(-1, (n_heads, head_dim))  # [B, S, H, D] view
    for h in heads:
        block[..., h, :] = 0 if value is None else value[h].to(x.dtype)
    return x


@torch.no_grad()
def head_means(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Each head's mean output over the positions of `input_ids` `[1, seq]`.

    Returns float32 `[n_layers, n_heads, head_dim]`, the input of each output projection averaged
    over positions (for `method="mean"`).
    """
    parts = attention_parts(model)
    means: list[torch.Tensor | None] = [None] * len(parts)
    handles = []

    def capture(l: int, p: AttentionParts):
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]  # [B, S, H*D]
            means[l] = x.float().mean(dim=(0, 1)).unflatten(-1, (p.n_heads, p.head_dim)).cpu()

        return hook

    try:
        for l, p in enumerate(parts):
            handles.append(p.o_proj.register_forward_pre_hook(capture(l, p)))
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert all(m is not None for m in means)
    return torch.stack(means)  # type: ignore[arg-type]


@contextlib.contextmanager
def mask_heads(
    model: nn.Module,
    heads: Iterable[Head],
    method: Method = "uniform",
    *,
    phase: Phase = "all",
    means: torch.Tensor | None = None,
) -> Iterator[list[Head]]:
    """Mask `heads` inside the block; yields the sorted list of masked heads.

    `means` `[n_layers, n_heads, head_dim]` is required by `method="mean"` (see `head_means`).
    Masking nothing (`heads=[]`) registers no hook and changes nothing.
    """
    check_choice("masking method", method, METHODS)
    check_choice("mask phase", phase, PHASES)
    parts = attention_parts(model)
    n_heads = parts[0].n_heads
    chosen = validate_heads(heads, len(parts), n_heads)
    if method == "mean":
        if means is None:
            raise ConfigError("method 'mean' needs per-head mean outputs (head_means(model, input_ids))")
        if tuple(means.shape[:2]) != (len(parts), n_heads):
            raise ConfigError(f"means have shape {tuple(means.shape)}, expected [{len(parts)}, {n_heads}, head_dim]")
    by_layer: dict[int, list[int]] = {}
    for l, h in chosen:
        by_layer.setdefault(l, []).append(h)

    handles: list[Any] = []
    try:
        for l, hs in by_layer.items():
            p = parts[l]
            if method == "uniform":

                def q_hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor, p=p, hs=hs) -> torch.Tensor | None:
                    if not _active(phase, out.shape[1]):
                        return None
                    return _edit_heads(out, p.q_offset, p.n_heads, p.head_dim, hs, None)

                handles.append(p.q_proj.register_forward_hook(q_hook))
            else:
                value = None if method == "zero" else means[l].to(next(model.parameters()).device)  # type: ignore[index]

                def o_hook(_m: nn.Module, args: tuple[Any, ...], p=p, hs=hs, value=value) -> tuple[Any, ...] | None:
                    x = args[0]  # [B, S, H*D]
                    if not _active(phase, x.shape[1]):
                        return None
                    return (_edit_heads(x, 0, p.n_heads, p.head_dim, hs, value), *args[1:])

                handles.append(p.o_proj.register_forward_pre_hook(o_hook))
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


class RowMasks:
    """The live handle of `mask_rows`: which of the block's rows are still in the batch."""

    def __init__(self, n_rows: int, device: torch.device) -> None:
        self.rows = torch.arange(n_rows, device=device)

    def select(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices` (positions in the current batch), as the KV cache does
        (`Cache.batch_select_indices`) when finished rows leave the batch."""
        self.rows = self.rows[indices.to(self.rows.device)]


@contextlib.contextmanager
def mask_rows(
    model: nn.Module,
    rows: Sequence[Iterable[Head]],
    method: Method = "uniform",
    *,
    phase: Phase = "all",
    means: torch.Tensor | None = None,
) -> Iterator[RowMasks]:
    """`mask_heads` with its own heads per batch row: row b of every forward masks `rows[b]`.

    Each row is edited exactly as `mask_heads` edits a batch of one (`torch.where` writes the same
    zeros or mean outputs), so a batch of conditions decodes what each condition decodes alone.
    Yields a `RowMasks`; call its `select` when rows leave the batch.
    """
    check_choice("masking method", method, METHODS)
    check_choice("mask phase", phase, PHASES)
    parts = attention_parts(model)
    n_heads = parts[0].n_heads
    chosen = [validate_heads(r, len(parts), n_heads) for r in rows]
    if method == "mean" and (means is None or tuple(means.shape[:2]) != (len(parts), n_heads)):
        raise ConfigError(f"method 'mean' needs per-head mean outputs [{len(parts)}, {n_heads}, head_dim] (head_means)")
    device = next(model.parameters()).device
    live = RowMasks(len(chosen), device)
    layers = sorted({l for r in chosen for l, _ in r})
    handles: list[Any] = []

    def edit(x: torch.Tensor, offset: int, p: AttentionParts, on: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        width = p.n_heads * p.head_dim
        block = x[..., offset : offset + width].unflatten(-1, (p.n_heads, p.head_dim))  # [B, S, H, D]
        x = x.clone()
        rows = on[live.rows][:, None, :, None]  # [B, 1, H, 1]: the heads each row masks
        x[..., offset : offset + width] = torch.where(rows, value.to(x.dtype), block).flatten(-2)
        return x

    try:
        for l in layers:
            p = parts[l]
            on = torch.zeros(len(chosen), n_heads, dtype=torch.bool, device=device)  # [row, head]: masked
            for b, r in enumerate(chosen):
                on[b, [h for layer, h in r if layer == l]] = True
            if method == "uniform":

                def q_hook(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor, p=p, on=on) -> torch.Tensor | None:
                    zero = out.new_zeros(())
                    return edit(out, p.q_offset, p, on, zero) if _active(phase, out.shape[1]) else None

                handles.append(p.q_proj.register_forward_hook(q_hook))
            else:
                value = torch.zeros(()) if method == "zero" else means[l]  # type: ignore[index]
                value = value.to(device)[None, None] if value.dim() else value.to(device)  # [1, 1, H, D] or scalar

                def o_hook(_m: nn.Module, args: tuple[Any, ...], p=p, on=on, value=value) -> tuple[Any, ...] | None:
                    x = args[0]  # [B, S, H*D]
                    return (edit(x, 0, p, on, value), *args[1:]) if _active(phase, x.shape[1]) else None

                handles.append(p.o_proj.register_forward_pre_hook(o_hook))
        yield live
    finally:
        for handle in handles:
            handle.remove()
