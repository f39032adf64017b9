"""Head-level KV-cache compression: keep every token only for chosen KV heads (paper section 5).

Sparsity in the head dimension instead of the token dimension. Per layer and KV head the cache
keeps either every token ("whole" heads, chosen by a ranking such as the retrieval score) or
the first `sink` tokens (attention sink) plus the `window` most recent ones. The cache really
holds fewer bytes: each layer stores its whole heads as one tensor `[B, n_whole, T, D]` and its
other heads as `[B, n_part, sink + window, D]` with their absolute positions; nothing is padded
or masked in storage. `HeadSparseCache.nbytes()` is the sum of `numel * element_size` over the
tensors the cache holds.

    policy = HeadPolicy.for_budget(lm.spec, kv_head_scores(scores, lm.spec), budget=0.5, n_tokens=4096)
    cache = policy.make_cache(lm.spec)
    with cache.attached(lm.model):
        out = lm.model.generate(ids, cache=cache, max_new_tokens=32, do_sample=False)
    cache.nbytes()

Attention over heads of different lengths cannot be one SDPA call, so `attached()` registers a
small attention function (`AttentionInterface`, name `retrieval_heads_head_sparse`) and sets it
on the model for the duration of the `with` block only. That function runs SDPA once for the
whole heads and once for the others, each with an exact mask built from absolute positions.

Prefill: by default the first forward (the prompt) uses full attention for every head and the
cache is compressed right after it ("compress after prefill", as kvpress, SnapKV and HeadKV do).
With `dense_prefill=False` every forward, prefill chunks included, already sees only the
compressed cache (DuoAttention-style streaming heads), so peak memory shrinks too.

Policies (kvpress-style small dataclasses): `FullPolicy`, `SinkWindowPolicy` (StreamingLLM for
every head), `HeadPolicy` (whole heads by a ranking: retrieval scores, random, needle attention,
...), `SnapKVPolicy` (per-head token eviction from the attention of the last prompt queries).

Only models whose layers all use global attention are supported (Llama, Qwen2, Mistral without
a window); batches must be unpadded (one prompt, or prompts of one length).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import ConfigError, DataError
from .models import ModelSpec
from .scorefile import atomic_write_text

ATTN_NAME = "retrieval_heads_head_sparse"
KVHead = tuple[int, int]  # (layer, KV head)

_ACTIVE: contextvars.ContextVar["HeadSparseCache | None"] = contextvars.ContextVar("rh_kv_cache", default=None)


# ----------------------------------------------------------------------------------- KV-head rankings
def kv_head_scores(scores: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """`[n_layers, n_kv_heads]`: a KV head's score is the max over the query heads that read it.

    `scores` is `[n_layers, n_heads]` per query head; NaN (not scored) counts as -inf, and a KV
    head whose query heads are all NaN stays NaN.
    """
    s = np.asarray(scores, dtype=float)
    if s.shape != spec.shape:
        raise ConfigError(f"scores have shape {s.shape} but {spec.name} has {spec.n_layers} x {spec.n_heads} heads")
    n_rep = spec.n_heads // spec.n_kv_heads
    grouped = s.reshape(spec.n_layers, spec.n_kv_heads, n_rep)  # query head h -> KV head h // n_rep
    out = np.full((spec.n_layers, spec.n_kv_heads), np.nan)
    has = ~np.isnan(grouped).all(-1)
    out[has] = np.nanmax(grouped[has], axis=-1)
    return out


def rank_kv_heads(kv_scores: np.ndarray) -> list[KVHead]:
    """All KV heads by decreasing score; ties (and NaN, last) by lower layer, then lower head."""
    flat = np.nan_to_num(np.asarray(kv_scores, dtype=float), nan=-np.inf).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))
    n = kv_scores.shape[1]
    return [(int(i // n), int(i % n)) for i in order]


def random_kv_scores(spec: ModelSpec, seed: int) -> np.ndarray:
    """Uniform random scores `[n_layers, n_kv_heads]` (a random ranking), seeded."""
    return np.random.default_rng([seed, spec.n_layers, spec.n_kv_heads]).random((spec.n_layers, spec.n_kv_heads))


def top_mask(kv_scores: np.ndarray, n_whole: int) -> np.ndarray:
    """bool `[n_layers, n_kv_heads]`: the `n_whole` best-ranked KV heads."""
    mask = np.zeros(kv_scores.shape, dtype=bool)
    for l, k in rank_kv_heads(kv_scores)[:n_whole]:
        mask[l, k] = True
    return mask


# ----------------------------------------------------------------------------------- cache
class HeadSparseLayer(CacheLayerMixin):
    """One layer: whole KV heads `[B, n_whole, T, D]`, other heads `[B, n_part, T_part, D]` with
    their absolute positions `[n_part, T_part]` (int32). `mode` of the other heads: "window"
    (sink + sliding window) or "snapkv" (tokens chosen once after prefill, then appended)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, whole: Sequence[bool], *, sink: int, window: int, mode: str = "window",
                 budget: int = 0, obs_window: int = 32, kernel: int = 7, dense_prefill: bool = True) -> None:
        super().__init__()
        w = torch.as_tensor(list(whole), dtype=torch.bool)
        self.whole_idx = torch.nonzero(w).flatten()  # KV heads kept whole
        self.part_idx = torch.nonzero(~w).flatten()  # KV heads kept partially
        self.n_kv = len(w)
        self.sink, self.window, self.mode = int(sink), int(window), mode
        self.budget, self.obs_window, self.kernel = int(budget), int(obs_window), int(kernel)
        self.dense_prefill = dense_prefill
        self.seen = 0  # tokens seen (absolute position of the next token)
        self.keys = self.values = None  # whole heads
        self.pkeys = self.pvalues = None  # partial heads
        self.ppos: torch.Tensor | None = None  # [n_part, T_part] int32 absolute positions
        self.step: str | None = None  # "dense" or "sparse" between update() and attention
        self.qpos: torch.Tensor | None = None  # [q] absolute positions of the current queries
        self.peak_bytes = 0
        self.record_obs = 0  # >0: a dense step keeps the last `record_obs` queries (for SnapKV later)
        self.obs_query: torch.Tensor | None = None

    # -- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, _, d = key_states.shape
        dv = value_states.shape[-1]
        dev, dt = key_states.device, key_states.dtype
        self.keys = key_states.new_empty(b, len(self.whole_idx), 0, d)
        self.values = value_states.new_empty(b, len(self.whole_idx), 0, dv)
        self.pkeys = key_states.new_empty(b, len(self.part_idx), 0, d)
        self.pvalues = value_states.new_empty(b, len(self.part_idx), 0, dv)
        self.ppos = torch.empty(len(self.part_idx), 0, dtype=torch.int32, device=dev)
        self.whole_idx, self.part_idx = self.whole_idx.to(dev), self.part_idx.to(dev)
        self.device, self.dtype = dev, dt
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values `[B, n_kv, q, D]`; return what the attention function reads:
        all heads on a dense prefill step, else the whole heads only (the others it takes from
        this layer)."""
        if key_states.shape[1] != self.n_kv:
            raise ConfigError(f"cache planned for {self.n_kv} KV heads, the layer has {key_states.shape[1]}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self.qpos = torch.arange(self.seen, self.seen + q, device=key_states.device)
        dense = self.dense_prefill and self.seen == 0
        self.keys = torch.cat([self.keys, key_states[:, self.whole_idx]], dim=-2)
        self.values = torch.cat([self.values, value_states[:, self.whole_idx]], dim=-2)
        self.pkeys = torch.cat([self.pkeys, key_states[:, self.part_idx]], dim=-2)
        self.pvalues = torch.cat([self.pvalues, value_states[:, self.part_idx]], dim=-2)
        new_pos = self.qpos.to(torch.int32).expand(len(self.part_idx), q)
        self.ppos = torch.cat([self.ppos, new_pos], dim=-1)
        self.seen += q
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        self.step = "dense" if dense else "sparse"
        if dense:
            return key_states, value_states
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.pkeys = self.pvalues = self.ppos = None
        self.is_initialized, self.seen, self.step, self.peak_bytes = False, 0, None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HeadSparseCache supports greedy or sampled decoding, not beam search")

    # -- bookkeeping
    def nbytes(self) -> int:
        """Bytes of the tensors this layer holds (keys, values, positions)."""
        ts = (self.keys, self.values, self.pkeys, self.pvalues, self.ppos)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def tokens_per_head(self) -> list[int]:
        """Stored tokens of each KV head, in KV-head order."""
        out = [0] * self.n_kv
        for i in self.whole_idx.tolist():
            out[i] = 0 if self.keys is None else self.keys.shape[-2]
        for i in self.part_idx.tolist():
            out[i] = 0 if self.pkeys is None else self.pkeys.shape[-2]
        return out

    def _keep(self, idx: torch.Tensor) -> None:
        """Keep the partial heads' tokens `idx` `[n_part, k]` (per-head token indices, sorted)."""
        gather = idx[None, :, :, None]
        self.pkeys = self.pkeys.gather(2, gather.expand(self.pkeys.shape[0], -1, -1, self.pkeys.shape[-1])).contiguous()
        self.pvalues = self.pvalues.gather(2, gather.expand(self.pvalues.shape[0], -1, -1, self.pvalues.shape[-1])).contiguous()
        self.ppos = self.ppos.gather(1, idx).contiguous()

    def evict(self, query: torch.Tensor | None = None) -> None:
        """After attention: drop what the partial heads no longer keep."""
        if len(self.part_idx) == 0 or self.pkeys is None:
            return
        t = self.pkeys.shape[-2]
        if self.mode == "window":
            if t <= self.sink + self.window:
                return
            pos = self.ppos[0]  # window mode: every partial head holds the same positions
            keep = (pos < self.sink) | (pos >= self.seen - self.window)
            idx = torch.nonzero(keep).flatten()
            self._keep(idx.expand(len(self.part_idx), -1).contiguous())
        elif self.mode == "snapkv" and self.step == "dense" and query is not None:
            if t <= self.budget:
                return
            self._keep(self._snapkv_indices(query))

    def _snapkv_indices(self, query: torch.Tensor) -> torch.Tensor:
        """SnapKV: per partial head, the last `obs_window` prompt tokens plus the tokens the
        observation queries attend to most (max-pooled, summed over the window and the head's
        query heads). Returns sorted indices `[n_part, budget]`."""
        b, hq, _, d = query.shape
        n_rep = hq // self.n_kv
        t = self.pkeys.shape[-2]
        w = min(self.obs_window, t, self.budget)
        qi = _query_heads(self.part_idx, n_rep)
        q_obs = query[:, qi, -w:]  # [B, n_part*n_rep, w, D]
        k = self.pkeys.repeat_interleave(n_rep, dim=1)  # [B, n_part*n_rep, T, D]
        logits = q_obs @ k.transpose(-1, -2) / math.sqrt(d)
        causal = torch.arange(t - w, t, device=query.device)[:, None] >= torch.arange(t, device=query.device)[None, :]
        logits = logits.masked_fill(~causal, float("-inf"))
        attn = logits.softmax(-1)[..., : t - w].sum(-2)  # [B, n_part*n_rep, T - w]
        attn = attn.view(b, len(self.part_idx), n_rep, t - w).sum((0, 2))  # [n_part, T - w]
        if self.kernel > 1:
            attn = torch.nn.functional.max_pool1d(attn[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
        top = attn.topk(self.budget - w, dim=-1).indices
        recent = torch.arange(t - w, t, device=query.device).expand(len(self.part_idx), -1)
        return torch.cat([top, recent], dim=-1).sort(dim=-1).values

    def part_mask(self) -> torch.Tensor | None:
        """bool `[n_part, q, T_part]`: which stored tokens each current query of each partial head sees."""
        qp = self.qpos[None, :, None]  # [1, q, 1]
        kp = self.ppos[:, None, :].to(qp.dtype)  # [n_part, 1, T]
        vis = kp <= qp
        if self.mode == "window":
            vis = vis & ((kp < self.sink) | (kp >= qp - self.window))
        return vis


def _query_heads(kv_idx: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Query heads reading the KV heads `kv_idx`, grouped by KV head (HF repeat_kv order)."""
    return (kv_idx[:, None] * n_rep + torch.arange(n_rep, device=kv_idx.device)[None, :]).flatten()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def head_sparse_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention function for `HeadSparseCache`: query `[B, Hq, q, D]` -> output `[B, q, Hq, D]`."""
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(f"attention {ATTN_NAME!r} runs only inside HeadSparseCache.attached(model)")
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ConfigError("head-sparse KV cache: models with attention soft-capping or sliding windows are not supported")
    layer = cache.layers[module.layer_idx]
    if layer.step == "dense":  # first forward over the prompt: full causal attention for every head
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs)
        if layer.record_obs:
            layer.obs_query = query[:, :, -layer.record_obs:].clone()
        layer.evict(query)
        layer.step = None
        return out
    if layer.step != "sparse":
        raise RuntimeError("head-sparse attention called without a cache update")
    b, hq, q, _ = query.shape
    n_rep = hq // layer.n_kv
    out = query.new_empty(b, hq, q, value.shape[-1])
    if len(layer.whole_idx):
        qi = _query_heads(layer.whole_idx, n_rep)
        t = layer.keys.shape[-2]
        mask = None
        if q > 1:  # bottom-right aligned causal mask: query i sees keys up to its own position
            mask = torch.arange(t, device=query.device)[None, :] <= layer.qpos[:, None]
        out[:, qi] = _sdpa(query[:, qi], layer.keys, layer.values, mask, scaling)
    if len(layer.part_idx):
        qi = _query_heads(layer.part_idx, n_rep)
        mask = layer.part_mask().repeat_interleave(n_rep, dim=0)[None]  # [1, n_part*n_rep, q, T]
        out[:, qi] = _sdpa(query[:, qi], layer.pkeys, layer.pvalues, mask, scaling)
    layer.evict()
    layer.step = None
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_NAME, head_sparse_attention)


class HeadSparseCache(Cache):
    """A `transformers.Cache` whose layers keep whole KV heads and sink + window (or SnapKV) heads.

    whole: bool `[n_layers, n_kv_heads]`, True = keep every token of that KV head.
    """

    def __init__(self, whole: np.ndarray, *, sink: int = 4, window: int = 64, mode: str = "window",
                 budget: int = 0, dense_prefill: bool = True, obs_window: int = 32, kernel: int = 7,
                 record_obs: int = 0) -> None:
        if mode not in ("window", "snapkv"):
            raise ConfigError(f"unknown eviction mode {mode!r}; use window or snapkv")
        if sink < 0 or window < 1:
            raise ConfigError(f"sink must be >= 0 and window >= 1, got sink={sink} window={window}")
        if mode == "snapkv" and (budget < 1 or not dense_prefill):
            raise ConfigError("snapkv needs a token budget >= 1 and a dense prefill")
        self.whole = np.asarray(whole, dtype=bool)
        self.sink, self.window, self.mode = sink, window, mode
        layers = [HeadSparseLayer(row, sink=sink, window=window, mode=mode, budget=budget, obs_window=obs_window,
                                  kernel=kernel, dense_prefill=dense_prefill) for row in self.whole]
        for layer in layers:
            layer.record_obs = record_obs
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of the tensors the cache holds now (sum of numel * element_size)."""
        return sum(layer.nbytes() for layer in self.layers)

    def peak_nbytes(self) -> int:
        """The largest `nbytes()` seen right after an update (sum of the per-layer peaks)."""
        return sum(layer.peak_bytes for layer in self.layers)

    def load_prefill(self, dense: "HeadSparseCache") -> "HeadSparseCache":
        """Fill this (empty) cache from `dense`, a cache with every head whole that has seen only
        the prompt in one dense forward (with `record_obs` set for SnapKV), and compress it as if
        this cache had run that prefill itself. Lets one prefill serve many policies; the tensors
        are copies, nothing is shared with `dense`."""
        for new, old in zip(self.layers, dense.layers):
            if old.keys is None or len(old.part_idx) or old.seen != old.keys.shape[-2]:
                raise ConfigError("load_prefill needs an all-whole cache after one dense prefill")
            if new.seen:
                raise ConfigError("load_prefill needs an empty cache")
            new.lazy_initialization(old.keys, old.values)
            new.keys = old.keys[:, new.whole_idx].clone()
            new.values = old.values[:, new.whole_idx].clone()
            new.pkeys = old.keys[:, new.part_idx].clone()
            new.pvalues = old.values[:, new.part_idx].clone()
            t = old.keys.shape[-2]
            new.ppos = torch.arange(t, dtype=torch.int32, device=old.keys.device).expand(len(new.part_idx), t).contiguous()
            new.seen = t
            new.peak_bytes = new.nbytes()
            new.step = "dense"
            if new.mode == "snapkv" and old.obs_query is None:
                raise ConfigError("load_prefill for snapkv needs the dense cache to record observation queries")
            new.evict(old.obs_query)
            new.step = None
        return self

    def tokens_per_head(self) -> np.ndarray:
        """int `[n_layers, n_kv_heads]`: tokens each KV head holds now."""
        return np.array([layer.tokens_per_head() for layer in self.layers])

    @contextlib.contextmanager
    def attached(self, model: Any) -> Iterator["HeadSparseCache"]:
        """Run `model` with the head-sparse attention function; restores the model's own on exit."""
        spec_windows = [getattr(model.config.get_text_config(), "sliding_window", None)]
        layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or (
                spec_windows[0] and getattr(model.config.get_text_config(), "use_sliding_window", True) is not False):
            raise ConfigError("head-sparse KV cache: models with sliding-window layers are not supported")
        if len(self.layers) != model.config.get_text_config().num_hidden_layers:
            raise ConfigError(f"cache planned for {len(self.layers)} layers, the model has "
                              f"{model.config.get_text_config().num_hidden_layers}")
        _register()
        own = model.config._attn_implementation
        token = _ACTIVE.set(self)
        model.set_attn_implementation(ATTN_NAME)
        try:
            yield self
        finally:
            model.set_attn_implementation(own)
            _ACTIVE.reset(token)


def full_cache_bytes(spec: ModelSpec, n_tokens: int, *, batch: int = 1, element_size: int = 4) -> int:
    """Bytes of an uncompressed KV cache (keys + values) of `n_tokens`, for budgets."""
    return 2 * spec.n_layers * spec.n_kv_heads * n_tokens * spec.head_dim * element_size * batch


# ----------------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class KVPolicy:
    """A cache policy: which KV heads stay whole and how the others are cut."""

    name: str = "full"
    sink: int = 4
    window: int = 64
    dense_prefill: bool = True

    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        return np.ones((spec.n_layers, spec.n_kv_heads), dtype=bool)

    def make_cache(self, spec: ModelSpec) -> HeadSparseCache:
        return HeadSparseCache(self.whole_mask(spec), sink=self.sink, window=self.window,
                               dense_prefill=self.dense_prefill)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "sink": self.sink, "window": self.window}


@dataclass(frozen=True)
class FullPolicy(KVPolicy):
    """Every KV head keeps every token (the reference)."""


@dataclass(frozen=True)
class SinkWindowPolicy(KVPolicy):
    """StreamingLLM for every head: the first `sink` tokens plus the last `window`."""

    name: str = "sink_window"

    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        return np.zeros((spec.n_layers, spec.n_kv_heads), dtype=bool)

    @classmethod
    def for_budget(cls, budget: float, n_tokens: int, *, sink: int = 4, **kw: Any) -> "SinkWindowPolicy":
        keep = max(sink + 1, int(round(budget * n_tokens)))
        return cls(sink=sink, window=keep - sink, **kw)


@dataclass(frozen=True)
class HeadPolicy(KVPolicy):
    """The best-ranked `n_whole` KV heads keep every token, the others sink + window.

    kv_scores: `[n_layers, n_kv_heads]` ranking (retrieval scores, random, needle attention...).
    """

    name: str = "retrieval_heads"
    kv_scores: tuple[tuple[float, ...], ...] = ()
    n_whole: int = 0

    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        s = np.asarray(self.kv_scores, dtype=float)
        if s.shape != (spec.n_layers, spec.n_kv_heads):
            raise ConfigError(f"KV-head scores have shape {s.shape}, {spec.name} has {spec.n_layers} x {spec.n_kv_heads}")
        return top_mask(s, self.n_whole)

    @staticmethod
    def n_whole_for(spec: ModelSpec, budget: float, n_tokens: int, sink: int, window: int) -> int:
        """Largest number of whole KV heads whose cache stays within `budget` of the full cache."""
        n = spec.n_layers * spec.n_kv_heads
        part = min(sink + window, n_tokens)
        if n_tokens <= part:
            return n
        k = (budget * n * n_tokens - n * part) / (n_tokens - part)
        return int(min(n, max(0, math.floor(k + 1e-9))))

    @classmethod
    def for_budget(cls, spec: ModelSpec, kv_scores: np.ndarray, budget: float, n_tokens: int, *,
                   name: str = "retrieval_heads", sink: int = 4, window: int = 60, **kw: Any) -> "HeadPolicy":
        k = cls.n_whole_for(spec, budget, n_tokens, sink, window)
        rows = tuple(tuple(float(x) for x in r) for r in np.nan_to_num(np.asarray(kv_scores, dtype=float), nan=-1.0))
        return cls(name=name, sink=sink, window=window, kv_scores=rows, n_whole=k, **kw)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "n_whole": self.n_whole}


@dataclass(frozen=True)
class SnapKVPolicy(KVPolicy):
    """SnapKV-style token eviction for every head: after prefill keep `budget_tokens` per head
    (last `obs_window` prompt tokens + the most attended ones), then append new tokens."""

    name: str = "snapkv"
    budget_tokens: int = 256
    obs_window: int = 32
    kernel: int = 7

    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        return np.zeros((spec.n_layers, spec.n_kv_heads), dtype=bool)

    def make_cache(self, spec: ModelSpec) -> HeadSparseCache:
        return HeadSparseCache(self.whole_mask(spec), sink=self.sink, window=self.window, mode="snapkv",
                               budget=self.budget_tokens, obs_window=self.obs_window, kernel=self.kernel)

    @classmethod
    def for_budget(cls, budget: float, n_tokens: int, **kw: Any) -> "SnapKVPolicy":
        return cls(budget_tokens=max(1, int(round(budget * n_tokens))), **kw)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "budget_tokens": self.budget_tokens, "obs_window": self.obs_window}


# ----------------------------------------------------------------------------------- exports
def export_authors_json(path: str | Path, kv_scores: np.ndarray) -> None:
    """The authors' score-file format `{"<layer>-<kv head>": [score]}` over KV heads (NaN -> 0)."""
    s = np.nan_to_num(np.asarray(kv_scores, dtype=float), nan=0.0)
    obj = {f"{l}-{k}": [float(s[l, k])] for l in range(s.shape[0]) for k in range(s.shape[1])}
    atomic_write_text(path, json.dumps(obj))


def export_duo_tsv(path: str | Path, whole: np.ndarray) -> None:
    """DuoAttention-style full-attention-head pattern: one line per layer, one tab-separated
    0/1 per KV head (1 = keep the whole cache)."""
    rows = ["\t".join(str(int(x)) for x in row) for row in np.asarray(whole, dtype=bool)]
    atomic_write_text(path, "\n".join(rows) + "\n")


def read_duo_tsv(path: str | Path) -> np.ndarray:
    """Read a DuoAttention-style pattern back as bool `[n_layers, n_kv_heads]` (values >= 0.5 are 1)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows = [line.split() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        arr = np.array([[float(x) for x in r] for r in rows])
    except ValueError:
        raise DataError(f"{p}: expected rows of numbers separated by tabs") from None
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{p}: rows have different lengths or the file is empty")
    return arr >= 0.5
