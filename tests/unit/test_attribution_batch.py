"""attribution.batch: a JSONL file of questions (validated line by line before any model work), 20
questions attributed with one model and one head set, one JSONL and one page out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval_heads.attribution import Passage, attribute, attribute_batch, read_questions, save_batch
from retrieval_heads.errors import DataError
from retrieval_heads.testing import tiny_model

from .attribution_helpers import PASSAGES, peaked, questions_file


def test_read_questions(tmp_path: Path):
    qs = read_questions(questions_file(tmp_path), default_context=[Passage("default", "the city of money .")])
    assert len(qs) == 20 and qs[0].id == "1" and qs[5].id == "five" and qs[6].id == "7"
    assert [p.name for p in qs[0].context] == ["a.txt", "b.txt"]
    assert qs[1].context == (Passage("context", PASSAGES[1].text),) and qs[1].answer == "the password is lantern ."
    assert qs[2].context == (Passage("default", "the city of money ."),) and qs[2].answer is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "questions.jsonl:2: not a JSON object"),
        ("[1, 2]", "questions.jsonl:2: not a JSON object"),
        ('{"question": " ", "context": "x ."}', ":2: no question"),
        ('{"question": "q ?", "context": "x .", "contexts": "y"}', ":2: unknown field 'contexts'"),
        ('{"question": "q ?", "context": "x .", "context_file": "a.txt"}', ":2: give context or context_file"),
        ('{"question": "q ?", "context_file": "missing"}', ":2: .*missing: no such file"),
        ('{"question": "q ?"}', ":2: no context"),
        ('{"question": "q ?", "context": "x .", "answer": ""}', ":2: the answer is empty"),
        ('{"question": "q ?", "context": 3}', ":2: every field must be a string"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "questions.jsonl"
    path.write_text('{"question": "fine ?", "context": "fine ."}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_questions(path)


def test_empty_file(tmp_path: Path):
    (tmp_path / "q.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no question"):
        read_questions(tmp_path / "q.jsonl")


def test_a_batch_of_20_is_attributed_as_one_by_one(tmp_path: Path):
    lm = peaked(tiny_model("llama"))
    qs = read_questions(questions_file(tmp_path), default_context=PASSAGES)
    heads = [(0, 0), (1, 1), (1, 3)]
    done = []
    atts = attribute_batch(lm, qs, heads, chat=False, max_new_tokens=4, on_done=lambda i, a: done.append(i))
    assert done == list(range(20)) and len(atts) == 20
    for q, att in zip(qs, atts, strict=True):
        one = attribute(lm, q.context, q.question, heads, answer=q.answer, chat=False, max_new_tokens=4)
        assert att.to_dict() == one.to_dict()
        assert att.given == (q.answer is not None)
    jsonl, page = save_batch(atts, tmp_path / "out", [q.id for q in qs])
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["id"] for r in rows] == [q.id for q in qs] and rows[5]["id"] == "five"
    assert rows[1]["answer"] == "the password is lantern ." and rows[1]["answer_given"]
    html = page.read_text()
    assert html.count('<section class="item"') == 20 and 'id="q19-s0"' in html
