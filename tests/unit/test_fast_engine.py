"""The fast engine equals the paper-faithful reference on tiny models of every architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_heads.engines import ENGINES, make_engine
from retrieval_heads.engines.base import ROW_SCORES, row_scores
from retrieval_heads.engines.capture import capture_argmax, last_row_argmax, last_row_weights
from retrieval_heads.engines.fast import FastEngine
from retrieval_heads.engines.prefix import common_prefix, reuse_targets
from retrieval_heads.engines.reference import ReferenceEngine
from retrieval_heads.needles import Needle, make_sample
from retrieval_heads.scoring import copy_events
from retrieval_heads.testing import ARCHITECTURES, tiny_model

from ..conftest import HAYSTACK

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
    Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
)
NEVER = lambda generated: False  # noqa: E731  fixed-length generation


def peaked(lm, std: float = 0.4):
    """Random tiny models attend almost uniformly (init std 0.02), so argmax is decided by 1e-7
    noise; larger query/key weights give peaked rows, like a trained model's."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lm.model.modules():
            for name in ("q_proj", "k_proj", "c_attn"):
                if hasattr(m, name):
                    w = getattr(m, name).weight
                    w.copy_(torch.randn(w.shape, generator=g) * std)
    return lm


def samples(tok, lengths=(60, 120), depths=(0.0, 50.0, 100.0), needles=NEEDLES):
    return [make_sample(tok, HAYSTACK, n, L, d, chat=False) for n in needles for L in lengths for d in depths]


def same_row_scores(a, b, msg="", atol=1e-5):
    """The attention scores of two engines' outputs agree (SDPA vs eager rounding only)."""
    assert set(a.row_scores) == set(b.row_scores) == set(ROW_SCORES)
    for name in ROW_SCORES:
        assert a.row_scores[name].shape == a.argmax.shape
        np.testing.assert_allclose(a.row_scores[name], b.row_scores[name], atol=atol, err_msg=f"{msg} {name}")
    # the question's rows of the prefill: query focus
    assert set(a.prompt_scores) == set(b.prompt_scores) == {"query_focus"}
    qa, qb = a.prompt_scores["query_focus"], b.prompt_scores["query_focus"]
    assert qa.shape == a.argmax.shape[1:] and ((qa >= 0) & (qa <= 1 + 1e-6)).all()
    np.testing.assert_allclose(qa, qb, atol=atol, err_msg=f"{msg} query_focus")


def decisions(s, out):
    return copy_events(out.argmax, out.generated_ids, s.prompt_ids, s.needle_start, s.needle_end)


def reference_outputs(lm, ss, max_new_tokens=6):
    ref = ReferenceEngine(lm)
    try:
        return [ref.run(s, max_new_tokens=max_new_tokens, stop=NEVER) for s in ss]
    finally:
        lm.model.set_attn_implementation("sdpa")


def test_registered():
    assert ENGINES["fast"] is FastEngine


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_equals_reference(arch):
    lm = peaked(tiny_model(arch, attn_implementation="sdpa"))
    ss = [
        make_sample(lm.tokenizer, HAYSTACK, NEEDLES[0], 120, 50.0, chat=False),
        make_sample(lm.tokenizer, HAYSTACK, NEEDLES[1], 60, 100.0, chat=False),
    ]
    if arch == "gemma3":
        assert lm.spec.sliding_window[0] == 16 and all(len(s.prompt_ids) > 16 for s in ss)
    refs = reference_outputs(lm, ss)
    fast = make_engine("fast", lm)
    for s, ref in zip(ss, refs, strict=True):
        out = fast.run(s, max_new_tokens=6, stop=NEVER)
        assert out.generated_ids == ref.generated_ids, s.id
        assert out.argmax.shape == ref.argmax.shape == (6, lm.spec.n_layers, lm.spec.n_heads)
        np.testing.assert_array_equal(out.argmax, ref.argmax, err_msg=s.id)
        np.testing.assert_array_equal(decisions(s, out), decisions(s, ref))
        same_row_scores(out, ref, s.id)
        assert out.row_scores["needle_mass"].max() > 0  # the answer span is really measured
    # the needle span (--span needle) is measured the same way by both engines
    for s, ref in zip(
        ss, [ReferenceEngine(lm, span="needle").run(s, max_new_tokens=4, stop=NEVER) for s in ss], strict=True
    ):
        same_row_scores(FastEngine(lm, span="needle").run(s, max_new_tokens=4, stop=NEVER), ref, s.id)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_prefix_reuse_same_decisions(arch):
    lm = peaked(tiny_model(arch, attn_implementation="sdpa"))
    ss = samples(lm.tokenizer)
    fast = FastEngine(lm, min_reuse=8)
    plain = list(fast.run_many(ss, max_new_tokens=5, stop=NEVER, prefix_reuse=False))
    reused = list(fast.run_many(ss, max_new_tokens=5, stop=NEVER, prefix_reuse=True))
    assert [s.id for s, _ in reused] == [s.id for s in ss]  # input order kept
    for (s, a), (_, b) in zip(plain, reused, strict=True):
        assert a.generated_ids == b.generated_ids, s.id
        np.testing.assert_array_equal(a.argmax, b.argmax, err_msg=s.id)
        same_row_scores(a, b, s.id)


def test_prefix_store_prefills_each_shared_token_once():
    from retrieval_heads.engines.prefix import PrefixStore

    lm = tiny_model("llama", attn_implementation="sdpa")
    ss = samples(lm.tokenizer)
    eng = FastEngine(lm)
    store = PrefixStore(lm.model, lambda full: eng.new_cache(full=full), [s.prompt_ids for s in ss], min_reuse=8)
    starts = [store.cache_for(i)[1] for i in range(len(ss))]
    assert max(starts) > 60  # the long depth-100 samples reuse most of their haystack
    assert all(st < len(s.prompt_ids) for st, s in zip(starts, ss, strict=True))
    # three prefix families (haystack first; each needle's depth-0 prompts): each prefilled once
    assert store.prefilled <= 0.4 * sum(starts)


def test_two_prefix_slots_reuse_as_much_as_four_in_grid_order_and_hold_less():
    from retrieval_heads.engines.prefix import PrefixStore

    lm = tiny_model("llama", attn_implementation="sdpa")
    ss = samples(lm.tokenizer, lengths=(60, 120, 180))  # grid order: needle by needle
    eng = FastEngine(lm)
    held, prefilled = {}, {}
    for slots in (2, 4):
        store = PrefixStore(
            lm.model, lambda full: eng.new_cache(full=full), [s.prompt_ids for s in ss], min_reuse=8, max_slots=slots
        )
        held[slots] = 0
        for i in range(len(ss)):
            store.cache_for(i)
            held[slots] = max(held[slots], sum(len(slot.ids) for slot in store.slots))
        prefilled[slots] = store.prefilled
    assert prefilled[2] == prefilled[4] and held[2] < held[4]
    assert FastEngine(lm).prefix_slots == 2


def test_common_prefix_and_targets():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    # the third prompt shares nothing; a prompt never reuses its own last token
    assert reuse_targets([[1, 2, 3], [1, 2, 3], [9, 9]]) == [2, 2, 0]


def test_sliding_window_row_covers_only_the_window():
    lm = peaked(tiny_model("gemma3", attn_implementation="sdpa"))
    s = samples(lm.tokenizer, lengths=(120,), depths=(50.0,), needles=NEEDLES[:1])[0]
    out = FastEngine(lm).run(s, max_new_tokens=4, stop=NEVER)
    n = len(s.prompt_ids)
    for t in range(4):
        q = n - 1 + t  # producing query position
        for layer, window in enumerate(lm.spec.sliding_window):
            row = out.argmax[t, layer]
            assert (row <= q).all()
            if window is not None:
                assert (row > q - window).all()


def test_last_row_argmax_gqa_mask_softcap_and_ties():
    def argmax(q, k, mask, scaling, softcap=None):
        return last_row_argmax(last_row_weights(q, k, mask, scaling, softcap), q.dtype)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g)  # [batch, head, q, dim]
    k = torch.randn(1, 2, 10, 8, generator=g)  # [batch, kv_head, key, dim]
    full = torch.repeat_interleave(k, 2, dim=1)  # repeat_kv: head h reads kv head h // 2
    logits = (q[:, :, -1:] @ full.transpose(-1, -2))[:, :, 0] * 0.3
    assert torch.equal(argmax(q, k, None, 0.3), logits.argmax(-1))
    mask = torch.ones(1, 1, 3, 10, dtype=torch.bool)
    mask[..., -1, logits.argmax(-1)[0, 0]] = False
    got = argmax(q, k, mask, 0.3)
    assert got[0, 0] != logits.argmax(-1)[0, 0]
    assert torch.equal(argmax(q, k, None, 0.3, softcap=0.5), torch.tanh(logits / 0.5).argmax(-1))
    tie = torch.zeros(1, 1, 1, 8)  # all logits equal: the lowest position wins, as torch.argmax
    assert argmax(tie, torch.randn(1, 1, 5, 8), None, 1.0).item() == 0
    close = torch.tensor([[[0.5, 0.5005]]])  # equal once rounded to bfloat16: the lower position
    assert last_row_argmax(close, torch.bfloat16).item() == 0 and last_row_argmax(close, torch.float32).item() == 1


def test_capture_restores_attention_implementation():
    lm = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(RuntimeError):
        with capture_argmax(lm.model):
            assert lm.model.config._attn_implementation != "sdpa"
            raise RuntimeError
    assert lm.model.config._attn_implementation == "sdpa"


def test_stop_rule_and_eager_model_left_as_it_was():
    """An engine switches the attention implementation only inside its calls and restores it."""
    lm = peaked(tiny_model("qwen2"))  # loaded eager
    s = samples(lm.tokenizer, lengths=(60,), depths=(50.0,), needles=NEEDLES[:1])[0]
    fast = FastEngine(lm)
    out = fast.run(s, max_new_tokens=8, stop=lambda g: len(g) == 3)
    assert len(out.generated_ids) == 3 and out.argmax.shape[0] == 3
    assert lm.model.config._attn_implementation == "eager"
    list(fast.run_many([s, s], max_new_tokens=3, stop=NEVER))
    ReferenceEngine(lm).run(s, max_new_tokens=3, stop=NEVER)
    assert lm.model.config._attn_implementation == "eager"
    sdpa = peaked(tiny_model("qwen2", attn_implementation="sdpa"))
    ref = ReferenceEngine(sdpa).run(s, max_new_tokens=3, stop=NEVER)
    assert sdpa.model.config._attn_implementation == "sdpa"
    got = fast.run(s, max_new_tokens=3, stop=NEVER)
    assert got.generated_ids == ref.generated_ids
    np.testing.assert_array_equal(got.argmax, ref.argmax)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_equals_batch_one(arch):
    """Left-padded batches (different prompt lengths, rows that stop early) give each sample the
    same generation and argmax as running it alone."""
    lm = peaked(tiny_model(arch, attn_implementation="sdpa"))
    ss = samples(lm.tokenizer, lengths=(40, 120), depths=(0.0, 100.0))  # lengths differ within a batch
    one = FastEngine(lm, batch_size=1, prefix_reuse=False)
    stop_at = {s.id: 3 + i % 3 for i, s in enumerate(ss)}  # rows stop at different steps
    alone = [one.run(s, max_new_tokens=stop_at[s.id], stop=NEVER) for s in ss]
    batched = FastEngine(lm, batch_size=3)
    assert batched.batch_size == 3
    outs = batched.run_batch(ss[:3], max_new_tokens=6, stop=NEVER)
    for s, a, b in zip(ss[:3], [one.run(s, max_new_tokens=6, stop=NEVER) for s in ss[:3]], outs, strict=True):
        assert a.generated_ids == b.generated_ids, s.id
        np.testing.assert_array_equal(a.argmax, b.argmax, err_msg=s.id)
        same_row_scores(a, b, s.id)

    # run_many: batched prefill (no reuse) and per-row prefill from shared prefixes + batched decode
    for reuse in (False, True):
        eng = FastEngine(lm, batch_size=3, min_reuse=8)
        got = {s.id: out for s, out in eng.run_many(ss, max_new_tokens=6, stop=NEVER, prefix_reuse=reuse)}
        assert list(got) == [s.id for s in ss]  # input order kept
        if reuse:
            assert eng.prefill_stats["prefilled"] < 0.8 * eng.prefill_stats["prompt_tokens"]  # reuse happened
        for s, a in zip(ss, alone, strict=True):
            b = got[s.id]
            k = stop_at[s.id]
            assert b.generated_ids[:k] == a.generated_ids, (reuse, s.id)
            np.testing.assert_array_equal(b.argmax[:k], a.argmax, err_msg=f"{reuse} {s.id}")
            for name in ROW_SCORES:
                np.testing.assert_allclose(b.row_scores[name][:k], a.row_scores[name], atol=1e-5)
    assert len({len(s.prompt_ids) for s in ss[:3]}) > 1


def test_batched_rows_stop_independently():
    lm = peaked(tiny_model("llama", attn_implementation="sdpa"))
    ss = samples(lm.tokenizer, lengths=(40, 120), depths=(0.0,))[:2]

    def stop_after_two(generated):  # stops every row after its 2nd token
        return len(generated) >= 2

    alone = [FastEngine(lm).run(s, max_new_tokens=6, stop=stop_after_two) for s in ss]
    eng = FastEngine(lm, batch_size=2)
    for outs in (
        eng.run_batch(ss, max_new_tokens=6, stop=stop_after_two),
        eng.run_batch(ss, max_new_tokens=6, stop=stop_after_two, caches=[(None, 0), (None, 0)]),
    ):
        for a, b in zip(alone, outs, strict=True):
            assert len(b.generated_ids) == 2 and b.argmax.shape[0] == 2
            assert a.generated_ids == b.generated_ids
            np.testing.assert_array_equal(a.argmax, b.argmax)


def test_auto_batch_size_is_one_on_cpu():
    from retrieval_heads.engines.fast import auto_batch_size

    assert auto_batch_size("cpu") == 1 and auto_batch_size("cuda:0") == 8
    with pytest.raises(ValueError):
        FastEngine(tiny_model("llama", attn_implementation="sdpa"), batch_size=0)


def test_row_scores_by_hand():
    """One row, two heads, keys at positions 0..7, span [3, 6) (k = 3), query at 7, window 2, sink 1."""
    w = torch.tensor(
        [[[0.05, 0.05, 0.10, 0.30, 0.05, 0.20, 0.15, 0.10], [0.40, 0.00, 0.00, 0.10, 0.10, 0.10, 0.00, 0.30]]]
    )
    key_pos = torch.arange(8)[None]
    got = row_scores(w, key_pos, torch.tensor([7]), torch.tensor([[3, 6]]), window=2, sink=1)
    topk, needle, distant = got[:, 0]
    # head 0: top-3 keys are 3 (0.30), 5 (0.20), 6 (0.15): in span 0.30 + 0.20
    # head 1: top-3 keys are 0 (0.40), 7 (0.30), then 3/4/5 tie at 0.10: one of them (lowest index first)
    assert topk.tolist() == pytest.approx([0.50, 0.10])
    assert needle.tolist() == pytest.approx([0.55, 0.30])
    # distant: keys at positions >= sink (1) and <= query - window (5): positions 1..5
    assert distant.tolist() == pytest.approx([0.70, 0.30])
    # padding keys (negative positions) never count
    padded = row_scores(
        torch.cat([torch.full((1, 2, 2), 0.0), w], -1),
        torch.arange(-2, 8)[None],
        torch.tensor([7]),
        torch.tensor([[3, 6]]),
        window=2,
        sink=1,
    )
    assert torch.allclose(padded, got)


def test_query_focus_by_hand():
    from retrieval_heads.engines.base import query_focus

    # one head, two question rows; keys at positions 0..5; document [1, 5), span [2, 4)
    w = torch.tensor(
        [
            [
                [0.5, 0.1, 0.2, 0.1, 0.1, 0.0],  # on document 0.5, on span 0.3 -> 0.6
                [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            ]
        ]
    )  # nothing on the document -> 0
    got = query_focus(w, torch.arange(6), (2, 4), (1, 5))
    assert got.tolist() == pytest.approx([0.3])  # mean of 0.6 and 0


def test_attention_scores_aggregate_by_hand():
    from retrieval_heads.scoring import attention_scores

    steps = {
        "topk_mass": np.array([[[0.5]], [[0.25]]]),
        "needle_mass": np.array([[[0.6]], [[0.2]]]),
        "distant_mass": np.array([[[1.0]], [[0.0]]]),
    }
    got = attention_scores(steps, span_len=3)
    assert got["topk_mass"][0, 0] == pytest.approx(0.75 / 3)  # summed over tokens / span length
    assert got["needle_mass"][0, 0] == pytest.approx(0.4)  # mean over tokens
    assert got["distant_mass"][0, 0] == pytest.approx(0.5)
