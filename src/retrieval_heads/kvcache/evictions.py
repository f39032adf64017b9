"""What the cut KV heads of a head-sparse cache keep (`cache.HeadSparseLayer` asks after each
attention step): StreamingLLM's sink + recent window, SnapKV's most attended tokens, and HeadKV's
per-head token counts with SnapKV's choice inside each head.

An eviction returns, per cut head, the sorted indices of the stored tokens it keeps: one tensor
`[n_part, k]` when every cut head keeps `k`, or one tensor per cut head when the counts differ
(`HeadKVEviction`); the layer then stores its cut heads in groups of equal length.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from ..errors import ConfigError


def query_heads(kv_heads: torch.Tensor, group_size: int) -> torch.Tensor:
    """The query heads that read `kv_heads`, grouped by KV head: `ModelSpec.query_heads_of` as
    one index tensor (HF `repeat_kv` order: query head h reads KV head h // group_size)."""
    return (kv_heads[:, None] * group_size + torch.arange(group_size, device=kv_heads.device)[None, :]).flatten()


class CutLayer(Protocol):
    """What an eviction reads of a layer (`cache.HeadSparseLayer`): its cut heads' stored keys
    `[B, n_part, T, D]` and absolute positions `[n_part, T]`, before any per-head split."""

    index: int  # the layer's index in the model
    n_kv: int
    seen: int  # tokens seen so far
    part_idx: torch.Tensor  # the cut KV heads
    pkeys: torch.Tensor | None
    ppos: torch.Tensor | None


Keep = torch.Tensor | list[torch.Tensor] | None


class Eviction(ABC):
    """How a layer's cut heads drop tokens. The layer asks `keep` after each attention step and
    `visible` for the mask of the current queries; evictions are stateless and shared by layers."""

    needs_dense_prefill: ClassVar[bool] = False

    @abstractmethod
    def keep(self, layer: CutLayer, query: torch.Tensor | None, after_prefill: bool) -> Keep:
        """Sorted indices `[n_part, k]` of the stored tokens each cut head keeps, one tensor per cut
        head when the counts differ, or None (keep all). `query`: the prefill's (observation)
        queries `[B, Hq, q, D]` when known."""

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor | None:
        """bool, broadcast of `qpos` `[1, q, 1]` and `kpos` `[n_part, 1, T]`: which stored tokens a
        query may read besides causality; None = all of them."""
        return None


@dataclass(frozen=True)
class SinkWindowEviction(Eviction):
    """StreamingLLM: keep the first `sink` tokens and the `window` most recent ones."""

    sink: int = 4
    window: int = 64

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 1:
            raise ConfigError(f"sink must be >= 0 and window >= 1, got sink={self.sink} window={self.window}")

    def keep(self, layer: CutLayer, query: torch.Tensor | None, after_prefill: bool) -> torch.Tensor | None:
        assert layer.pkeys is not None and layer.ppos is not None  # the layer evicts only after update()
        if layer.pkeys.shape[-2] <= self.sink + self.window:
            return None
        pos = layer.ppos[0]  # every cut head holds the same positions
        idx = torch.nonzero((pos < self.sink) | (pos >= layer.seen - self.window)).flatten()
        return idx.expand(len(layer.part_idx), -1).contiguous()

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return (kpos < self.sink) | (kpos >= qpos - self.window)


def observed_attention(layer: CutLayer, query: torch.Tensor, w: int, kernel: int) -> torch.Tensor:
    """SnapKV's token scores `[n_part, T - w]`: the attention of the last `w` queries to each
    earlier stored token, summed over those queries and the cut head's query heads, max-pooled
    over `kernel` neighbouring tokens."""
    assert layer.pkeys is not None  # the layer evicts only after update()
    t = layer.pkeys.shape[-2]
    b, hq, _, d = query.shape
    group = hq // layer.n_kv
    q_obs = query[:, query_heads(layer.part_idx, group), -w:]  # [B, n_part*group, w, D]
    k = layer.pkeys.repeat_interleave(group, dim=1)  # [B, n_part*group, T, D]
    logits = q_obs @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.arange(t - w, t, device=query.device)[:, None] >= torch.arange(t, device=query.device)[None, :]
    logits = logits.masked_fill(~causal, float("-inf"))
    attn = logits.softmax(-1)[..., : t - w].sum(-2)  # [B, n_part*group, T - w]
    attn = attn.view(b, len(layer.part_idx), group, t - w).sum((0, 2))  # [n_part, T - w]
    if kernel > 1:
        attn = torch.nn.functional.max_pool1d(attn[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    return attn


@dataclass(frozen=True)
class SnapKVEviction(Eviction):
    """SnapKV: once, after the prefill, keep per head `budget` tokens: the last `obs_window`
    prompt tokens plus those the observation queries attend to most (max-pooled over `kernel`,
    summed over the window and the head's query heads). Later tokens are appended."""

    budget: int = 256
    obs_window: int = 32
    kernel: int = 7
    needs_dense_prefill: ClassVar[bool] = True  # it ranks tokens by the prefill's attention

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ConfigError(f"snapkv needs a token budget >= 1, got {self.budget}")

    def keep(self, layer: CutLayer, query: torch.Tensor | None, after_prefill: bool) -> torch.Tensor | None:
        assert layer.pkeys is not None  # the layer evicts only after update()
        t = layer.pkeys.shape[-2]
        if not after_prefill or query is None or t <= self.budget:
            return None
        w = min(self.obs_window, t, self.budget)
        attn = observed_attention(layer, query, w, self.kernel)
        top = attn.topk(self.budget - w, dim=-1).indices
        recent = torch.arange(t - w, t, device=query.device).expand(len(layer.part_idx), -1)
        return torch.cat([top, recent], dim=-1).sort(dim=-1).values


@dataclass(frozen=True)
class HeadKVEviction(Eviction):
    """HeadKV (Fu et al. 2024): once, after the prefill, KV head h of layer l keeps
    `budgets[l][h]` tokens: the first `sink` and the last `window` ones, and the rest of its count
    chosen as SnapKV chooses (`observed_attention` of the last `obs_window` queries; SnapKV's
    observation window ranks above every other token). Later tokens are appended."""

    budgets: tuple[tuple[int, ...], ...] = ()
    sink: int = 4
    window: int = 60
    obs_window: int = 32
    kernel: int = 7
    needs_dense_prefill: ClassVar[bool] = True  # it ranks tokens by the prefill's attention

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 0 or self.obs_window < 1:
            raise ConfigError(f"headkv needs sink, window >= 0 and obs_window >= 1, got {self}")
        if any(b < 0 for row in self.budgets for b in row):
            raise ConfigError("headkv token budgets must be >= 0")

    def keep(self, layer: CutLayer, query: torch.Tensor | None, after_prefill: bool) -> Keep:
        if not after_prefill or query is None:
            return None
        assert layer.pkeys is not None  # the layer evicts only after update()
        t = layer.pkeys.shape[-2]
        heads = layer.part_idx.tolist()
        if layer.index >= len(self.budgets) or len(self.budgets[layer.index]) != layer.n_kv:
            raise ConfigError(f"headkv budgets do not cover layer {layer.index} with {layer.n_kv} KV heads")
        counts = [min(self.budgets[layer.index][h], t) for h in heads]
        if min(counts, default=1) < 1:
            raise ConfigError(f"headkv: a KV head of layer {layer.index} has a budget of 0 tokens")
        if all(c == t for c in counts):
            return None
        w = min(self.obs_window, t, query.shape[-2])
        scores = torch.zeros(len(heads), t, device=query.device)
        if t > w:
            attn = observed_attention(layer, query, w, self.kernel)
            scores[:, : t - w] = attn
            scores[:, t - w :] = attn.max() + 1  # SnapKV keeps its observation window first
        out = []
        for row, c in zip(scores, counts, strict=True):
            sink = min(self.sink, c)
            recent = min(self.window, c - sink)
            rest = row[sink : t - recent].topk(c - sink - recent).indices + sink  # sink and window are kept anyway
            first, last = torch.arange(sink, device=row.device), torch.arange(t - recent, t, device=row.device)
            out.append(torch.cat([first, rest, last]).sort().values)
        return out
