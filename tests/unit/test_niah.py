"""The niah task: its documents are the needle samples, its answer the whole response, its error
kinds (retrieved, incomplete, hallucination, wrong extraction)."""

from __future__ import annotations

import pytest

from retrieval_heads.decoding import StopRule
from retrieval_heads.errors import ConfigError
from retrieval_heads.needles import Needle, make_sample
from retrieval_heads.tasks import niah
from retrieval_heads.tasks.base import Doc, Request
from retrieval_heads.tasks.niah import content_recall, error_kind, exact_match
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
    Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.mark.parametrize("chat", [False, True])
def test_niah_task_docs_are_the_needle_samples(haystack_file, chat):
    from retrieval_heads.needles import load_haystack
    from retrieval_heads.tasks.registry import get_task
    from retrieval_heads.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )
    task = get_task(
        "niah", needles=NEEDLES, lengths=(80, 120), depths=(10.0, 90.0), path=str(haystack_file), max_new_tokens=7
    )
    assert isinstance(task, niah.NIAH) and task.size == 8
    with pytest.raises(ConfigError, match="prepare"):
        task.docs(task.size, 0, len)
    task.prepare(tok, chat)
    docs = task.docs(task.size, 0, len)
    assert [d.id for d in docs] == [f"{n.id}-L{L}-D{d:g}" for n in NEEDLES for L in (80, 120) for d in (10.0, 90.0)]
    assert len(task.docs(3, 0, len)) == 3
    hay = load_haystack(haystack_file)
    for d in docs:
        s = d.fields["sample"]
        assert s == make_sample(tok, hay, s.needle, s.length, s.depth, chat=chat)
        assert d.answers == (s.needle.answer,)
        req = task.request(d, "answer-only")
        # the one prompt path rebuilds the sample's prompt and ids exactly: the needle span holds
        assert req.prompt(tok, chat) == s.prompt and s.needle.question in req.user
        assert tuple(tok(req.prompt(tok, chat), add_special_tokens=False)["input_ids"]) == s.prompt_ids
        assert req.max_new_tokens == 7 and req.assistant_prefix == ""
    with pytest.raises(ConfigError, match="no prompt style"):
        task.request(docs[0], "cot")
    assert task.config()["lengths"] == [80, 120] and task.config()["needles"][0]["id"] == "stew"


def test_niah_task_scores_the_whole_response(lm):
    task = niah.NIAH(needles=NEEDLES)
    doc = Doc("x", {}, ("smoked tamarind",))
    assert task.extract_answer(" smoked tamarind .\n", doc, "answer-only") == " smoked tamarind .\n"
    assert task.score(doc, "it is smoked tamarind") == {"answer_recall": 1.0, "exact": 1.0}
    assert task.score(doc, "tamarind smoked") == {"answer_recall": 1.0, "exact": 0.0}
    assert task.score(doc, "smoked fish")["answer_recall"] == 0.5
    req = Request("x", "q", stop=("\n",))
    stop = task.stop_rule(lm.tokenizer, req)
    assert isinstance(stop, StopRule) and stop.cut("a\nb") == "a\nb"  # the authors' rule, nothing cut
    assert [m.name for m in task.metrics] == ["answer_recall", "exact"]
    with pytest.raises(ConfigError, match="no needles"):
        niah.NIAH(needles=())


def test_error_kinds(haystack_file):
    from retrieval_heads.needles import load_haystack

    lm = tiny_model("llama")
    s = make_sample(lm.tokenizer, load_haystack(haystack_file), NEEDLES[1], 120, 50, chat=False)
    assert error_kind(s, "the password is lantern fig seventy .") == ("retrieved", None)
    assert error_kind(s, "lantern fig") == ("incomplete", None)
    assert error_kind(s, "the password is blue") == ("hallucination", None)
    # copying the question or the needle's own words is not a wrong extraction
    assert error_kind(s, "what is the password ? the password is")[0] == "hallucination"
    kind, span = error_kind(s, "the city program language was made")
    assert kind == "wrong_extraction" and span == "the city program language was"
    assert exact_match("Lake Umber", "over lake umber.") and not exact_match("Lake Umber", "lake of umber")
    assert content_recall("a violet heron over Lake Umber", "a red bird") == 0.0
