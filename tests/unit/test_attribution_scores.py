"""attribution.scores: copy support from the context, the "from the question" state of restated
question words, and the answer's means."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_heads.attribution import CONTEXT, Trace, answer_scores, build_trace_prompt, token_scores
from retrieval_heads.testing import tiny_model

from .attribution_helpers import PASSAGES, QUESTION_TEXT


def fake_trace(tp, tokens, argmax_of, watched):
    """A Trace of `tokens` whose argmax `[L, H]` per step is set by `argmax_of(step, array)`."""
    steps, L, H = len(tokens), 2, 4
    argmax = np.zeros((steps, L, H), dtype=np.int64)
    for t in range(steps):
        argmax_of(t, argmax[t])
    mass = np.zeros((steps, L, H, 4))
    mass[..., CONTEXT] = 0.5
    sent = np.zeros((steps, len(tp.sentences)))
    sent[0, 1] = 0.4
    return Trace(list(tokens), argmax, mass, sent, np.full(steps, -1.0), np.ones(steps), watched)


def test_copy_support_counts_heads_whose_argmax_holds_the_token():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    tp = build_trace_prompt(tok, PASSAGES, QUESTION_TEXT, chat=False)
    lantern = tok.convert_tokens_to_ids("lantern")
    pos = tp.ids.index(lantern)  # inside passage a
    question_pos = tp.question[0]  # "what": in the question, not the context
    what = tp.ids[question_pos]
    comma = tok.convert_tokens_to_ids(",")
    L, H = lm.spec.shape

    def argmax_of(t, a):
        if t == 0:
            a[0, 0] = a[0, 1] = a[1, 3] = pos  # 2 of 4 watched heads copy "lantern", an unwatched one too
        elif t == 1:
            a[:, :] = question_pos  # "what" copied from the question: not support

    watched = [(0, 0), (0, 1), (0, 2), (1, 0)]
    toks = token_scores(tp, fake_trace(tp, [lantern, what, comma], argmax_of, watched), tok)
    assert toks[0].copy == 0.5 and toks[0].copying_heads == ("L0-H0", "L0-H1") and toks[0].state == "context"
    assert toks[0].all_copy == pytest.approx(3 / (L * H))
    assert toks[0].sentence == 1 and toks[0].sentence_share == pytest.approx(0.8)
    assert toks[1].copy == 0 and toks[1].question_copy == 1.0 and toks[1].sentence is None
    assert toks[1].state == "question" and toks[1].supported  # a restated question word, not unsupported
    assert toks[2].copy == 0 and toks[2].supported and not toks[2].content  # punctuation is never flagged
    assert toks[2].state == "other"
    scores = answer_scores(toks)
    assert scores["copy"] == 0.25 and scores["unsupported"] == 0.0 and scores["from_question"] == 0.5
    assert scores["n_tokens"] == 2 and scores["context_mass"] == pytest.approx(0.5)


def test_restated_question_words_are_not_unsupported_but_invented_words_are():
    """ "The password" restating "what is the password": 'the' and 'password' are from the question
    (case aside) even when the heads look at the sink; 'city' is in neither answer source."""
    lm = tiny_model("llama")
    tok = lm.tokenizer
    tp = build_trace_prompt(tok, PASSAGES[1:], QUESTION_TEXT, chat=False)
    words = ["The", "password", "city"]
    ids = [tok.convert_tokens_to_ids(w.lower()) for w in words]
    tr = fake_trace(tp, ids, lambda t, a: None, [(0, 0), (1, 1)])  # every head on position 0 (the sink)
    toks = token_scores(tp, tr, tok)
    assert [t.state for t in toks] == ["question", "question", "unsupported"]
    assert all(t.question_copy == 0 for t in toks) and all(t.copy == 0 for t in toks)
    scores = answer_scores(toks)
    assert scores["unsupported"] == pytest.approx(1 / 3) and scores["from_question"] == pytest.approx(2 / 3)


def test_answer_scores_of_no_token():
    scores = answer_scores([])
    assert scores["n_tokens"] == 0 and np.isnan(scores["copy"]) and np.isnan(scores["from_question"])


def test_a_question_word_after_the_copied_fact_needs_a_head_on_the_question():
    """After the answer's first copied token a question word counts as restated only when a watched
    head copies it from the question: "lantern the" vs "lantern the" with a head on the question's "the"."""
    lm = tiny_model("llama")
    tok = lm.tokenizer
    tp = build_trace_prompt(tok, PASSAGES[:1], QUESTION_TEXT, chat=False)
    lantern, the = tok.convert_tokens_to_ids("lantern"), tok.convert_tokens_to_ids("the")
    lantern_pos = tp.ids.index(lantern)
    the_in_question = tp.question[0] + QUESTION_TEXT.split().index("the")

    def heads_at(question_head: bool):
        def argmax_of(t, a):
            if t == 0:
                a[0, 0] = lantern_pos
            elif question_head:
                a[1, 1] = the_in_question

        return argmax_of

    watched = [(0, 0), (1, 1)]
    alone = token_scores(tp, fake_trace(tp, [lantern, the], heads_at(False), watched), tok)
    assert [t.state for t in alone] == ["context", "unsupported"]
    seen = token_scores(tp, fake_trace(tp, [lantern, the], heads_at(True), watched), tok)
    assert [t.state for t in seen] == ["context", "question"] and seen[1].question_copy == 0.5
