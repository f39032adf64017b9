"""attribution.answer and attribution.page: `attribute` on a generated or a given answer, the
heads of a shipped map, strict JSON and an escaped, self-contained page with the three token states."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from retrieval_heads.attribution import Attribution, Passage, attribute, render_html, shipped_map
from retrieval_heads.attribution.answer import default_heads
from retrieval_heads.errors import ConfigError
from retrieval_heads.testing import tiny_model

from .attribution_helpers import PASSAGES, QUESTION_TEXT, peaked


def strict(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_attribute_writes_strict_json_and_escaped_html(tmp_path: Path):
    lm = peaked(tiny_model("llama"))
    evil = [Passage("<b>x</b>.txt", "the password is <script>alert(1)</script> lantern fig ."), PASSAGES[1]]
    att = attribute(lm, evil, 'what is the "password" & <i>key</i> ?', [(0, 0), (1, 1)], chat=False, max_new_tokens=4)
    assert not att.given and 1 <= len(att.tokens) <= 4
    assert att.answer == lm.tokenizer.decode([t.token_id for t in att.tokens], skip_special_tokens=True).strip()
    js, page = att.save(tmp_path)
    data = strict(js)
    assert data["format"] == "retrieval-heads attribution v1" and len(data["tokens"]) == len(att.tokens)
    assert data["heads"] == ["L0-H0", "L1-H1"] and data["support"] == att.support
    assert [t["state"] for t in data["tokens"]] == [t.state for t in att.tokens]
    text = page.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>x</b>" not in text and "<i>key</i>" not in text
    assert "http://" not in text and "https://" not in text
    for t in att.tokens:
        if t.sentence is not None and t.content:
            assert f'href="#s{t.sentence}"' in text and f'id="s{t.sentence}"' in text
    assert text == render_html([data])


def test_a_given_answer_is_traced_not_generated(tmp_path: Path):
    lm = peaked(tiny_model("llama"))
    given = "the password is lantern fig seventy ."
    att = attribute(lm, PASSAGES, QUESTION_TEXT, [(0, 0), (1, 1), (1, 3)], answer=f"  {given} ", chat=False)
    assert att.given and att.answer == given
    assert [t.text for t in att.tokens] == given.split()  # every given token, no stop rule
    own = attribute(lm, PASSAGES, QUESTION_TEXT, [(0, 0)], chat=False, max_new_tokens=3)
    again = attribute(lm, PASSAGES, QUESTION_TEXT, [(0, 0)], answer=own.answer, chat=False)
    assert [t.argmax for t in again.tokens] == [t.argmax for t in own.tokens]  # the model's own answer, forced
    data = strict(att.save(tmp_path)[0])
    assert data["answer_given"] is True and data["answer"] == given
    with pytest.raises(ConfigError, match="empty"):
        attribute(lm, PASSAGES, QUESTION_TEXT, [(0, 0)], answer=" ", chat=False)


def test_context_as_text_or_path_and_a_template(tmp_path: Path):
    lm = peaked(tiny_model("llama"))
    (tmp_path / "a.txt").write_text(PASSAGES[0].text)
    by_path = attribute(lm, tmp_path, QUESTION_TEXT, [(0, 0)], chat=False, answer="seven")
    by_text = attribute(lm, PASSAGES[0].text, QUESTION_TEXT, [(0, 0)], chat=False, answer="seven")
    assert by_path.prompt.passage_names == ("a.txt",) and by_text.prompt.passage_names == ("context",)
    assert by_path.prompt.ids == by_text.prompt.ids
    templ = attribute(
        lm, PASSAGES, QUESTION_TEXT, [(0, 0)], chat=False, answer="seven", prompt_template="{question} {context}"
    )
    assert templ.prompt.text.startswith(QUESTION_TEXT) and templ.prompt.question[0] == 0


def test_shipped_maps_by_alias_and_hub_id():
    assert shipped_map("smollm2-135m") == "ref:smollm2-135m"
    assert shipped_map("meta-llama/Meta-Llama-3-8B-Instruct") == "ref:Meta-Llama-3-8B-Instruct"
    assert shipped_map("/models/mistral-7b-instruct-v0.2/") == "ref:Mistral-7B-Instruct-v0.2"
    assert shipped_map("some/unknown-model") is None
    heads, source = default_heads("meta-llama/Meta-Llama-3-8B-Instruct", 5)
    assert source == "ref:Meta-Llama-3-8B-Instruct" and len(heads) == 5 and all(0 <= l < 32 for l, _ in heads)
    with pytest.raises(ConfigError, match="no shipped score map"):
        attribute(tiny_model("llama"), PASSAGES, QUESTION_TEXT)  # heads default to the model's map


def test_page_marks_the_three_states_and_a_batch_has_unique_ids():
    lm = peaked(tiny_model("llama"))
    att = attribute(lm, PASSAGES, QUESTION_TEXT, [(0, 0), (1, 1)], chat=False, answer="the password city .")
    states = [t.state for t in att.tokens]
    assert states == ["question", "question", "unsupported", "other"]  # no watched head copies from the context
    data = json.loads(json.dumps(att.to_dict()))
    page = render_html([data])
    answer = re.search(r'<p class="answer" id="answer">(.*?)</p>', page).group(1)
    assert answer.count('class="tok question"') == 2 and answer.count('class="tok unsupported"') == 1
    both = render_html([data, data])
    assert 'id="q0-s0"' in both and 'id="q1-s0"' in both and 'id="answer-1"' in both and 'id="s0"' not in both
    assert isinstance(att, Attribution) and "from the question" in page


def test_attribute_refuses_a_huge_context_before_the_quadratic_layout(tmp_path: Path):
    """1.7 MB of sentences: refused from the token count, in seconds, not minutes."""
    import time

    lm = tiny_model("llama")
    ctx = tmp_path / "big.txt"
    ctx.write_text("The lantern is on the fig tree. " * 55_000)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="over the model's context"):
        attribute(lm, ctx, QUESTION_TEXT, [(0, 0)], chat=False, max_new_tokens=2)
    assert time.monotonic() - t0 < 10


def test_save_never_replaces_a_users_attribution_file(tmp_path: Path):
    from retrieval_heads.attribution import save_batch

    lm = peaked(tiny_model("llama"))
    att = attribute(lm, PASSAGES, QUESTION_TEXT, [(0, 0)], chat=False, max_new_tokens=2)
    for name in ("attribution.json", "attribution.html"):
        user = tmp_path / name.replace(".", "-")
        user.mkdir()
        (user / name).write_text('{"mine": 1}')
        with pytest.raises(ConfigError, match="not an attribution file"):
            att.save(user)
        assert (user / name).read_text() == '{"mine": 1}' and len(list(user.iterdir())) == 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "attributions.jsonl").write_text("my notes\n")
    with pytest.raises(ConfigError, match="not an attribution file"):
        save_batch([att], tmp_path / "b")
    att.save(tmp_path / "ours")  # our own files are replaced on a rerun
    att.save(tmp_path / "ours")
    save_batch([att], tmp_path / "ours")
    save_batch([att], tmp_path / "ours")
