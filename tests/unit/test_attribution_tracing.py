"""attribution.tracing: the two tracing paths against an independent eager forward, teacher
forcing of a given answer, masking, the question's attention to each passage, watched heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval_heads.attribution import ENGINES, build_trace_prompt, question_attention, trace, watched_heads
from retrieval_heads.errors import ConfigError
from retrieval_heads.results import DetectionResult
from retrieval_heads.testing import tiny_model

from .attribution_helpers import NEVER, PASSAGES, QUESTION_TEXT, all_heads, peaked


def independent_rows(lm, prompt_ids, generated, t):
    """Eager full forward (no cache) of prompt + generated[:t]: each layer's row of the query that
    produced generated token t, `[H, n + t]` (full-attention models only), and its logits."""
    ids = torch.tensor([list(prompt_ids) + list(generated[:t])])
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_attentions=True)
    return [a[0, :, -1, :].float() for a in out.attentions], out.logits[0, -1]


def assert_rows_match(lm, tp, tr, watched):
    region = torch.nn.functional.one_hot(torch.as_tensor(tp.regions()), 4).float()
    sent = torch.tensor(tp.sentence_of())
    for t in range(len(tr.generated_ids)):
        rows, _ = independent_rows(lm, tp.ids, tr.generated_ids, t)
        argmax = np.stack([r.argmax(-1).numpy() for r in rows])
        np.testing.assert_array_equal(tr.argmax[t], argmax, err_msg=f"step {t}")
        mass = np.stack([(r[:, : tp.n] @ region).numpy() for r in rows])
        np.testing.assert_allclose(tr.region_mass[t], mass, atol=1e-5)
        want = np.zeros(len(tp.sentences))
        for l, h in watched:
            for i in range(len(tp.sentences)):
                want[i] += float(rows[l][h, : tp.n][sent == i].sum()) / len(watched)
        np.testing.assert_allclose(tr.sentence_mass[t], want, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_trace_equals_an_independent_eager_forward(arch):
    lm = peaked(tiny_model(arch))  # eager: the forward below returns its weights
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)
    watched = [(1, 0), (0, 3)]
    for engine in ENGINES:
        tr = trace(lm, tp, watched, max_new_tokens=4, stop=NEVER, engine=engine)
        assert len(tr.generated_ids) == 4 and tr.argmax.shape == (4, *lm.spec.shape)
        assert_rows_match(lm, tp, tr, watched)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_given_answer_is_traced_teacher_forced(engine):
    """The given tokens are fed, not the model's choices: each step's rows and log-probability are
    those of an independent forward over the prompt and the answer so far."""
    lm = peaked(tiny_model("llama"))
    tok = lm.tokenizer
    tp = build_trace_prompt(tok, PASSAGES, QUESTION_TEXT, chat=False)
    answer = tok("the password is lantern fig seventy .", add_special_tokens=False)["input_ids"]
    watched = [(0, 1), (1, 2)]
    tr = trace(lm, tp, watched, engine=engine, answer_ids=answer, max_new_tokens=1)  # the answer sets the length
    assert tr.generated_ids == answer and tr.argmax.shape[0] == len(answer)
    assert_rows_match(lm, tp, tr, watched)
    for t, token in enumerate(answer):
        _, logits = independent_rows(lm, tp.ids, answer, t)
        logp = torch.log_softmax(logits, -1)
        assert tr.logprob[t] == pytest.approx(float(logp[token]), abs=1e-4)
        assert tr.entropy[t] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)
    greedy = trace(lm, tp, watched, engine=engine, max_new_tokens=3, stop=NEVER)
    forced = trace(lm, tp, watched, engine=engine, answer_ids=greedy.generated_ids)
    np.testing.assert_array_equal(forced.argmax, greedy.argmax)  # forcing the model's own answer changes nothing
    np.testing.assert_allclose(forced.logprob, greedy.logprob, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral", "gpt2"])
def test_fast_path_equals_the_reference(arch):
    """The fast path (SDPA + captured rows) reads what the eager oracle reads, sliding windows included."""
    lm = peaked(tiny_model(arch, attn_implementation="sdpa"))
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)  # > 16 tokens: gemma3's window
    assert tp.n > 40
    fast = trace(lm, tp, all_heads(lm), max_new_tokens=6, stop=NEVER, engine="fast")
    ref = trace(lm, tp, all_heads(lm), max_new_tokens=6, stop=NEVER, engine="reference")
    assert lm.model.config._attn_implementation == "sdpa"  # restored
    assert fast.generated_ids == ref.generated_ids
    np.testing.assert_array_equal(fast.argmax, ref.argmax)
    for name in ("region_mass", "sentence_mass", "logprob", "entropy"):
        np.testing.assert_allclose(getattr(fast, name), getattr(ref, name), atol=1e-4, err_msg=name)


def test_logprob_and_entropy_are_the_models():
    lm = peaked(tiny_model("llama"))
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)
    tr = trace(lm, tp, [(0, 0)], max_new_tokens=2, stop=NEVER)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([list(tp.ids)])).logits[0, -1]
    logp = torch.log_softmax(logits, -1)
    assert tr.generated_ids[0] == int(logits.argmax())
    assert tr.logprob[0] == pytest.approx(float(logp.max()), abs=1e-5)
    assert tr.entropy[0] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)


def test_masked_head_reads_uniform():
    """A uniformly masked head attends equally to every key: argmax on the first, mass by counts."""
    lm = peaked(tiny_model("llama"))
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)
    tr = trace(lm, tp, [(1, 2)], max_new_tokens=1, stop=NEVER, masked=[(1, 2)])
    assert tr.argmax[0, 1, 2] == 0
    counts = np.bincount(tp.regions(), minlength=4) / tp.n
    np.testing.assert_allclose(tr.region_mass[0, 1, 2], counts, atol=1e-5)
    free = trace(lm, tp, [(1, 2)], max_new_tokens=1, stop=NEVER)
    assert not np.allclose(free.region_mass[0, 1, 2], counts, atol=1e-3)


def test_trace_bad_input():
    lm = tiny_model("llama")
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)
    with pytest.raises(ConfigError, match="engine"):
        trace(lm, tp, [(0, 0)], engine="turbo")
    with pytest.raises(ConfigError, match="outside"):
        trace(lm, tp, [(5, 0)])
    with pytest.raises(ConfigError, match="context"):
        trace(lm, tp, [(0, 0)], max_new_tokens=10_000)
    with pytest.raises(ConfigError, match="context"):
        trace(lm, tp, [(0, 0)], answer_ids=[5] * 10_000)
    with pytest.raises(ConfigError, match="empty"):
        trace(lm, tp, [(0, 0)], answer_ids=[])


def test_question_attention_equals_an_independent_forward():
    lm = peaked(tiny_model("qwen2", attn_implementation="sdpa"))
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False, titled=False)
    got = question_attention(lm, tp)
    assert got.shape == (*lm.spec.shape, 2)
    q0, q1 = tp.question
    with torch.no_grad():
        lm.model.set_attn_implementation("eager")
        out = lm.model(input_ids=torch.tensor([list(tp.ids[:q1])]), output_attentions=True)
        lm.model.set_attn_implementation("sdpa")
    for l, a in enumerate(out.attentions):
        for p, (s, e) in enumerate(tp.passages):
            np.testing.assert_allclose(got[l, :, p], a[0, :, q0:q1, s:e].sum((-1, -2)).numpy(), atol=1e-4)


def test_watched_heads_follow_the_ranking():
    s = np.array([[0.1, 0.9, 0.0], [0.5, np.nan, 0.7]])
    r = DetectionResult.from_aggregate("m", s, np.ones_like(s), 3)
    assert watched_heads(r, 3) == [(0, 1), (1, 2), (1, 0)]
    assert watched_heads(r, 2, exclude=[(0, 1)]) == [(1, 2), (1, 0)]
    with pytest.raises(ConfigError):
        watched_heads(r, 0)
