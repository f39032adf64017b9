"""What cut heads keep, on constructed attention patterns: HeadKV keeps, per KV head, its sink, its
window and the tokens the observation queries attend to most (SnapKV), each head its own count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from retrieval_heads.errors import ConfigError
from retrieval_heads.kvcache import HeadKVEviction, SnapKVEviction

T, D = 40, 4


def _layer(focus: dict[int, list[int]], group: int = 2):
    """Two KV heads (`group` query heads each) over T tokens; the keys of head h at `focus[h]` point
    where every query points, the other keys are 0: the observation queries attend to those tokens."""
    keys = torch.zeros(1, 2, T, D)
    for h, tokens in focus.items():
        keys[0, h, tokens, 0] = 10.0
    query = torch.zeros(1, 2 * group, T, D)
    query[..., 0] = 10.0
    layer = SimpleNamespace(index=0, n_kv=2, seen=T, part_idx=torch.tensor([0, 1]), pkeys=keys, ppos=None)
    return layer, query


def test_headkv_keeps_each_heads_most_attended_tokens():
    focus = {0: [10, 15, 20], 1: [12, 25]}
    layer, query = _layer(focus)
    ev = HeadKVEviction(budgets=((2 + 4 + 3, 2 + 4 + 2),), sink=2, window=4, obs_window=4, kernel=1)
    kept = ev.keep(layer, query, after_prefill=True)
    window = list(range(T - 4, T))
    assert [k.tolist() for k in kept] == [[0, 1, 10, 15, 20, *window], [0, 1, 12, 25, *window]]
    # a smaller count keeps the best of them first; a count of the whole prompt keeps everything
    ev = HeadKVEviction(budgets=((2 + 4 + 1, T),), sink=2, window=4, obs_window=4, kernel=1)
    layer.pkeys[0, 0, 15, 0] = 20.0
    first, whole = ev.keep(layer, query, after_prefill=True)
    assert first.tolist() == [0, 1, 15, *window] and whole.tolist() == list(range(T))
    assert ev.keep(layer, query, after_prefill=False) is None  # once, after the prefill
    assert HeadKVEviction(budgets=((T, T),)).keep(layer, query, after_prefill=True) is None


def test_headkv_ranks_snapkvs_observation_window_first():
    # window 2 < observation window 6: the other 4 observation tokens come before any attended one
    layer, query = _layer({0: [10], 1: [12]})
    ev = HeadKVEviction(budgets=((1 + 2 + 5, 1 + 2 + 4),), sink=1, window=2, obs_window=6, kernel=1)
    a, b = ev.keep(layer, query, after_prefill=True)
    assert a.tolist() == [0, 10, *range(T - 6, T)] and b.tolist() == [0, *range(T - 6, T)]


def test_headkv_and_snapkv_agree_for_one_count_per_head():
    g = torch.Generator().manual_seed(0)
    layer, _ = _layer({})
    layer.pkeys = torch.randn(1, 2, T, D, generator=g)
    query = torch.randn(1, 4, T, D, generator=g)
    snap = SnapKVEviction(budget=12, obs_window=5, kernel=3).keep(layer, query, after_prefill=True)
    headkv = HeadKVEviction(budgets=((12, 12),), sink=0, window=5, obs_window=5, kernel=3)
    assert torch.equal(torch.stack(headkv.keep(layer, query, after_prefill=True)), snap)


def test_headkv_bad_budgets():
    layer, query = _layer({})
    with pytest.raises(ConfigError, match=">= 0"):
        HeadKVEviction(budgets=((-1, 3),))
    with pytest.raises(ConfigError, match="obs_window"):
        HeadKVEviction(budgets=((1, 3),), obs_window=0)
    with pytest.raises(ConfigError, match="do not cover"):
        HeadKVEviction(budgets=((3,),)).keep(layer, query, after_prefill=True)
    with pytest.raises(ConfigError, match="0 tokens"):
        HeadKVEviction(budgets=((0, 3),)).keep(layer, query, after_prefill=True)
