"""Sample construction: exact needle spans for any tokenizer, sentence boundaries, bad input."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval_heads.errors import ConfigError, DataError, NeedleNotFoundError
from retrieval_heads.needles import (
    Needle,
    insert_needle,
    load_haystack,
    load_needles,
    locate_span,
    make_sample,
    sentence_boundary_before,
)
from retrieval_heads.testing import tiny_tokenizer

from ..conftest import HAYSTACK

NEEDLE = Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "t")


@st.composite
def offsets_and_range(draw):
    # Random contiguous tokenization of a text of length n, with optional zero-width special tokens.
    n = draw(st.integers(5, 200))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=40))))
    bounds = [0, *cuts, n]
    offs = list(pairwise(bounds))
    if draw(st.booleans()):
        offs = [(0, 0), *offs]  # a BOS-like special token
    c0 = draw(st.integers(0, n - 1))
    c1 = draw(st.integers(c0 + 1, n))
    return offs, c0, c1


@given(offsets_and_range())
@settings(max_examples=300, deadline=None)
def test_span_covers_exactly_the_overlapping_tokens(case):
    offs, c0, c1 = case
    start, end = locate_span(offs, c0, c1)
    # every token in the span overlaps the needle, and the span covers every needle character
    for s, e in offs[start:end]:
        assert s < c1 and e > c0
    covered = set()
    for s, e in offs[start:end]:
        covered |= set(range(s, e))
    assert set(range(c0, c1)) <= covered
    # no token outside the span overlaps
    for i, (s, e) in enumerate(offs):
        if not start <= i < end:
            assert e <= c0 or s >= c1 or e == s


def test_span_not_found_is_loud():
    with pytest.raises(NeedleNotFoundError):
        locate_span([(0, 0), (0, 3), (3, 6)], 10, 12)


@given(st.text(alphabet="ab. \n", min_size=0, max_size=300), st.integers(0, 320))
@settings(max_examples=300, deadline=None)
def test_sentence_boundary_is_a_sentence_start(text, pos):
    b = sentence_boundary_before(text, pos)
    assert 0 <= b <= max(pos, 0)
    if b > 0:
        assert text[b - 1].isspace() and text[:b].rstrip()[-1] in ".!?\"')]"


@given(st.floats(0, 100))
@settings(max_examples=100, deadline=None)
def test_insert_needle_keeps_text_and_places_needle(depth):
    hay = "One two. Three four five. Six seven! Eight nine ten? Eleven."
    doc, at = insert_needle(hay, "NEEDLE here.", depth)
    assert doc[at : at + len("NEEDLE here.")] == "NEEDLE here."
    assert doc.replace("NEEDLE here.", "").split() == hay.split()
    # inserted on a sentence boundary: what precedes ends a sentence (or nothing precedes)
    before = doc[:at].rstrip()
    assert before == "" or before[-1] in ".!?"


def test_depth_zero_and_hundred():
    hay = "Alpha beta. Gamma delta."
    assert insert_needle(hay, "N.", 0)[0].startswith("N.")
    assert insert_needle(hay, "N.", 100)[0].endswith("N.")
    with pytest.raises(ConfigError):
        insert_needle(hay, "N.", 101)


def test_depth_hundred_follows_the_last_full_sentence():
    # a haystack cut inside a sentence: the cut sentence is dropped, the needle follows the last full one
    doc, at = insert_needle("Alpha beta. Gamma delta. Epsilon ze", "N.", 100)
    assert doc == "Alpha beta. Gamma delta. N." and doc[at:] == "N."
    assert insert_needle("Alpha beta. Gamma delta!", "N.", 100)[0] == "Alpha beta. Gamma delta! N."  # nothing cut
    assert insert_needle("no sentence end here", "N.", 100)[0] == "no sentence end here N."  # nothing to go back to
    assert insert_needle("Alpha beta. Gamma delta. Epsilon ze", "N.", 99)[0].endswith("N. Epsilon ze")  # only 100


@pytest.mark.parametrize("length", [60, 80, 100, 137, 160, 200, 300, 500])
def test_make_sample_at_depth_hundred_ends_on_a_sentence_near_the_length(length):
    tok = tiny_tokenizer()
    s = make_sample(tok, HAYSTACK, NEEDLE, length, 100, chat=False)
    document = s.prompt[: s.prompt.index("\n\nBased on the content")]
    assert document.endswith(" " + NEEDLE.needle)  # the needle ends the document ...
    before = document[: -len(NEEDLE.needle)].rstrip()
    assert before.endswith((" good .", " idea .", " year ."))  # ... right after a full haystack sentence
    assert abs(s.document_tokens - length) <= 5  # the nearest sentence end: half the longest sentence (10 tokens)
    assert s.needle_end == len(tok(document, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("depth", [0, 25, 50, 75, 100])
@pytest.mark.parametrize("length", [100, 300])
def test_make_sample_span_decodes_to_needle(depth, length):
    tok = tiny_tokenizer()
    s = make_sample(tok, HAYSTACK, NEEDLE, length, depth, chat=False)
    assert tok.decode(list(s.prompt_ids[s.needle_start : s.needle_end])) == NEEDLE.needle
    assert abs(s.document_tokens - length) <= 2
    assert s.prompt_ids[-1] == tok.convert_tokens_to_ids(":")  # ends with "Answer:"


def test_needle_lost_in_tokenization_fails_loudly():
    tok = tiny_tokenizer()
    odd = Needle("zorblax quintessence flumph .", "what ?", "zorblax", "odd")  # words unknown to the vocab
    with pytest.raises(NeedleNotFoundError, match="odd"):
        make_sample(tok, HAYSTACK, odd, 200, 50, chat=False)


def test_needles_file_validation(tmp_path):
    good = tmp_path / "n.jsonl"
    good.write_text(json.dumps({"needle": "a b.", "question": "q?", "answer": "b"}) + "\n\n")
    assert load_needles(good)[0].answer == "b"
    for content, msg in [
        ("{not json\n", "not valid JSON"),
        (json.dumps({"needle": "x", "question": "q"}) + "\n", "answer"),
        (json.dumps([1, 2]) + "\n", "expected an object"),
        ("\n", "empty"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(DataError, match=msg):
            load_needles(bad)


def test_empty_haystack(tmp_path):
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_haystack(tmp_path / "e.txt")
    with pytest.raises(DataError, match="not found"):
        load_haystack(tmp_path / "missing")


def test_answer_must_be_in_the_needle_and_has_its_own_token_span(tmp_path):
    import pytest as _pytest

    from retrieval_heads.errors import ConfigError, DataError
    from retrieval_heads.needles import DETECTION_NEEDLES, EVALUATION_NEEDLES, Needle, load_needles, make_sample
    from retrieval_heads.testing import tiny_model

    with _pytest.raises(ConfigError, match="not in the needle text verbatim"):
        Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig eighty", "pw")
    bad = tmp_path / "n.jsonl"
    bad.write_text('{"needle": "the sky is green .", "question": "what colour is the sky ?", "answer": "blue"}\n')
    with _pytest.raises(DataError, match=r"n.jsonl:1: the answer 'blue' is not in the needle"):
        load_needles(bad)
    for n in DETECTION_NEEDLES + EVALUATION_NEEDLES:
        assert n.needle[n.answer_offset :].startswith(n.answer)
    tok = tiny_model("llama").tokenizer
    s = make_sample(
        tok,
        "One sentence here. Another one there. " * 40,
        Needle(
            "the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"
        ),
        120,
        50.0,
        chat=False,
    )
    assert s.needle_start < s.answer_start < s.answer_end < s.needle_end
    assert tok.decode(s.prompt_ids[s.answer_start : s.answer_end]).strip() == "smoked tamarind"
    assert s.span("answer") == (s.answer_start, s.answer_end) and s.span("needle") == (s.needle_start, s.needle_end)


def test_non_utf8_needles_file_is_one_line(tmp_path):
    from retrieval_heads.needles import load_needles

    p = tmp_path / "n.jsonl"
    p.write_bytes(b'{"needle": "a b", "question": "q", "answer": "b"}\n{"needle": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"n\.jsonl:2: not UTF-8"):
        load_needles(p)
