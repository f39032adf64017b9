"""The masked-task runner: greedy generation with the watched heads' argmax rows, SDPA prefill and
eager decode equal to eager throughout, prompts that do not fit the context refused."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_heads.decoding import StopRule
from retrieval_heads.errors import ConfigError
from retrieval_heads.experiments.masked_task import generate, prompts
from retrieval_heads.needles import Needle, make_sample
from retrieval_heads.tasks.registry import get_task
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
)


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_sdpa_prefill_eager_decode_matches_eager(arch, haystack_file):
    from retrieval_heads.needles import load_haystack

    a = tiny_model(arch, attn_implementation="sdpa")
    b = tiny_model(arch, attn_implementation="eager")
    s = make_sample(a.tokenizer, load_haystack(haystack_file), NEEDLES[0], 80, 50, chat=False)
    watch = [(0, 1), (1, 2)]
    ga, wa = generate(a, s.prompt_ids, 6, StopRule(a.tokenizer), watch)
    gb, wb = generate(b, s.prompt_ids, 6, StopRule(b.tokenizer), watch)
    assert ga == gb and np.array_equal(wa, wb)
    assert a.model.config._attn_implementation == "sdpa"  # restored after decoding


def test_a_prompt_without_room_for_its_answer_is_refused(haystack_file):
    lm = tiny_model("llama")
    task = get_task("niah", needles=NEEDLES, lengths=(80,), depths=(50.0,), path=str(haystack_file))
    task.prepare(lm.tokenizer, False)
    docs = task.docs(1, 0, len)
    assert len(prompts(lm, task, docs, "answer-only", False)[0].ids) > 80
    small = lm.spec.__class__(**{**lm.spec.__dict__, "max_context": 90})
    with pytest.raises(ConfigError, match="exceeds"):
        prompts(type(lm)(**{**lm.__dict__, "spec": small}), task, docs, "answer-only", False)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])  # gemma3: sliding windows shorter than the prompt
def test_rows_decode_what_each_decodes_alone_and_leave_when_they_stop(arch):
    """greedy_rows: each row's tokens equal greedy_with_attentions on its own (no mask: the same
    ids), up to its own stop; the prefix cache is left untouched for the next batch."""
    import copy

    import torch

    from retrieval_heads.decoding import greedy_rows, greedy_with_attentions, prefill_prefix

    lm = tiny_model(arch, attn_implementation="eager", seed=3)
    ids = torch.randint(4, len(lm.tokenizer), (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = greedy_with_attentions(
            lm.model, ids, max_new_tokens=8, stop=lambda g: False, on_step=lambda t, o: None, attentions=False
        )
        prefix = prefill_prefix(lm.model, ids)
        before = copy.deepcopy(prefix)
        stops = [lambda g, n=n: len(g) >= n for n in (3, 8, 1, 5)]
        left = []
        rows = greedy_rows(
            lm.model, ids, rows=4, prefix_cache=prefix, max_new_tokens=8, stops=stops, on_select=left.append
        )
    assert rows == [alone[:3], alone, alone[:1], alone[:5]]
    assert [t.tolist() for t in left] == [[0, 1, 3], [1, 2], [0]]  # batch positions kept after each stop
    for a, b in zip(prefix.layers, before.layers, strict=True):
        assert torch.equal(a.keys, b.keys)
    assert lm.model.config._attn_implementation == "eager"  # the rows' SDPA is undone


def test_a_reserved_cache_layer_grows_past_its_reservation():
    import torch

    from retrieval_heads.decoding import _reserved_layer

    k = torch.arange(2 * 1 * 3 * 2.0).reshape(2, 1, 3, 2)
    layer = _reserved_layer()(k, -k, rows=2, capacity=4)
    assert layer.keys.shape == (4, 1, 3, 2) and torch.equal(layer.keys[1], k[0])  # row b of the prefix repeated
    new = torch.ones(4, 1, 2, 2)
    keys, values = layer.update(new, -new)
    assert (
        keys.shape == (4, 1, 5, 2)
        and torch.equal(keys[:, :, 3:], new)
        and torch.equal(values[:, :, :3], -layer.keys[:, :, :3])
    )
    layer.batch_select_indices(torch.tensor([2]))
    assert torch.equal(layer.keys[0, :, :3], k[1]) and layer.get_seq_length() == 5
