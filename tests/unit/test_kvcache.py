"""Head-sparse KV cache on tiny models: exactness, real byte savings, windows, GQA scores,
exports, the kv-eval experiment end to end and bad CLI input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_heads.compat import cache_kwargs
from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.heads import rank_heads
from retrieval_heads.kvcache import (
    FullPolicy,
    HeadPolicy,
    HeadSparseCache,
    KVPolicy,
    SinkWindowEviction,
    SinkWindowPolicy,
    SnapKVEviction,
    SnapKVPolicy,
    Step,
    export_authors_json,
    export_duo_pattern,
    export_duo_tsv,
    full_cache_bytes,
    kv_head_scores,
    pattern_values,
    query_heads,
    random_kv_scores,
    read_duo_pattern,
    read_duo_tsv,
    top_mask,
)
from retrieval_heads.scorefile import read_scores
from retrieval_heads.testing import tiny_model

N_PROMPT = 120


def _ids(lm, n=N_PROMPT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, len(lm.tokenizer), (1, n), generator=g)


def _greedy(lm, cache, ids, n=8):
    """Greedy tokens and the logits of every step, prompt in one forward."""
    toks, logits = [], []
    with cache.attached(lm.model), torch.no_grad():
        out = lm.model(input_ids=ids, **cache_kwargs(lm.model, cache), use_cache=True)
        for _ in range(n):
            logits.append(out.logits[0, -1])
            toks.append(int(out.logits[0, -1].argmax()))
            out = lm.model(input_ids=torch.tensor([[toks[-1]]]), **cache_kwargs(lm.model, cache), use_cache=True)
    return toks, torch.stack(logits)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def lm(request):
    return tiny_model(request.param, attn_implementation="sdpa")


@pytest.mark.parametrize("dense_prefill", [True, False])
def test_all_heads_whole_is_bit_identical_to_the_full_cache(lm, dense_prefill):
    ids = _ids(lm)
    ref = lm.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=2)
    cache = FullPolicy(dense_prefill=dense_prefill).make_cache(lm.spec)
    own = lm.model.config._attn_implementation
    with cache.attached(lm.model):
        out = lm.model.generate(
            ids, **cache_kwargs(lm.model, cache), max_new_tokens=10, do_sample=False, pad_token_id=2
        )
    assert lm.model.config._attn_implementation == own  # restored
    assert out.tolist() == ref.tolist()
    assert cache.nbytes() == full_cache_bytes(lm.spec, ids.shape[1] + 9)


def test_bytes_shrink_by_the_expected_amount(lm):
    spec, ids = lm.spec, _ids(lm)
    L, K, D, T = spec.n_layers, spec.n_kv_heads, spec.head_dim, N_PROMPT
    sw = SinkWindowPolicy(sink=4, window=16).make_cache(spec)
    _greedy(lm, sw, ids, n=1)  # prompt + one decode token (it is evicted again: the window slides)
    # keys + values float32 plus int32 positions, sink + window tokens per head
    assert sw.nbytes() == L * K * 20 * (2 * D * 4 + 4)
    assert (sw.tokens_per_head() == 20).all()
    scores = np.arange(L * K, dtype=float).reshape(L, K)
    hp = HeadPolicy(whole=top_mask(scores, 1), rest=SinkWindowPolicy(sink=4, window=16)).make_cache(spec)
    _greedy(lm, hp, ids, n=1)
    whole = (T + 1) * 2 * D * 4
    assert hp.nbytes() == whole + (L * K - 1) * 20 * (2 * D * 4 + 4)
    assert hp.tokens_per_head()[L - 1, K - 1] == T + 1  # the best-ranked head is whole
    assert hp.nbytes() < full_cache_bytes(spec, T + 1)


def test_cut_heads_see_only_sink_and_window():
    # One layer, every head cut, no dense prefill: the last position's logits depend only on
    # the sink and the window, so changing a token in between changes nothing.
    lm = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=1)
    a, b = _ids(lm, 60), _ids(lm, 60)
    b[0, :] = a[0, :]
    b[0, 20] = (a[0, 20] + 1) % len(lm.tokenizer)  # outside sink (4) and window (16 + itself)
    pol = SinkWindowPolicy(sink=4, window=16, dense_prefill=False)
    _, la = _greedy(lm, pol.make_cache(lm.spec), a, n=2)
    _, lb = _greedy(lm, pol.make_cache(lm.spec), b, n=2)
    assert torch.equal(la, lb)
    _, fa = _greedy(lm, FullPolicy().make_cache(lm.spec), a, n=2)
    _, fb = _greedy(lm, FullPolicy().make_cache(lm.spec), b, n=2)
    assert not torch.equal(fa, fb)  # the full cache does see the change
    c = pol.make_cache(lm.spec)
    _greedy(lm, c, a, n=1)
    pos = sorted(c.layers[0].ppos[0].tolist())
    assert pos == [0, 1, 2, 3, *range(61 - 16, 61)]


def test_cut_heads_match_a_masked_reference():
    # Chunked prefill: each query of a cut head attends exactly to sink + the last `window` keys.
    lm = tiny_model("llama", attn_implementation="eager", num_hidden_layers=1)
    ids = _ids(lm, 40)
    sink, window = 2, 8
    with torch.no_grad():
        cache = SinkWindowPolicy(sink=sink, window=window, dense_prefill=False).make_cache(lm.spec)
        with cache.attached(lm.model):
            got = lm.model(input_ids=ids, **cache_kwargs(lm.model, cache), use_cache=True).logits
        n = ids.shape[1]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j <= i) & ((j < sink) | (j >= i - window))
        mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]
        ref = lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize(
    "policy",
    [
        SinkWindowPolicy(sink=4, window=16),
        SnapKVPolicy(budget_tokens=40),
        HeadPolicy(whole=top_mask(np.array([[1.0, 0.0], [0.0, 1.0]]), 2), rest=SinkWindowPolicy(window=16)),
    ],
)
def test_load_prefill_equals_compressing_after_own_prefill(policy):
    lm = tiny_model("llama", attn_implementation="sdpa")
    ids = _ids(lm)
    a, _la = _greedy(lm, policy.make_cache(lm.spec), ids)
    dense = HeadSparseCache(np.ones((2, 2), bool), record_obs=32)
    with dense.attached(lm.model), torch.no_grad():
        first = lm.model(input_ids=ids, **cache_kwargs(lm.model, dense), use_cache=True).logits[0, -1]
    c = policy.make_cache(lm.spec).load_prefill(dense)
    toks, tok = [], int(first.argmax())
    with c.attached(lm.model), torch.no_grad():
        for _ in range(8):
            toks.append(tok)
            tok = int(
                lm.model(input_ids=torch.tensor([[tok]]), **cache_kwargs(lm.model, c), use_cache=True)
                .logits[0, -1]
                .argmax()
            )
    assert toks == a
    assert dense.nbytes() == full_cache_bytes(lm.spec, N_PROMPT)  # untouched


def test_snapkv_keeps_its_budget_per_head():
    lm = tiny_model("llama", attn_implementation="sdpa")
    c = SnapKVPolicy(budget_tokens=40, obs_window=8).make_cache(lm.spec)
    _greedy(lm, c, _ids(lm), n=3)
    assert (c.tokens_per_head() == 40 + 3).all()  # + the 3 decode steps fed
    pos = c.layers[0].ppos
    assert (pos[:, 32:40] == torch.arange(N_PROMPT - 8, N_PROMPT)).all()  # observation window kept


def test_gqa_kv_head_score_is_the_max_of_its_query_heads():
    lm = tiny_model("llama")  # 2 layers, 4 query heads, 2 KV heads
    s = np.array([[0.1, 0.7, 0.2, np.nan], [np.nan, np.nan, 0.0, 0.3]])
    kv = kv_head_scores(s, lm.spec)
    assert kv[0].tolist() == [0.7, 0.2] and np.isnan(kv[1, 0]) and kv[1, 1] == 0.3
    assert rank_heads(kv) == [(0, 0), (1, 1), (0, 1), (1, 0)]
    assert top_mask(kv, 2).tolist() == [[True, False], [False, True]]
    with pytest.raises(ConfigError, match="shape"):
        kv_head_scores(np.zeros((3, 4)), lm.spec)
    assert np.array_equal(random_kv_scores(lm.spec, 1), random_kv_scores(lm.spec, 1))


def test_budget_solver_is_the_largest_count_within_budget():
    """Within budget, and maximal: one more whole KV head would exceed it (unless all are whole)."""
    spec = tiny_model("llama").spec
    n = spec.n_layers * spec.n_kv_heads

    def cost(k: int, n_tokens: int, part: int) -> int:
        return k * n_tokens + (n - k) * min(part, n_tokens)

    for n_tokens in (50, 64, 65, 1000, 4096):
        for b in (0.0, 0.01, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0):
            k = HeadPolicy.n_whole_for(spec, b, n_tokens, 4, 60)
            assert 0 <= k <= n
            if n_tokens > 64 and cost(0, n_tokens, 64) > b * n * n_tokens:
                assert k == 0  # even sink + window everywhere exceeds the budget: none whole
            elif n_tokens > 64:
                assert cost(k, n_tokens, 64) <= b * n * n_tokens + 1e-6, (n_tokens, b, k)
                assert k == n or cost(k + 1, n_tokens, 64) > b * n * n_tokens + 1e-6, (n_tokens, b, k)
            else:  # sink + window covers the context: every head is whole at no extra cost
                assert k == n


def test_exports_round_trip(tmp_path):
    kv = np.array([[0.5, 0.0], [0.25, 1.0], [0.0, 0.125]])
    export_authors_json(tmp_path / "kv.json", kv)
    back = read_scores(tmp_path / "kv.json")  # the authors' reader accepts it
    assert back.shape == (1, 3, 2) and np.array_equal(back[0], kv)
    whole = top_mask(kv, 2)
    export_duo_tsv(tmp_path / "heads.tsv", whole)
    assert (tmp_path / "heads.tsv").read_text() == "1\t0\n0\t1\n0\t0\n"
    assert np.array_equal(read_duo_tsv(tmp_path / "heads.tsv"), whole)
    # DuoAttention/kvpress pattern: rank values in [0, 1] (ties keep our order), config beside it
    folder = export_duo_pattern(tmp_path / "pattern", kv, sink=4, recent=60, about={"score": "copy"})
    values, config = read_duo_pattern(folder)
    assert config == {"sink_size": 4, "recent_size": 60, "source": "retrieval-heads export-heads", "score": "copy"}
    assert values.tolist() == pattern_values(kv).tolist() == [[0.8, 0.2], [0.6, 1.0], [0.0, 0.4]]
    assert [tuple(h) for h in rank_heads(values)] == [tuple(h) for h in rank_heads(kv)]
    assert np.array_equal(read_duo_pattern(folder / "full_attention_heads.tsv")[0], values)
    np.testing.assert_array_equal(np.loadtxt(folder / "full_attention_heads.tsv", delimiter="\t"), values)
    with pytest.raises(DataError, match="not found"):
        read_duo_pattern(tmp_path / "nowhere")


def test_bad_cache_configs():
    with pytest.raises(ConfigError):
        HeadSparseCache(np.ones((2, 2), bool), eviction="h2o")
    with pytest.raises(ConfigError):
        HeadSparseCache(np.ones((2, 2), bool), SinkWindowEviction(window=0))
    with pytest.raises(ConfigError, match="budget"):
        SnapKVEviction(budget=0)
    with pytest.raises(ConfigError, match="dense prefill"):
        SnapKVPolicy(budget_tokens=8, dense_prefill=False).make_cache(tiny_model("llama").spec)
    lm = tiny_model("gemma3")
    with pytest.raises(ConfigError, match="sliding"):  # a cache planned without the model's windows
        with HeadSparseCache(np.ones((3, 1), bool)).attached(lm.model):
            pass
    with pytest.raises(ConfigError, match="windows"):
        HeadSparseCache(np.ones((3, 1), bool), windows=(16, None))


# ----------------------------------------------------------------------------------- policies, evictions
POLICY_CLASSES = (FullPolicy, SinkWindowPolicy, SnapKVPolicy, HeadPolicy)


def test_every_policy_has_one_for_budget_signature():
    import inspect

    sigs = {cls: inspect.signature(cls.for_budget) for cls in POLICY_CLASSES}
    assert len({str(sig).replace(f"'{cls.__name__}'", "P") for cls, sig in sigs.items()}) == 1, sigs
    lm = tiny_model("llama")
    spec, n = lm.spec, 1000
    ranking = np.array([[0.1, 0.9], [0.5, np.nan]])
    for cls in POLICY_CLASSES:
        p = cls.for_budget(spec, 0.3, n, sink=4, window=60, ranking=ranking, name="x", dense_prefill=True)
        assert isinstance(p, cls) and isinstance(p, KVPolicy) and p.describe()["policy"] == "x"
        p.make_cache(spec)
    # Sizes and describe() keys as before (they go into run configs).
    assert SinkWindowPolicy.for_budget(spec, 0.3, n, sink=4, window=60).describe() == {
        "policy": "sink_window",
        "sink": 4,
        "window": 296,
    }
    assert SnapKVPolicy.for_budget(spec, 0.3, n).describe() == {
        "policy": "snapkv",
        "budget_tokens": 300,
        "obs_window": 32,
    }
    hp = HeadPolicy.for_budget(spec, 0.3, n, sink=4, window=60, ranking=ranking, name="retrieval")
    assert hp.describe() == {
        "policy": "retrieval",
        "sink": 4,
        "window": 60,
        "n_whole": HeadPolicy.n_whole_for(spec, 0.3, n, 4, 60),
    }
    assert FullPolicy().describe() == {"policy": "full", "sink": 4, "window": 64}
    assert FullPolicy().n_whole is None and SinkWindowPolicy().n_whole is None and hp.n_whole == 1
    assert hp.whole_mask(spec).tolist() == [[False, True], [False, False]]
    with pytest.raises(ConfigError, match="ranking"):
        HeadPolicy.for_budget(spec, 0.3, n)
    with pytest.raises(ConfigError, match="shape"):
        HeadPolicy.for_budget(spec, 0.3, n, ranking=np.zeros((3, 2)))


def test_nan_is_never_ranked_above_a_scored_head():
    # Scores below -1 once lost to NaN (NaN became -1.0); NaN means "not scored" and ranks last.
    spec = tiny_model("llama").spec  # 2 layers x 2 KV heads
    ranking = np.array([[np.nan, -2.0], [-3.0, np.nan]])
    budget = 0.55  # two whole KV heads at 1000 tokens with sink + window = 64
    assert HeadPolicy.n_whole_for(spec, budget, 1000, 4, 60) == 2
    hp = HeadPolicy.for_budget(spec, budget, 1000, sink=4, window=60, ranking=ranking)
    assert hp.whole_mask(spec).tolist() == [[False, True], [True, False]]
    assert np.isnan(ranking).sum() == 2  # the caller's scores are untouched
    assert HeadPolicy.for_budget(spec, 0.45, 1000, sink=4, window=60, ranking=ranking).whole_mask(spec).tolist() == [
        [False, True],
        [False, False],
    ]


def test_head_policy_composes_with_any_rest():
    lm = tiny_model("llama", attn_implementation="sdpa")
    whole = np.array([[True, False], [False, False]])
    snap = HeadPolicy(name="retrieval+snapkv", whole=whole, rest=SnapKVPolicy(budget_tokens=40, obs_window=8))
    assert snap.describe() == {"policy": "retrieval+snapkv", "budget_tokens": 40, "obs_window": 8, "n_whole": 1}
    assert isinstance(snap.eviction(), SnapKVEviction) and hash(snap) == hash(
        HeadPolicy(name="retrieval+snapkv", whole=whole.tolist(), rest=SnapKVPolicy(budget_tokens=40, obs_window=8))
    )
    c = snap.make_cache(lm.spec)
    _greedy(lm, c, _ids(lm), n=3)
    assert c.tokens_per_head().tolist() == [[N_PROMPT + 3, 43], [43, 43]]
    sw = HeadPolicy(whole=whole, rest=SinkWindowPolicy(sink=2, window=10)).make_cache(lm.spec)
    _greedy(lm, sw, _ids(lm), n=3)
    assert sw.tokens_per_head().tolist() == [[N_PROMPT + 3, 12], [12, 12]]
    with pytest.raises(ConfigError, match="shape"):
        HeadPolicy(whole=[True, False])


def test_query_heads_is_the_spec_gqa_map():
    spec = tiny_model("llama").spec  # 4 query heads, 2 KV heads
    for kv in range(spec.n_kv_heads):
        assert query_heads(torch.tensor([kv]), spec.group_size).tolist() == spec.query_heads_of(kv)
    assert query_heads(torch.tensor([0, 1]), spec.group_size).tolist() == [0, 1, 2, 3]


def test_attached_restores_the_attention_implementation_after_an_error():
    lm = tiny_model("llama", attn_implementation="sdpa")
    cache = SinkWindowPolicy(sink=2, window=8).make_cache(lm.spec)
    with pytest.raises(RuntimeError, match="boom"):
        with cache.attached(lm.model, lm.spec):
            assert lm.model.config._attn_implementation != "sdpa"
            raise RuntimeError("boom")
    assert lm.model.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="layers"):
        with HeadSparseCache(np.ones((3, 2), bool)).attached(lm.model):
            pass


def test_each_update_is_consumed_by_one_attention_step():
    lm = tiny_model("llama", attn_implementation="sdpa")
    cache = SinkWindowPolicy(sink=2, window=8).make_cache(lm.spec)
    seen = []
    own = cache.layers[0].update

    def update(*a, **kw):
        out = own(*a, **kw)
        seen.append(cache.layers[0].pending)
        return out

    cache.layers[0].update = update
    _greedy(lm, cache, _ids(lm, 20), n=2)
    assert seen == [Step.DENSE, Step.SPARSE, Step.SPARSE]
    assert all(layer.pending is None for layer in cache.layers)  # the attention function consumed each step


def test_split_at_marks_the_question():
    from retrieval_heads.kvcache.measure import split_at

    lm = tiny_model("llama")
    prompt = "a b c\n\nQuestion: d e"
    ids, split = split_at(lm.tokenizer, prompt, "\n\nQuestion: ")
    enc = lm.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    assert list(ids) == enc["input_ids"]
    starts = [s for s, _ in enc["offset_mapping"]]
    c = prompt.index("\n\nQuestion: ")
    assert starts[split] >= c and starts[split - 1] < c  # the first token of the question part
    with pytest.raises(ConfigError, match="cannot split"):
        split_at(lm.tokenizer, "no question here", "\n\nQuestion: ")


# ----------------------------------------------------------------------------------- sliding-window layers
@pytest.mark.parametrize("dense_prefill", [True, False])
def test_gemma3_full_policy_matches_the_models_own_cache(dense_prefill):
    """Gemma3 (sliding layers of window 16, one global layer): with every head whole the cache gives
    the model's own tokens; sliding layers hold their last window - 1 tokens as transformers' does."""
    lm = tiny_model("gemma3", attn_implementation="sdpa")
    ids = _ids(lm, 60)
    ref = lm.model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=2)
    cache = FullPolicy(dense_prefill=dense_prefill).make_cache(lm.spec)
    with cache.attached(lm.model):
        out = lm.model.generate(
            ids, **cache_kwargs(lm.model, cache), max_new_tokens=10, do_sample=False, pad_token_id=2
        )
    assert out.tolist() == ref.tolist()
    assert cache.tokens_per_head().tolist() == [[15], [15], [69]]
    positions = 2 * 15 * 4  # the int32 positions of the two sliding layers' heads
    assert cache.nbytes() == full_cache_bytes(lm.spec, 69) + positions


def test_gemma3_head_policy_cuts_only_global_layers():
    """The budget counts the global layers (as kvpress does); sliding layers are never chosen or cut
    beyond their window; a dense prefill loaded into the policy's cache matches its own prefill."""
    from retrieval_heads.kvcache.measure import dense_prefill

    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    lm = tiny_model("gemma3", attn_implementation="sdpa", num_hidden_layers=4, num_key_value_heads=2, layer_types=types)
    spec = lm.spec
    assert spec.sliding_window == (16, None, 16, None) and spec.n_kv_heads == 2
    ranking = np.array([[9.0, 9.0], [0.1, 0.7], [9.0, 9.0], [0.5, 0.2]])
    assert HeadPolicy.n_whole_for(spec, 0.6, 200, 4, 10) == 2  # of the 4 global heads
    policy = HeadPolicy.for_budget(spec, 0.6, 200, sink=4, window=10, ranking=ranking)
    assert policy.whole_mask(spec).tolist() == [[False, False], [False, True], [False, False], [True, False]]
    assert full_cache_bytes(spec, 200) == 2 * (2 * 15 + 2 * 200) * 2 * spec.head_dim * 4
    ids = _ids(lm, 40)[0].tolist()
    with torch.no_grad():
        own = policy.make_cache(spec)
        with own.attached(lm.model, spec):
            lm.model(input_ids=torch.tensor([ids]), **cache_kwargs(lm.model, own), use_cache=True)
    loaded = policy.make_cache(spec).load_prefill(dense_prefill(lm, ids))
    for cache in (own, loaded):
        assert cache.tokens_per_head().tolist() == [[15, 15], [14, 40], [15, 15], [40, 14]]
    for a, b in zip(own.layers, loaded.layers, strict=True):
        torch.testing.assert_close(a.pkeys, b.pkeys)
