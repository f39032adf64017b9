"""attribution.context: documents from files, the prompt layout (default and templated) and the
token spans of the passages, the question and every sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval_heads.attribution import (
    CONTEXT,
    QUESTION,
    SINK,
    Passage,
    build_trace_prompt,
    load_context,
    sentence_spans,
)
from retrieval_heads.attribution.context import as_passages, check_template
from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.testing import tiny_model

from .attribution_helpers import PASSAGES, QUESTION_TEXT


def test_sentence_spans():
    text = 'He left. "Why?" she asked! Then\nnew line and end'
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "He left.",
        '"Why?"',
        "she asked!",
        "Then",
        "new line and end",
    ]


def test_prompt_spans_hold_the_passages_question_and_sentences():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    tp = build_trace_prompt(tok, PASSAGES, QUESTION_TEXT, chat=False)
    assert tp.ids == tuple(tok(tp.text, add_special_tokens=False)["input_ids"])
    for (s, e), p in zip(tp.passages, PASSAGES, strict=True):
        assert tok.decode(tp.ids[s:e]).split() == p.text.split()
    assert tok.decode(tp.ids[tp.question[0] : tp.question[1]]).split() == QUESTION_TEXT.split()
    assert [s.text for s in tp.sentences] == [
        "the captain was named seven .",
        "the password is lantern fig seventy .",
        "the city of money .",
        "people think a good idea is to write .",
    ]
    for s in tp.sentences:
        assert tok.decode(tp.ids[s.start : s.end]).split() == s.text.split()
    regions = tp.regions()
    assert (regions[: min(4, tp.n)] == SINK).all()
    assert (regions[tp.question[0] : tp.question[1]] == QUESTION).all()
    assert (regions[tp.passages[1][0] : tp.passages[1][1]] == CONTEXT).all()
    assert (tp.sentence_of()[tp.sentences[1].start : tp.sentences[1].end] == 1).all()


def test_default_layout_is_instruction_documents_question():
    lm = tiny_model("llama")
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False, instruction="answer .")
    body = "answer .\n\nDocument 1 (a.txt):\n" + PASSAGES[0].text + "\n\nDocument 2 (b.txt):\n" + PASSAGES[1].text
    assert tp.text == f"{body}\n\nQuestion: {QUESTION_TEXT}\n"


def test_template_places_question_and_context_anywhere():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    template = "question : {question}\n{context}\nwrite {braces} as written ."
    tp = build_trace_prompt(tok, PASSAGES[:1], QUESTION_TEXT, chat=False, template=template)
    assert tp.text == f"question : {QUESTION_TEXT}\n{PASSAGES[0].text}\nwrite {{braces}} as written .\n"
    assert tp.question[1] <= tp.passages[0][0]  # the question comes first here
    assert tok.decode(tp.ids[tp.question[0] : tp.question[1]]).split() == QUESTION_TEXT.split()
    s, e = tp.passages[0]
    assert tok.decode(tp.ids[s:e]).split() == PASSAGES[0].text.split()
    assert len(tp.sentences) == 2


@pytest.mark.parametrize("template", ["{context} only", "{question} only", "{context} {question} {context}"])
def test_template_needs_each_placeholder_once(template):
    with pytest.raises(ConfigError, match="exactly once"):
        check_template(template)


def test_prompt_bad_input():
    lm = tiny_model("llama")
    with pytest.raises(ConfigError):
        build_trace_prompt(lm.tokenizer, PASSAGES, "  ", chat=False)
    with pytest.raises(DataError):
        build_trace_prompt(lm.tokenizer, [], QUESTION_TEXT, chat=False)


def test_load_context(tmp_path: Path):
    (tmp_path / "b.txt").write_text("second passage.")
    (tmp_path / "a.md").write_text("first passage.")
    (tmp_path / "skip.json").write_text("{}")
    ps = load_context(tmp_path)
    assert [p.name for p in ps] == ["a.md", "b.txt"] and ps[0].text == "first passage."
    assert load_context(tmp_path / "b.txt") == [Passage("b.txt", "second passage.")]
    assert as_passages(tmp_path / "b.txt") == [Passage("b.txt", "second passage.")]
    assert as_passages("  a text . ") == [Passage("context", "a text .")]
    with pytest.raises(DataError, match="no such"):
        load_context(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \.txt"):
        load_context(empty)
    (empty / "x.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match="UTF-8"):
        load_context(empty / "x.txt")
    with pytest.raises(DataError, match="empty"):
        as_passages(" ")


def test_load_context_refuses_special_files(tmp_path: Path):
    import os

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_context(fifo)  # opening a pipe for reading would hang
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="not a regular file"):
        load_context(tmp_path / "zero.txt")
