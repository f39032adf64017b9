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
