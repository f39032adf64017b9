"""Many questions, one model load: a JSONL file of questions in, one JSONL of attributions and one
HTML page out.

    questions = read_questions("questions.jsonl")    # validated before any model work
    atts = attribute_batch(lm, questions)            # the heads resolved once
    save_batch(atts, "out/")                         # attributions.jsonl + attribution.html

Each line of the questions file is a JSON object: "question", the context as "context" (its
text) or "context_file" (a file or a folder of .txt/.md files, relative to the questions file),
and optionally "answer" (traced teacher-forced instead of generated) and "id". A line without a
context takes `default_context`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..heads import Head
from ..models import LoadedModel
from ..runs import strict_json
from ..scorefile import atomic_write_text
from ..userfiles import MAX_TEXT, read_text
from .answer import HTML_FILE, Attribution, attribute, check_outputs, default_heads
from .context import Passage, as_passages, load_context
from .page import render_html
from .tracing import DEFAULT_K

BATCH_FILE = "attributions.jsonl"
FIELDS = ("id", "question", "context", "context_file", "answer")


@dataclass(frozen=True)
class Question:
    """One question of a batch: its context's passages and, optionally, the answer to trace."""

    id: str
    question: str
    context: tuple[Passage, ...]
    answer: str | None = None


def read_questions(path: str | Path, default_context: Sequence[Passage] = ()) -> list[Question]:
    """The questions of a JSONL file (see the module docstring); any bad line is one DataError
    naming the file and line."""
    p = Path(path)
    lines = read_text(p, MAX_TEXT).splitlines()
    out: list[Question] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not a JSON object ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: not a JSON object")
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise DataError(f"{where}: unknown field {unknown[0]!r}; fields: {', '.join(FIELDS)}")
        if not all(isinstance(obj.get(f, ""), str) for f in FIELDS):
            raise DataError(f"{where}: every field must be a string")
        if not obj.get("question", "").strip():
            raise DataError(f"{where}: no question")
        if "context" in obj and "context_file" in obj:
            raise DataError(f"{where}: give context or context_file, not both")
        try:
            if "context_file" in obj:
                passages = load_context(p.parent / obj["context_file"])
            elif "context" in obj:
                passages = as_passages(obj["context"])
            elif default_context:
                passages = list(default_context)
            else:
                raise DataError("no context (give context, context_file or a default context)")
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if "answer" in obj and not obj["answer"].strip():
            raise DataError(f"{where}: the answer is empty")
        out.append(Question(obj.get("id") or str(len(out) + 1), obj["question"], tuple(passages), obj.get("answer")))
    if not out:
        raise DataError(f"{p}: no question in the file")
    return out


def attribute_batch(
    lm: LoadedModel,
    questions: Sequence[Question],
    heads: Sequence[Head] | None = None,
    *,
    k: int = DEFAULT_K,
    on_done: Callable[[int, Attribution], None] | None = None,
    **options: Any,
) -> list[Attribution]:
    """`attribute` for every question with one model and one head set (the top `k` of the model's
    shipped map without `heads`); `options` are attribute's (prompt_template, heads_source,
    max_new_tokens, chat, engine); `on_done(i, att)` after each question."""
    if heads is None:
        heads, options["heads_source"] = default_heads(lm.spec.name, k)
    out = []
    for i, q in enumerate(questions):
        out.append(attribute(lm, q.context, q.question, heads, answer=q.answer, **options))
        if on_done is not None:
            on_done(i, out[-1])
    return out


def save_batch(atts: Sequence[Attribution], folder: str | Path, ids: Sequence[str] | None = None) -> tuple[Path, Path]:
    """`attributions.jsonl` (one answer per line, with its question's id) and `attribution.html`
    (all answers) in `folder`, each written atomically."""
    d = Path(folder)
    check_outputs(d, (BATCH_FILE, HTML_FILE))
    d.mkdir(parents=True, exist_ok=True)
    names = list(ids) if ids is not None else [str(i + 1) for i in range(len(atts))]
    data = [strict_json({"id": name, **a.to_dict()}) for name, a in zip(names, atts, strict=True)]
    atomic_write_text(d / BATCH_FILE, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in data))
    atomic_write_text(d / HTML_FILE, render_html(data))
    return d / BATCH_FILE, d / HTML_FILE
