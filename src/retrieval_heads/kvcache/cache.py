"""Head-level KV-cache compression: keep every token only for chosen KV heads (paper section 5).

Sparsity in the head dimension instead of the token dimension. Per layer and KV head the cache
keeps either every token ("whole" heads, chosen by a ranking such as the retrieval score) or
only what an eviction keeps for the other ("cut") heads: the first `sink` tokens (attention sink)
plus the `window` most recent ones (`SinkWindowEviction`), or the tokens SnapKV selects after the
prefill (`SnapKVEviction`), or a count of its own per head (`HeadKVEviction`; evictions in
`evictions`). The cache really holds fewer bytes: each layer stores its whole heads as one tensor
`[B, n_whole, T, D]` and its cut heads as `[B, n_part, T_part, D]` with their absolute positions,
one such group per count of kept tokens (`CutGroup`; one group unless the counts differ);
nothing is padded or masked in storage. `HeadSparseCache.nbytes()` is the sum of
`numel * element_size` over the tensors the cache holds.

    cache = HeadSparseCache(whole, SinkWindowEviction(sink=4, window=60))
    with cache.attached(lm.model, lm.spec):
        out = lm.model.generate(ids, cache=cache, max_new_tokens=32, do_sample=False)
    cache.nbytes()

Attention over heads of different lengths cannot be one SDPA call, so `attached()` registers a
small attention function (`AttentionInterface`, name `retrieval_heads_head_sparse`) and sets it
on the model for the duration of the `with` block only. That function runs SDPA once for the
whole heads and once per group of cut heads, each with an exact mask built from absolute positions.

Prefill: by default the first forward (the prompt) uses full attention for every head and the
cache is compressed right after it ("compress after prefill", as kvpress, SnapKV and HeadKV do).
With `dense_prefill=False` every forward, prefill chunks included, already sees only the
compressed cache (DuoAttention-style streaming heads), so peak memory shrinks too.

Models with sliding-window layers (Gemma3's local layers): only the global layers are compressed
(as kvpress does). A sliding layer keeps what the model's own cache keeps, its last `window - 1`
tokens for every head (a sink-free `SinkWindowEviction`, exactly the model's sliding mask); build the
cache with `windows=spec.sliding_window` (`KVPolicy.make_cache(spec)` does). Batches must be
unpadded (one prompt, or prompts of one length).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..compat import cache_layer
from ..errors import ConfigError
from ..models import ModelSpec, attention_implementation, spec_from_config
from .evictions import Eviction, Keep, SinkWindowEviction, query_heads

ATTN_NAME = "retrieval_heads_head_sparse"

_ACTIVE: contextvars.ContextVar[HeadSparseCache | None] = contextvars.ContextVar("rh_kv_cache", default=None)


class CutGroup(NamedTuple):
    """Cut KV heads that hold the same number of tokens: keys/values `[B, n, T_g, D]`, absolute
    positions `[n, T_g]` (int32)."""

    heads: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor

    def extend(self, key_states: torch.Tensor, value_states: torch.Tensor, qpos: torch.Tensor) -> CutGroup:
        """The group with the new tokens `[B, n_kv, q, D]` at positions `qpos` appended."""
        new_pos = qpos.to(torch.int32).expand(len(self.heads), -1)
        keys = torch.cat([self.keys, key_states[:, self.heads]], dim=-2)
        values = torch.cat([self.values, value_states[:, self.heads]], dim=-2)
        return CutGroup(self.heads, keys, values, torch.cat([self.pos, new_pos], dim=-1))


class Step(enum.Enum):
    """What the attention function does with the keys/values `update()` just stored."""

    DENSE = "dense"  # first forward over the prompt: full attention for every head, then evict
    SPARSE = "sparse"  # whole heads over all tokens, cut heads over what their eviction kept


# ----------------------------------------------------------------------------------- cache
@cache_layer  # the older transformers' layer interface too
class HeadSparseLayer(CacheLayerMixin):
    """One layer: whole KV heads `[B, n_whole, T, D]`, cut heads `[B, n_part, T_part, D]` with
    their absolute positions `[n_part, T_part]` (int32); `eviction` decides what cut heads keep."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        whole: Sequence[bool],
        eviction: Eviction,
        *,
        dense_prefill: bool = True,
        record_obs: int = 0,
        window: int | None = None,
        index: int = 0,
    ) -> None:
        super().__init__()
        self.index = index  # the layer's index in the model (per-layer evictions read it)
        self.window = window  # a sliding-window layer: every head keeps its last window - 1 tokens
        if window is not None:
            whole, eviction = [False] * len(whole), SinkWindowEviction(sink=0, window=window - 1)
        w = torch.as_tensor(list(whole), dtype=torch.bool)
        self.whole_idx = torch.nonzero(w).flatten()  # KV heads kept whole
        self.part_idx = torch.nonzero(~w).flatten()  # KV heads cut by the eviction (the first group's)
        self.cut_idx = self.part_idx  # every cut head, restored by reset()
        self.n_kv = len(w)
        self.eviction = eviction
        self.dense_prefill = dense_prefill
        self.seen = 0  # tokens seen (absolute position of the next token)
        self.keys: torch.Tensor | None = None  # whole heads
        self.values: torch.Tensor | None = None
        self.pkeys: torch.Tensor | None = None  # cut heads
        self.pvalues: torch.Tensor | None = None
        self.ppos: torch.Tensor | None = None  # [n_part, T_part] int32 absolute positions
        self.extra: list[CutGroup] = []  # cut heads that keep another count of tokens (HeadKV)
        self.pending: Step | None = None  # set by update(), consumed by the attention function
        self.qpos: torch.Tensor | None = None  # [q] absolute positions of the current queries
        self.peak_bytes = 0
        self.record_obs = int(record_obs)  # >0: a dense step keeps the last `record_obs` queries (SnapKV later)
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

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values `[B, n_kv, q, D]`; return what the attention function reads:
        all heads on a dense prefill step, else the whole heads only (the others it takes from
        this layer)."""
        if key_states.shape[1] != self.n_kv:
            raise ConfigError(f"cache planned for {self.n_kv} KV heads, the layer has {key_states.shape[1]}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        assert self.pkeys is not None and self.pvalues is not None and self.ppos is not None
        q = key_states.shape[-2]
        self.qpos = torch.arange(self.seen, self.seen + q, device=key_states.device)
        dense = self.dense_prefill and self.seen == 0
        self.keys = torch.cat([self.keys, key_states[:, self.whole_idx]], dim=-2)
        self.values = torch.cat([self.values, value_states[:, self.whole_idx]], dim=-2)
        self.pkeys = torch.cat([self.pkeys, key_states[:, self.part_idx]], dim=-2)
        self.pvalues = torch.cat([self.pvalues, value_states[:, self.part_idx]], dim=-2)
        new_pos = self.qpos.to(torch.int32).expand(len(self.part_idx), q)
        self.ppos = torch.cat([self.ppos, new_pos], dim=-1)
        self.extra = [g.extend(key_states, value_states, self.qpos) for g in self.extra]
        self.seen += q
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        self.pending = Step.DENSE if dense else Step.SPARSE
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
        self.part_idx, self.extra = self.cut_idx, []
        self.is_initialized, self.seen, self.pending, self.peak_bytes = False, 0, None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("HeadSparseCache supports greedy or sampled decoding, not beam search")

    # -- bookkeeping
    def nbytes(self) -> int:
        """Bytes of the tensors this layer holds (keys, values, positions)."""
        ts = (self.keys, self.values, self.pkeys, self.pvalues, self.ppos, *(t for g in self.extra for t in g[1:]))
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def tokens_per_head(self) -> list[int]:
        """Stored tokens of each KV head, in KV-head order."""
        out = [0] * self.n_kv
        for i in self.whole_idx.tolist():
            out[i] = 0 if self.keys is None else self.keys.shape[-2]
        for i in self.part_idx.tolist():
            out[i] = 0 if self.pkeys is None else self.pkeys.shape[-2]
        for g in self.extra:
            for i in g.heads.tolist():
                out[i] = g.keys.shape[-2]
        return out

    def groups(self) -> list[CutGroup]:
        """The cut heads in groups of equal length: the first one (`pkeys`, `pvalues`, `ppos`),
        then `extra`."""
        assert self.pkeys is not None and self.pvalues is not None and self.ppos is not None  # filled by update()
        return [CutGroup(self.part_idx, self.pkeys, self.pvalues, self.ppos), *self.extra]

    def keep_tokens(self, idx: Keep) -> None:
        """Keep only the cut heads' stored tokens `idx`: `[n_part, k]` (per-head indices, sorted), or
        one index tensor per cut head when the counts differ; heads of one count form a group."""
        if idx is None:
            return
        if isinstance(idx, torch.Tensor):
            self.part_idx, self.pkeys, self.pvalues, self.ppos = self.cut_group(slice(None), idx)
            return
        by_count: dict[int, list[int]] = {}
        for j, ix in enumerate(idx):
            by_count.setdefault(len(ix), []).append(j)
        groups = [
            self.cut_group(torch.tensor(js, device=self.part_idx.device), torch.stack([idx[j] for j in js]))
            for js in by_count.values()
        ]
        (self.part_idx, self.pkeys, self.pvalues, self.ppos), *self.extra = groups

    def cut_group(self, sel: torch.Tensor | slice, idx: torch.Tensor) -> CutGroup:
        """The cut heads `sel` of the first group with only their stored tokens `idx` `[n, k]`."""
        assert self.pkeys is not None and self.pvalues is not None and self.ppos is not None  # filled by update()
        k, v, gather = self.pkeys[:, sel], self.pvalues[:, sel], idx[None, :, :, None]
        return CutGroup(
            self.part_idx[sel],
            k.gather(2, gather.expand(k.shape[0], -1, -1, k.shape[-1])).contiguous(),
            v.gather(2, gather.expand(v.shape[0], -1, -1, v.shape[-1])).contiguous(),
            self.ppos[sel].gather(1, idx).contiguous(),
        )

    def evict(self, query: torch.Tensor | None = None, *, after_prefill: bool = False) -> None:
        """After attention: drop what the eviction no longer keeps of the cut heads."""
        if len(self.part_idx) == 0 or self.pkeys is None or self.extra:
            return  # groups come from a one-time eviction after the prefill (HeadKV); nothing more to drop
        self.keep_tokens(self.eviction.keep(self, query, after_prefill))

    def part_mask(self, pos: torch.Tensor | None = None) -> torch.Tensor:
        """bool `[n_part, q, T_part]`: which stored tokens each current query of each cut head sees
        (`pos`: the positions of a group, by default the first)."""
        assert self.qpos is not None and self.ppos is not None  # set by update() before attention
        qp = self.qpos[None, :, None]  # [1, q, 1]
        kp = (self.ppos if pos is None else pos)[:, None, :].to(qp.dtype)  # [n_part, 1, T]
        vis = kp <= qp
        extra = self.eviction.visible(qp, kp)
        return vis if extra is None else vis & extra


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def head_sparse_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for `HeadSparseCache`: query `[B, Hq, q, D]` -> output `[B, q, Hq, D]`."""
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(f"attention {ATTN_NAME!r} runs only inside HeadSparseCache.attached(model)")
    layer = cache.layers[module.layer_idx]
    if kwargs.get("softcap") is not None:
        raise ConfigError("head-sparse KV cache: models with attention soft-capping are not supported")
    if kwargs.get("sliding_window") != layer.window:
        raise ConfigError(
            f"layer {module.layer_idx} attends over a window of {kwargs.get('sliding_window')}, the cache planned "
            f"{layer.window}; build the cache with windows=spec.sliding_window"
        )
    step, layer.pending = layer.pending, None
    if step is Step.DENSE:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if layer.window is None:
            out = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs
            )
        else:  # our own sliding causal mask (the one transformers builds for this function is not)
            kpos, qpos = torch.arange(key.shape[-2], device=query.device)[None, :], layer.qpos[:, None]
            mask = (kpos <= qpos) & (kpos > qpos - layer.window)
            out = _sdpa(query, key, value, mask, scaling).transpose(1, 2).contiguous(), None
        if layer.record_obs:
            layer.obs_query = query[:, :, -layer.record_obs :].clone()
        layer.evict(query, after_prefill=True)
        return out
    if step is not Step.SPARSE:
        raise RuntimeError("head-sparse attention called without a cache update")
    b, hq, q, _ = query.shape
    group = hq // layer.n_kv
    out = query.new_empty(b, hq, q, value.shape[-1])
    if len(layer.whole_idx):
        qi = query_heads(layer.whole_idx, group)
        t = layer.keys.shape[-2]
        mask = None
        if q > 1:  # bottom-right aligned causal mask: query i sees keys up to its own position
            mask = torch.arange(t, device=query.device)[None, :] <= layer.qpos[:, None]
        out[:, qi] = _sdpa(query[:, qi], layer.keys, layer.values, mask, scaling)
    for heads, k, v, pos in layer.groups() if len(layer.part_idx) else ():
        qi = query_heads(heads, group)
        mask = layer.part_mask(pos).repeat_interleave(group, dim=0)[None]  # [1, n*group, q, T]
        out[:, qi] = _sdpa(query[:, qi], k, v, mask, scaling)
    layer.evict()
    return out.transpose(1, 2).contiguous(), None


class HeadSparseCache(Cache):
    """A `transformers.Cache` whose layers keep whole KV heads and cut the others by `eviction`.

    whole: bool `[n_layers, n_kv_heads]`, True = keep every token of that KV head.
    """

    def __init__(
        self,
        whole: np.ndarray,
        eviction: Eviction = SinkWindowEviction(),  # noqa: B008  (a frozen dataclass)
        *,
        dense_prefill: bool = True,
        record_obs: int = 0,
        windows: Sequence[int | None] | None = None,
    ) -> None:
        """windows: per layer its sliding window or None (global); default all global. Sliding
        layers ignore their row of `whole` and keep their last window - 1 tokens."""
        if not isinstance(eviction, Eviction):
            raise ConfigError(
                f"unknown eviction {eviction!r}; use SinkWindowEviction, SnapKVEviction or HeadKVEviction"
            )
        if eviction.needs_dense_prefill and not dense_prefill:
            raise ConfigError(f"{type(eviction).__name__} needs a dense prefill")
        self.whole = np.asarray(whole, dtype=bool)
        self.eviction = eviction
        self.windows: tuple[int | None, ...] = tuple(windows) if windows is not None else (None,) * len(self.whole)
        if len(self.windows) != len(self.whole) or any(w is not None and w < 2 for w in self.windows):
            raise ConfigError(f"windows must give each of the {len(self.whole)} layers None or a window >= 2")
        super().__init__(
            layers=[
                HeadSparseLayer(row, eviction, dense_prefill=dense_prefill, record_obs=record_obs, window=w, index=i)
                for i, (row, w) in enumerate(zip(self.whole, self.windows, strict=True))
            ]
        )

    def nbytes(self) -> int:
        """Bytes of the tensors the cache holds now (sum of numel * element_size)."""
        return sum(layer.nbytes() for layer in self.layers)

    def peak_nbytes(self) -> int:
        """The largest `nbytes()` seen right after an update (sum of the per-layer peaks)."""
        return sum(layer.peak_bytes for layer in self.layers)

    def load_prefill(self, dense: HeadSparseCache) -> HeadSparseCache:
        """Fill this (empty) cache from `dense`, a cache with every head whole that has seen only
        the prompt in one dense forward (with `record_obs` set for SnapKV), and compress it as if
        this cache had run that prefill itself. Lets one prefill serve many policies; the tensors
        are copies, nothing is shared with `dense`."""
        if dense.windows != self.windows:
            raise ConfigError("load_prefill needs a dense cache planned with the same sliding windows")
        for new, old in zip(self.layers, dense.layers, strict=True):
            if new.window is not None:  # a sliding layer: the same in every cache, copied as it is
                if old.pkeys is None or new.seen:
                    raise ConfigError("load_prefill needs a dense cache after one prefill and an empty cache")
                new.lazy_initialization(old.pkeys, old.pvalues)
                new.pkeys, new.pvalues = old.pkeys.clone(), old.pvalues.clone()
                new.ppos, new.seen = old.ppos.clone(), old.seen
                new.peak_bytes = new.nbytes()
                continue
            if old.keys is None or len(old.part_idx) or old.seen != old.keys.shape[-2]:
                raise ConfigError("load_prefill needs an all-whole cache after one dense prefill")
            if new.seen:
                raise ConfigError("load_prefill needs an empty cache")
            if self.eviction.needs_dense_prefill and old.obs_query is None:
                raise ConfigError("load_prefill for snapkv needs the dense cache to record observation queries")
            new.lazy_initialization(old.keys, old.values)
            new.keys = old.keys[:, new.whole_idx].clone()
            new.values = old.values[:, new.whole_idx].clone()
            new.pkeys = old.keys[:, new.part_idx].clone()
            new.pvalues = old.values[:, new.part_idx].clone()
            t = old.keys.shape[-2]
            new.ppos = (
                torch.arange(t, dtype=torch.int32, device=old.keys.device).expand(len(new.part_idx), t).contiguous()
            )
            new.seen = t
            new.peak_bytes = new.nbytes()
            new.evict(old.obs_query, after_prefill=True)
        return self

    def tokens_per_head(self) -> np.ndarray:
        """int `[n_layers, n_kv_heads]`: tokens each KV head holds now."""
        return np.array([layer.tokens_per_head() for layer in self.layers])

    @contextlib.contextmanager
    def attached(self, model: Any, spec: ModelSpec | None = None) -> Iterator[HeadSparseCache]:
        """Run `model` with the head-sparse attention function; restores the model's own on exit.
        `spec` (default: read from the model's config) must have global attention only."""
        spec = spec if spec is not None else spec_from_config(model.config, type(model).__name__)
        if len(self.layers) != spec.n_layers:
            raise ConfigError(f"cache planned for {len(self.layers)} layers, the model has {spec.n_layers}")
        if tuple(spec.sliding_window) != self.windows:
            raise ConfigError(
                f"{spec.name} has sliding-window layers; build the cache with windows=spec.sliding_window "
                "(policy.make_cache(spec) does)"
            )
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, head_sparse_attention)  # idempotent
        token = _ACTIVE.set(self)
        try:
            with attention_implementation(model, ATTN_NAME):
                yield self
        finally:
            _ACTIVE.reset(token)


def full_cache_bytes(spec: ModelSpec, n_tokens: int, *, batch: int = 1, element_size: int = 4) -> int:
    """Bytes of an uncompressed KV cache (keys + values) of `n_tokens`, for budgets: every token on a
    global layer, the last window - 1 on a sliding-window layer (what transformers' cache keeps)."""
    tokens = sum(n_tokens if w is None else min(n_tokens, w - 1) for w in spec.sliding_window)
    return 2 * tokens * spec.n_kv_heads * spec.head_dim * element_size * batch
