"""Heads and rankings: the one place that orders heads by a score.

A head is `(layer, head)`, 0-based. Query heads are scored `[n_layers, n_heads]`; under grouped-query
attention several query heads read one KV head, so KV-cache policies rank KV heads
`[n_layers, n_kv_heads]` with the score of their best query head.

Every ranking is `rank_heads`: decreasing score, NaN (not scored) last. Ties are broken by an
optional second score (decreasing), then by the lower layer and the lower head, so a ranking is a
pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ConfigError
from .models import ModelSpec

Head = tuple[int, int]  # (layer, query head) or (layer, KV head)


def rank_heads(scores: np.ndarray, tiebreak: np.ndarray | None = None) -> list[Head]:
    """All heads of a `[n_layers, n_heads]` map by decreasing score.

    NaN ranks last; equal scores go by decreasing `tiebreak` (same shape, NaN last), then by the
    lower layer, then the lower head.
    """
    s = np.asarray(scores, dtype=float)
    if s.ndim != 2:
        raise ConfigError(f"scores must be a [layers, heads] map, got shape {s.shape}")
    flat = np.nan_to_num(s, nan=-np.inf).ravel()
    keys: list[np.ndarray] = [np.arange(flat.size)]  # lexsort: last key is primary
    if tiebreak is not None:
        t = np.asarray(tiebreak, dtype=float)
        if t.shape != s.shape:
            raise ConfigError(f"tie-break scores have shape {t.shape}, scores {s.shape}")
        keys.append(-np.nan_to_num(t, nan=-np.inf).ravel())
    keys.append(-flat)
    order = np.lexsort(tuple(keys))
    n = s.shape[1]
    return [(int(i // n), int(i % n)) for i in order]


def top_heads(scores: np.ndarray, k: int, tiebreak: np.ndarray | None = None) -> list[Head]:
    """The k best-ranked heads, best first."""
    return rank_heads(scores, tiebreak)[:k]


def top_mask(scores: np.ndarray, k: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """bool map of the scores' shape: True for the k best-ranked heads."""
    mask = np.zeros(np.shape(scores), dtype=bool)
    for layer, head in top_heads(scores, k, tiebreak):
        mask[layer, head] = True
    return mask


def random_heads(pool: Sequence[Head], k: int, seed: int) -> tuple[Head, ...]:
    """K heads drawn without replacement from `pool` with `numpy.random.default_rng([seed, k])`,
    sorted. The same (pool, k, seed) always gives the same heads."""
    pool = list(pool)
    if k > len(pool):
        raise ConfigError(f"cannot draw {k} random heads from a pool of {len(pool)}")
    idx = np.random.default_rng([seed, k]).choice(len(pool), size=k, replace=False)
    return tuple(sorted(pool[i] for i in idx))


def kv_head_scores(scores: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """`[n_layers, n_kv_heads]`: a KV head's score is the max over the query heads that read it
    (the GQA map of `ModelSpec.kv_head_of`). NaN counts as -inf; a KV head whose query heads are all
    NaN stays NaN."""
    s = np.asarray(scores, dtype=float)
    if s.shape != spec.shape:
        raise ConfigError(f"scores have shape {s.shape} but {spec.name} has {spec.n_layers} x {spec.n_heads} heads")
    out = np.full((spec.n_layers, spec.n_kv_heads), np.nan)
    for kv in range(spec.n_kv_heads):
        group = s[:, spec.query_heads_of(kv)]  # [n_layers, group]
        has = ~np.isnan(group).all(-1)
        out[has, kv] = np.nanmax(group[has], axis=-1)
    return out


def random_kv_scores(spec: ModelSpec, seed: int) -> np.ndarray:
    """Uniform random scores `[n_layers, n_kv_heads]` (a random ranking), seeded."""
    return np.random.default_rng([seed, spec.n_layers, spec.n_kv_heads]).random((spec.n_layers, spec.n_kv_heads))
