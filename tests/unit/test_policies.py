"""HeadKV's budgets (`HeadKVPolicy`, `allocate`): the byte budget holds to the token, tokens follow
the scores, a head at most the whole prompt; and its head-sparse cache on tiny models (per-head
counts, measured bytes, one shared prefill, sliding-window layers)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from retrieval_heads.compat import cache_kwargs
from retrieval_heads.errors import ConfigError
from retrieval_heads.kvcache import (
    HeadKVEviction,
    HeadKVPolicy,
    HeadPolicy,
    HeadSparseCache,
    SnapKVPolicy,
    full_cache_bytes,
    random_kv_scores,
)
from retrieval_heads.kvcache.measure import dense_prefill
from retrieval_heads.kvcache.policies import allocate
from retrieval_heads.testing import tiny_model


def test_allocate_is_proportional_capped_and_exact():
    assert allocate(np.array([1.0, 2.0, 4.0, 0.0]), 70, 100).tolist() == [10, 20, 40, 0]
    # the head of weight 4 stops at its cap of 30; the 40 tokens it cannot take go 1:2 to the others
    assert allocate(np.array([1.0, 2.0, 4.0, 0.0]), 70, 30).tolist() == [13, 27, 30, 0]
    assert allocate(np.zeros(4), 10, 100).tolist() == [3, 3, 2, 2]  # no scores: equal shares
    assert allocate(np.array([np.nan, -1.0, 1.0]), 9, 5).tolist() == [2, 2, 5]  # unscored heads share the rest
    assert allocate(np.array([1.0, 3.0]), 50, 20).tolist() == [20, 20]  # more than every head can hold
    assert allocate(np.array([1.0, 1.0]), -3, 20).tolist() == [0, 0]
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, cap = rng.random(7) * (rng.random(7) > 0.3), int(rng.integers(1, 50))
        pool = int(rng.integers(0, 7 * cap + 10))
        out = allocate(w, pool, cap)
        assert out.sum() == min(pool, 7 * cap) and out.min() >= 0 and out.max() <= cap


def test_headkv_budget_holds_to_the_token():
    """Bytes = kept tokens x head_dim x 2 x element size <= the budget, and one token more over the
    global layers' KV heads would exceed it (or every head keeps every token)."""
    for arch in ("llama", "gemma3"):
        spec = tiny_model(arch).spec
        glob = np.array([w is None for w in spec.sliding_window])
        n_heads = int(glob.sum()) * spec.n_kv_heads
        for n_tokens in (40, 64, 65, 500, 4096):
            for share in (0.02, 0.1, 0.25, 0.5, 0.9):
                ranking = random_kv_scores(spec, n_tokens)
                p = HeadKVPolicy.for_budget(spec, share, n_tokens, sink=4, window=60, ranking=ranking)
                b = np.asarray(p.budgets)
                assert (b[~glob] == 0).all() and b[glob].max() <= n_tokens
                assert (b[glob] >= p.sink + p.window).all() and p.sink + p.window >= 1
                token = spec.head_dim * 2 * 4  # keys + values, float32
                budget, kv = share * n_heads * n_tokens * token, int(b.sum()) * token
                if share * n_tokens < 1:  # less than a token per head: each keeps one
                    assert (b[glob] == 1).all()
                else:
                    assert kv <= budget + 1e-6 and budget < kv + token, (arch, n_tokens, share)


def test_headkv_tokens_follow_the_scores():
    spec = tiny_model("llama").spec  # 2 layers x 2 KV heads
    ranking = np.array([[1.0, 2.0], [4.0, 1.0]])
    p = HeadKVPolicy.for_budget(spec, 0.3, 1000, sink=4, window=60, ranking=ranking)
    extra = np.asarray(p.budgets) - 64  # beyond the shared base (sink + window)
    assert extra.sum() == 1200 - 4 * 64
    assert np.abs(extra - ranking / ranking.sum() * extra.sum()).max() <= 1  # proportional, within rounding
    assert abs(extra[0, 1] - 2 * extra[0, 0]) <= 2 and abs(extra[1, 0] - 4 * extra[1, 1]) <= 4
    capped = HeadKVPolicy.for_budget(spec, 0.6, 1000, sink=4, window=60, ranking=ranking)
    assert capped.budgets[1][0] == 1000  # the prompt length; the rest went to the others
    assert sum(map(sum, capped.budgets)) == 2400
    equal = HeadKVPolicy.for_budget(spec, 0.3, 1000, sink=4, window=60, ranking=np.ones((2, 2)))
    assert equal.budgets == ((300, 300), (300, 300))
    # NaN and 0 weigh nothing; what the one scored head cannot hold goes to the others equally
    nan = HeadKVPolicy.for_budget(spec, 0.3, 1000, ranking=np.array([[np.nan, 1.0], [0.0, 0.0]]))
    assert nan.budgets == ((67, 1000), (67, 66))
    small = HeadKVPolicy.for_budget(spec, 0.01, 1000, sink=4, window=60, ranking=ranking)  # 10 tokens a head
    assert (small.sink, small.window) == (4, 6) and small.budgets == ((10, 10), (10, 10))


def test_headkv_has_the_one_for_budget_signature_and_describes_itself():
    sig = {str(inspect.signature(c.for_budget)).replace(f"'{c.__name__}'", "P") for c in (HeadPolicy, HeadKVPolicy)}
    assert len(sig) == 1
    spec = tiny_model("llama").spec
    p = HeadKVPolicy.for_budget(spec, 0.3, 1000, ranking=np.array([[1.0, 2.0], [4.0, 1.0]]), name="x")
    assert p.describe() == {
        "policy": "x",
        "sink": 4,
        "window": 60,
        "obs_window": 32,
        "tokens": 1200,
        "head_tokens": [min(map(min, p.budgets)), max(map(max, p.budgets))],
    }
    assert p.n_whole is None and not p.whole_mask(spec).any() and hash(p) == hash(HeadKVPolicy(**p.__dict__))
    assert p.eviction() == HeadKVEviction(p.budgets, 4, 60, 32, 7)
    with pytest.raises(ConfigError, match="ranking"):
        HeadKVPolicy.for_budget(spec, 0.3, 1000)
    with pytest.raises(ConfigError, match="shape"):
        HeadKVPolicy.for_budget(spec, 0.3, 1000, ranking=np.ones((3, 2)))
    with pytest.raises(ConfigError, match="budgets"):
        HeadKVPolicy(budgets=((5,),)).make_cache(spec)
    with pytest.raises(ConfigError, match="dense prefill"):
        HeadKVPolicy(budgets=((5, 5), (5, 5)), dense_prefill=False).make_cache(spec)


def _generate(lm, cache, ids, n=4):
    with cache.attached(lm.model, lm.spec):
        out = lm.model.generate(ids, **cache_kwargs(lm.model, cache), max_new_tokens=n, do_sample=False, pad_token_id=2)
    return out[0, ids.shape[1] :].tolist()


def test_headkv_cache_holds_a_count_per_head_and_reports_its_bytes():
    lm = tiny_model("llama", attn_implementation="sdpa")
    spec, n = lm.spec, 120
    ids = torch.randint(4, len(lm.tokenizer), (1, n), generator=torch.Generator().manual_seed(0))
    policy = HeadKVPolicy.for_budget(spec, 0.3, n, sink=4, window=8, ranking=np.array([[1.0, 2.0], [4.0, 0.5]]))
    cache = policy.make_cache(spec)
    gen = _generate(lm, cache, ids, n=4)
    assert len(gen) == 4
    kept = np.asarray(policy.budgets) + 3  # + the decode steps fed back (the last token is not)
    assert cache.tokens_per_head().tolist() == kept.tolist() and len(set(kept.flatten())) == 4
    assert len(cache.layers[0].groups()) == 2 and len(cache.layers[0].extra) == 1  # one group per count
    per_token = 2 * spec.head_dim * 4 + 4  # keys + values (float32) + the int32 position
    assert cache.nbytes() == int(kept.sum()) * per_token
    kv_after_prefill = int(np.sum(policy.budgets)) * 2 * spec.head_dim * 4
    assert kv_after_prefill <= 0.3 * full_cache_bytes(spec, n) + 1e-6
    for layer in cache.layers:  # sink and window kept by every head; positions sorted, within the prompt
        for heads, _, _, pos in layer.groups():
            assert (pos[:, :4] == torch.arange(4)).all() and (pos[:, -3 - 8 : -3] == torch.arange(n - 8, n)).all()
            assert (pos[:, 1:] > pos[:, :-1]).all() and len(heads)
    # One dense prefill loaded into the policy's cache gives the same tokens and the same kept positions.
    loaded = policy.make_cache(spec).load_prefill(dense_prefill(lm, ids[0].tolist()))
    toks = [gen[0]]
    with loaded.attached(lm.model, spec), torch.no_grad():
        for _ in range(3):
            out = lm.model(input_ids=torch.tensor([[toks[-1]]]), **cache_kwargs(lm.model, loaded), use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    assert toks == gen
    for a, b in zip(cache.layers, loaded.layers, strict=True):
        for ga, gb in zip(a.groups(), b.groups(), strict=True):
            assert torch.equal(ga.heads, gb.heads) and torch.equal(ga.pos, gb.pos)
    cache.reset()  # a cache used again starts from every cut head
    assert cache.layers[0].extra == [] and _generate(lm, cache, ids, n=4) == gen


def test_headkv_with_equal_counts_keeps_what_snapkv_keeps():
    lm = tiny_model("llama", attn_implementation="sdpa")
    ids = torch.randint(4, len(lm.tokenizer), (1, 100), generator=torch.Generator().manual_seed(1))
    snap = SnapKVPolicy(budget_tokens=30, obs_window=8).make_cache(lm.spec)
    headkv = HeadKVPolicy(budgets=((30, 30), (30, 30)), sink=0, window=8, obs_window=8).make_cache(lm.spec)
    assert _generate(lm, snap, ids) == _generate(lm, headkv, ids)
    for a, b in zip(snap.layers, headkv.layers, strict=True):
        assert torch.equal(a.ppos, b.ppos) and b.extra == []


def test_headkv_on_gemma3_cuts_only_global_layers():
    lm = tiny_model("gemma3", attn_implementation="sdpa")  # two sliding layers (window 16), one global
    ids = torch.randint(4, len(lm.tokenizer), (1, 60), generator=torch.Generator().manual_seed(2))
    policy = HeadKVPolicy.for_budget(lm.spec, 0.5, 60, sink=2, window=4, ranking=np.ones((3, 1)))
    assert policy.budgets == ((0,), (0,), (30,))
    cache = policy.make_cache(lm.spec)
    assert len(_generate(lm, cache, ids, n=3)) == 3
    assert cache.tokens_per_head().tolist() == [[15], [15], [32]]
    assert isinstance(cache, HeadSparseCache)
