"""What the attribution tests share: a tiny model with peaked attention, two passages, a question."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from retrieval_heads.attribution import Passage

NEVER = lambda generated: False  # noqa: E731  fixed-length generation
PASSAGES = [
    Passage("a.txt", "the captain was named seven . the password is lantern fig seventy ."),
    Passage("b.txt", "the city of money . people think a good idea is to write ."),
]
QUESTION_TEXT = "what is the password ?"


def peaked(lm, std: float = 0.4):
    """Larger query/key weights: peaked attention rows like a trained model's (see test_fast_engine)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lm.model.modules():
            for name in ("q_proj", "k_proj", "c_attn"):
                if hasattr(m, name):
                    w = getattr(m, name).weight
                    w.copy_(torch.randn(w.shape, generator=g) * std)
    return lm


def all_heads(lm):
    L, H = lm.spec.shape
    return [(l, h) for l in range(L) for h in range(H)]


QUESTIONS = ["what is the password ?", "who was the captain ?", "what city ?", "what is a good idea ?"]


def questions_file(tmp_path: Path, n: int = 20) -> Path:
    (tmp_path / "docs").mkdir(exist_ok=True)
    (tmp_path / "docs" / "a.txt").write_text(PASSAGES[0].text)
    (tmp_path / "docs" / "b.txt").write_text(PASSAGES[1].text)
    lines = []
    for i in range(n):
        line: dict[str, str] = {"question": QUESTIONS[i % 4]}
        if i % 3 == 0:
            line["context_file"] = "docs"
        elif i % 3 == 1:
            line["context"] = PASSAGES[i % 2].text
        if i % 2:
            line["answer"] = "the password is lantern ."
        if i == 5:
            line["id"] = "five"
        lines.append(json.dumps(line))
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    return path
