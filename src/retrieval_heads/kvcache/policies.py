"""Cache policies (kvpress-style small dataclasses): which KV heads stay whole and how the others
are cut. Every policy is sized for a byte budget with the same call,

    policy = Policy.for_budget(spec, budget, n_tokens, sink=4, window=60, ranking=kv_scores)
    cache = policy.make_cache(spec)

and policies compose: `HeadPolicy(whole=mask, rest=SinkWindowPolicy(...) | SnapKVPolicy(...))`
keeps the heads of `mask` whole and cuts the rest as `rest` cuts every head.

- `FullPolicy`: every KV head keeps every token (the reference);
- `SinkWindowPolicy`: StreamingLLM for every head (sink + recent window);
- `SnapKVPolicy`: SnapKV token eviction for every head;
- `HeadPolicy`: the best-ranked KV heads (retrieval scores, random, needle attention, ...) whole;
- `HeadKVPolicy`: HeadKV, a token count per KV head in proportion to its score, SnapKV inside.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from ..errors import ConfigError
from ..heads import top_mask
from ..models import ModelSpec
from .cache import HeadSparseCache
from .evictions import Eviction, HeadKVEviction, SinkWindowEviction, SnapKVEviction


@dataclass(frozen=True)
class Budget:
    """What `KVPolicy.for_budget` sizes a policy for: `share` of the full cache's bytes after
    `n_tokens` tokens; what cut heads keep where the share does not set it (`sink`, `window`); the
    KV-head `ranking` of policies that choose whole heads."""

    share: float
    n_tokens: int
    sink: int = 4
    window: int = 60
    ranking: np.ndarray | None = None
    dense_prefill: bool = True


_P = TypeVar("_P", bound="KVPolicy")


def kv_ranking(spec: ModelSpec, ranking: np.ndarray | None) -> np.ndarray:
    """`ranking` as float `[n_layers, n_kv_heads]`, checked against `spec`."""
    if ranking is None:
        raise ConfigError("a head policy needs a ranking of the KV heads")
    r = np.asarray(ranking, dtype=float)
    if r.shape != (spec.n_layers, spec.n_kv_heads):
        raise ConfigError(f"KV-head scores have shape {r.shape}, {spec.name} has {spec.n_layers} x {spec.n_kv_heads}")
    return r


@dataclass(frozen=True)
class KVPolicy(ABC):
    """A cache policy: `whole_mask` (KV heads kept whole) and `eviction` (how the others are cut)."""

    name: str = ""
    dense_prefill: bool = True

    @abstractmethod
    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        """bool `[n_layers, n_kv_heads]`: True = keep every token of that KV head."""

    @abstractmethod
    def eviction(self) -> Eviction:
        """What the cut heads keep."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The policy's parameters for run configs (keys fixed: saved configs depend on them)."""

    @classmethod
    def for_budget(
        cls: type[_P],
        spec: ModelSpec,
        budget: float,
        n_tokens: int,
        *,
        sink: int = 4,
        window: int = 60,
        ranking: np.ndarray | None = None,
        name: str | None = None,
        dense_prefill: bool = True,
    ) -> _P:
        """The policy whose cache after `n_tokens` tokens holds at most `budget` (a share) of the full
        cache's bytes. `sink`/`window`: what cut heads keep where the budget does not set it;
        `ranking`: KV-head scores `[n_layers, n_kv_heads]` for policies that choose whole heads.
        Each policy sizes its own fields (`sized`)."""
        b = Budget(budget, n_tokens, sink, window, ranking, dense_prefill)
        return cls(**({"name": name} if name else {}), dense_prefill=dense_prefill, **cls.sized(spec, b))

    @classmethod
    @abstractmethod
    def sized(cls, spec: ModelSpec, b: Budget) -> dict[str, Any]:
        """The policy's own fields for budget `b` (what `for_budget` passes to the constructor)."""

    @property
    def n_whole(self) -> int | None:
        """KV heads chosen whole by a ranking (None: the policy ranks no heads)."""
        return None

    def make_cache(self, spec: ModelSpec) -> HeadSparseCache:
        """The policy's cache for `spec`'s model (sliding-window layers keep their window, uncut)."""
        return HeadSparseCache(
            self.whole_mask(spec), self.eviction(), dense_prefill=self.dense_prefill, windows=spec.sliding_window
        )


@dataclass(frozen=True)
class SinkWindowPolicy(KVPolicy):
    """StreamingLLM for every head: the first `sink` tokens plus the last `window`."""

    name: str = "sink_window"
    sink: int = 4
    window: int = 64

    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        return np.zeros((spec.n_layers, spec.n_kv_heads), dtype=bool)

    def eviction(self) -> Eviction:
        return SinkWindowEviction(self.sink, self.window)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "sink": self.sink, "window": self.window}

    @classmethod
    def sized(cls, spec: ModelSpec, b: Budget) -> dict[str, Any]:
        """Sink + window = `share * n_tokens` tokens per head (the budget sets the window)."""
        keep = max(b.sink + 1, int(round(b.share * b.n_tokens)))  # noqa: RUF046  (a NumPy 1.x float share)
        return {"sink": b.sink, "window": keep - b.sink}


@dataclass(frozen=True)
class FullPolicy(SinkWindowPolicy):
    """Every KV head keeps every token (the reference); `sink`/`window` cut no head."""

    name: str = "full"

    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        return np.ones((spec.n_layers, spec.n_kv_heads), dtype=bool)

    @classmethod
    def sized(cls, spec: ModelSpec, b: Budget) -> dict[str, Any]:
        """The full cache, whatever the budget (it is the reference the budget is a share of)."""
        return {"sink": b.sink, "window": b.window}


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

    def eviction(self) -> Eviction:
        return SnapKVEviction(self.budget_tokens, self.obs_window, self.kernel)

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "budget_tokens": self.budget_tokens, "obs_window": self.obs_window}

    @classmethod
    def sized(cls, spec: ModelSpec, b: Budget) -> dict[str, Any]:
        """`share * n_tokens` tokens per head (SnapKV chooses them; no sink or window)."""
        return {"budget_tokens": max(1, int(round(b.share * b.n_tokens)))}  # noqa: RUF046  (NumPy 1.x float)


@dataclass(frozen=True)
class HeadPolicy(KVPolicy):
    """The KV heads of `whole` keep every token; `rest` cuts the others (as it cuts every head).

    whole: bool `[n_layers, n_kv_heads]` (any nested sequence or array; kept as nested tuples so
    the policy stays frozen and hashable).
    """

    name: str = "retrieval_heads"
    whole: tuple[tuple[bool, ...], ...] = ()
    rest: SinkWindowPolicy | SnapKVPolicy = field(default_factory=SinkWindowPolicy)

    def __post_init__(self) -> None:
        rows = np.asarray(self.whole, dtype=bool)
        if rows.size and rows.ndim != 2:
            raise ConfigError(f"whole-head mask must be [layers, KV heads], got shape {rows.shape}")
        object.__setattr__(self, "whole", tuple(tuple(bool(x) for x in row) for row in rows))

    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        w = np.asarray(self.whole, dtype=bool)
        if w.shape != (spec.n_layers, spec.n_kv_heads):
            raise ConfigError(
                f"whole-head mask has shape {w.shape}, {spec.name} has {spec.n_layers} x {spec.n_kv_heads}"
            )
        return w

    def eviction(self) -> Eviction:
        return self.rest.eviction()

    @property
    def n_whole(self) -> int:
        return int(np.asarray(self.whole, dtype=bool).sum())

    def describe(self) -> dict[str, Any]:
        return {**self.rest.describe(), "policy": self.name, "n_whole": self.n_whole}

    @staticmethod
    def n_whole_for(spec: ModelSpec, budget: float, n_tokens: int, sink: int, window: int) -> int:
        """Largest number of whole KV heads whose cache stays within `budget` of the full cache (of
        the global layers: sliding-window layers are never cut, as in kvpress)."""
        n = sum(w is None for w in spec.sliding_window) * spec.n_kv_heads
        part = min(sink + window, n_tokens)
        if n_tokens <= part:
            return n
        k = (budget * n * n_tokens - n * part) / (n_tokens - part)
        return int(min(n, max(0, math.floor(k + 1e-9))))

    @classmethod
    def sized(cls, spec: ModelSpec, b: Budget) -> dict[str, Any]:
        """As many best-ranked KV heads whole as the budget allows, sink + window for the rest.
        NaN in `ranking` (not scored) ranks after every scored head (`heads.rank_heads`)."""
        r = kv_ranking(spec, b.ranking)
        local = np.array([w is not None for w in spec.sliding_window])
        r = np.where(local[:, None], -np.inf, np.nan_to_num(r, nan=-1e300))  # only global layers' heads are chosen
        mask = top_mask(r, cls.n_whole_for(spec, b.share, b.n_tokens, b.sink, b.window))
        return {
            "whole": tuple(map(tuple, mask.tolist())),
            "rest": SinkWindowPolicy(sink=b.sink, window=b.window, dense_prefill=b.dense_prefill),
        }


def allocate(weights: np.ndarray, pool: int, cap: int) -> np.ndarray:
    """HeadKV's split of a shared pool of `pool` tokens over heads in proportion to `weights` (NaN
    and negative count as 0; all 0: equal shares), each head at most `cap`: what a head at its cap
    cannot take goes to the others in the same proportions. In integers: the floors, then one token
    more for the largest remainders, so the counts add up to min(pool, cap * n) exactly."""
    w = np.clip(np.nan_to_num(np.asarray(weights, dtype=float).ravel(), nan=0.0), 0.0, None)
    n, pool = w.size, max(0, int(pool))
    if pool >= cap * n:
        return np.full(n, cap, dtype=int)
    share, free, left = np.zeros(n), np.ones(n, dtype=bool), float(pool)
    while free.any():
        if w[free].sum() <= 0:  # only heads without a score left: equal shares
            w = free.astype(float)
        x = np.where(free, left * w / w[free].sum(), 0.0)
        over = free & (x >= cap)
        if not over.any():
            share[free] = x[free]
            break
        share[over], free, left = cap, free & ~over, left - cap * int(over.sum())
    out = np.floor(share).astype(int)
    order = np.argsort(-(share - out), kind="stable")
    order = order[out[order] < cap]
    out[order[: pool - int(out.sum())]] += 1
    return out


@dataclass(frozen=True)
class HeadKVPolicy(KVPolicy):
    """HeadKV (Fu et al. 2024, "Not All Heads Matter"): no KV head whole; KV head h of layer l keeps
    `budgets[l][h]` tokens after the prefill: its first `sink` and last `window` ones (the shared
    base) and the rest chosen as SnapKV chooses (`HeadKVEviction`); later tokens are appended.

    budgets: tokens per KV head `[n_layers][n_kv_heads]` (0 on sliding-window layers, which keep
    their window); `for_budget` sizes them from the scores (`sized`).
    """

    name: str = "headkv"
    budgets: tuple[tuple[int, ...], ...] = ()
    sink: int = 4
    window: int = 60
    obs_window: int = 32
    kernel: int = 7

    def whole_mask(self, spec: ModelSpec) -> np.ndarray:
        if np.asarray(self.budgets).shape != (spec.n_layers, spec.n_kv_heads):
            raise ConfigError(f"headkv budgets do not match {spec.name}'s {spec.n_layers} x {spec.n_kv_heads} KV heads")
        return np.zeros((spec.n_layers, spec.n_kv_heads), dtype=bool)

    def eviction(self) -> Eviction:
        return HeadKVEviction(self.budgets, self.sink, self.window, self.obs_window, self.kernel)

    def describe(self) -> dict[str, Any]:
        kept = [b for row in self.budgets for b in row if b]
        return {
            "policy": self.name,
            "sink": self.sink,
            "window": self.window,
            "obs_window": self.obs_window,
            "tokens": sum(kept),
            "head_tokens": [min(kept, default=0), max(kept, default=0)],
        }

    @classmethod
    def sized(cls, spec: ModelSpec, b: Budget) -> dict[str, Any]:
        """`share * n_tokens` tokens per KV head of the global layers on average: each keeps sink +
        window (less when the budget is smaller, at least one token), the rest of the budget is a
        shared pool split over all of them in proportion to `ranking` (`allocate`), a head at most
        `n_tokens`. The total is the budget to the token (or every token of every head)."""
        glob = np.array([w is None for w in spec.sliding_window])
        r = kv_ranking(spec, b.ranking)[glob]
        n = r.size
        total = math.floor(b.share * n * b.n_tokens + 1e-9)
        base = max(1, min(b.sink + b.window, b.n_tokens, total // max(n, 1)))
        budgets = np.zeros((spec.n_layers, spec.n_kv_heads), dtype=int)
        budgets[glob] = base + allocate(r, total - n * base, b.n_tokens - base).reshape(r.shape)
        sink = min(b.sink, base)
        return {"budgets": tuple(map(tuple, budgets.tolist())), "sink": sink, "window": base - sink}
