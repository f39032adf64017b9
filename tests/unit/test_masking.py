"""mask_heads on tiny random models of every supported architecture, SDPA and eager."""

from __future__ import annotations

import pytest
import torch

from retrieval_heads.compat import cache_kwargs, output_cache
from retrieval_heads.errors import ConfigError
from retrieval_heads.masking import attention_parts, head_means, mask_heads
from retrieval_heads.testing import ARCHITECTURES, tiny_model

torch.set_num_threads(2)
SEQ = 40  # longer than gemma3's tiny sliding window (16)
IMPLS = ("eager", "sdpa")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch: str, impl: str):
        if (arch, impl) not in cache:
            cache[(arch, impl)] = tiny_model(arch, attn_implementation=impl)
        return cache[(arch, impl)]

    return get


def _ids(lm, n: int = SEQ, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, len(lm.tokenizer), (1, n), generator=g)  # [batch=1, seq]


@torch.no_grad()
def head_outputs(model, ids, **kw):
    """Per layer, the concatenated head outputs `[batch, seq, n_heads, head_dim]` (o_proj input),
    seen after any masking hook, plus the logits."""
    parts = attention_parts(model)
    got = [None] * len(parts)
    handles = []
    for l, p in enumerate(parts):

        def hook(_m, args, l=l, p=p):
            got[l] = args[0].unflatten(-1, (p.n_heads, p.head_dim)).clone()

        handles.append(p.o_proj.register_forward_pre_hook(hook))
    try:
        out = model(input_ids=ids, **kw)
    finally:
        for h in handles:
            h.remove()
    return got, out


def _check_only_head_changed(base, masked, layer: int, head: int) -> None:
    for l, (b, m) in enumerate(zip(base, masked, strict=True)):
        if l < layer:
            assert torch.equal(b, m), f"layer {l} before the masked layer changed"
        elif l == layer:
            others = [h for h in range(b.shape[2]) if h != head]
            assert torch.equal(b[:, :, others], m[:, :, others]), "another head of the masked layer changed"
            assert not torch.equal(b[:, :, head], m[:, :, head]), "the masked head did not change"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["uniform", "zero", "mean"])
def test_only_the_masked_head_changes(models, arch, impl, method):
    lm = models(arch, impl)
    ids = _ids(lm)
    base, base_out = head_outputs(lm.model, ids)
    means = head_means(lm.model, _ids(lm, seed=7)) if method == "mean" else None
    # head 1 shares its KV head with head 0 in every tiny GQA model (llama/qwen2: 2 KV, mistral/gemma3: 1 KV)
    layer, head = 1, 1
    with mask_heads(lm.model, [(layer, head)], method, means=means):
        masked, masked_out = head_outputs(lm.model, ids)
    _check_only_head_changed(base, masked, layer, head)
    assert not torch.equal(base_out.logits, masked_out.logits)
    if method == "zero":
        assert torch.count_nonzero(masked[layer][:, :, head]) == 0
    if method == "mean":
        assert torch.allclose(masked[layer][0, :, head], means[layer, head].expand(SEQ, -1))
    # hooks are gone after the block
    _after, after_out = head_outputs(lm.model, ids)
    assert torch.equal(after_out.logits, base_out.logits)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_masking_nothing_changes_nothing(models, arch, impl):
    lm = models(arch, impl)
    ids = _ids(lm)
    _, base = head_outputs(lm.model, ids)
    for method in ("uniform", "zero"):
        with mask_heads(lm.model, [], method) as chosen:
            _, out = head_outputs(lm.model, ids)
        assert chosen == []
        assert torch.equal(base.logits, out.logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_uniform_attends_uniformly_over_visible_keys(models, arch):
    """Eager weights of the masked head are 1/n over exactly the keys the head could see
    (causal mask, and the sliding window on gemma3's sliding layers)."""
    lm = models(arch, "eager")
    ids = _ids(lm)
    _, base = head_outputs(lm.model, ids, output_attentions=True)
    for layer in range(lm.spec.n_layers):
        head = 2
        with mask_heads(lm.model, [(layer, head)], "uniform"):
            _, out = head_outputs(lm.model, ids, output_attentions=True)
        w0 = base.attentions[layer][0, head]  # [query_pos, key_pos]
        w1 = out.attentions[layer][0, head]
        visible = w0 > 0
        expected = visible.float() / visible.sum(-1, keepdim=True)
        assert torch.allclose(w1, expected, atol=1e-6)
        window = lm.spec.sliding_window[layer]
        if window is not None:
            assert int(visible[-1].sum()) <= window < SEQ


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_output_is_mean_of_visible_values(models, impl):
    """Head output = mean of the value vectors at positions <= q (llama, GQA: head 1 reads KV head 0)."""
    lm = models("llama", impl)
    ids = _ids(lm)
    parts = attention_parts(lm.model)
    layer, head = 0, 1
    v_cap = {}
    h = lm.model.model.layers[layer].self_attn.v_proj.register_forward_hook(
        lambda m, a, o: v_cap.setdefault("v", o.clone())
    )
    try:
        with mask_heads(lm.model, [(layer, head)], "uniform"):
            masked, _ = head_outputs(lm.model, ids)
    finally:
        h.remove()
    d = parts[layer].head_dim
    kv = lm.spec.kv_head_of(head)
    v = v_cap["v"][0, :, kv * d : (kv + 1) * d]  # [seq, head_dim]
    running = v.cumsum(0) / torch.arange(1, SEQ + 1).unsqueeze(1)
    assert torch.allclose(masked[layer][0, :, head], running, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_phase_decode_masks_only_single_token_steps(models, arch, impl):
    lm = models(arch, impl)
    ids = _ids(lm)
    model = lm.model
    with torch.no_grad():
        pre = model(input_ids=ids[:, :-1], use_cache=True)
        base_step, base_out = head_outputs(
            model, ids[:, -1:], **cache_kwargs(model, output_cache(model, pre)), use_cache=True
        )
    layer, head = 1, 0
    with mask_heads(model, [(layer, head)], "uniform", phase="decode"):
        with torch.no_grad():
            pre_m = model(input_ids=ids[:, :-1], use_cache=True)
        assert torch.equal(pre.logits, pre_m.logits), "prefill was masked in phase 'decode'"
        step, out = head_outputs(model, ids[:, -1:], **cache_kwargs(model, output_cache(model, pre_m)), use_cache=True)
    _check_only_head_changed(base_step, step, layer, head)
    assert not torch.equal(base_out.logits, out.logits)


def test_hooks_removed_on_error(models):
    lm = models("llama", "eager")
    before = sum(len(p.q_proj._forward_hooks) + len(p.o_proj._forward_pre_hooks) for p in attention_parts(lm.model))
    with pytest.raises(RuntimeError):
        with mask_heads(lm.model, [(0, 0), (1, 3)], "uniform"):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with mask_heads(lm.model, [(0, 0)], "zero"):
            raise RuntimeError("boom")
    after = sum(len(p.q_proj._forward_hooks) + len(p.o_proj._forward_pre_hooks) for p in attention_parts(lm.model))
    assert before == after


@pytest.mark.parametrize(
    "heads,method,match",
    [
        ([(0, 0)], "gaussian", "unknown masking method"),
        ([(5, 0)], "zero", "outside the model"),
        ([(0, 4)], "zero", "outside the model"),
        ([(0, 0)], "mean", "needs per-head mean"),
    ],
)
def test_bad_input(models, heads, method, match):
    lm = models("llama", "eager")
    with pytest.raises(ConfigError, match=match):
        with mask_heads(lm.model, heads, method):
            pass


ROWS = ([], [(0, 1)], [(1, 2), (0, 0)], [(0, 1), (1, 1), (1, 3)])  # a row of nothing, one head, several


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["uniform", "zero", "mean"])
def test_each_row_of_a_batch_is_masked_as_it_is_alone(models, arch, method):
    """mask_rows: row b of a batch sees exactly what a batch of one sees under mask_heads(rows[b]),
    also after rows leave the batch (`select`)."""
    from retrieval_heads.masking import mask_rows

    lm = models(arch, "sdpa")
    ids = _ids(lm)
    means = head_means(lm.model, _ids(lm, seed=5)) if method == "mean" else None
    alone = []
    for heads in ROWS:
        with mask_heads(lm.model, heads, method, means=means):
            alone.append(head_outputs(lm.model, ids)[0])
    batch = ids.expand(len(ROWS), -1)
    with mask_rows(lm.model, ROWS, method, means=means) as live:
        together = head_outputs(lm.model, batch)[0]
        live.select(torch.tensor([3, 1]))
        kept = head_outputs(lm.model, batch[:2])[0]
    for b in range(len(ROWS)):
        for l, got in enumerate(together):
            torch.testing.assert_close(got[b], alone[b][l][0], rtol=0, atol=1e-5)
    for i, b in enumerate([3, 1]):
        for l, got in enumerate(kept):
            torch.testing.assert_close(got[i], alone[b][l][0], rtol=0, atol=1e-5)
    assert not torch.allclose(alone[0][1][0], alone[2][1][0])  # the rows are masked differently


def test_mask_rows_refuses_bad_heads_and_missing_means(models):
    from retrieval_heads.masking import mask_rows

    lm = models("llama", "eager")
    with pytest.raises(ConfigError, match="outside"), mask_rows(lm.model, [[], [(9, 0)]]):
        pass
    with pytest.raises(ConfigError, match="per-head mean outputs"), mask_rows(lm.model, [[(0, 0)]], "mean"):
        pass
