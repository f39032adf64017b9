"""The context and the prompt of an attribution: documents read from files, the user message laid
out from a template, and the token spans attribution needs (each document, the question, every
document sentence).

    passages = load_context("notes/")                    # a file, or a folder of .txt/.md files
    prompt = build_trace_prompt(tokenizer, passages, "Who signed the contract?")
    prompt.passages, prompt.question, prompt.sentences   # token spans in prompt.ids

The default user message is the instruction, the documents (titled "Document i (name):" when there
are several), then "Question: ..."; `template` replaces it by any text holding `{context}` and
`{question}` once each (other text, braces included, is kept as written).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..decoding import build_prompt_at
from ..engines.base import SINK_TOKENS
from ..errors import ConfigError, DataError
from ..needles import Sample
from ..userfiles import MAX_TEXT, read_text

REGIONS = ("other", "sink", "context", "question")  # prompt regions; keys after the prompt: generated
OTHER, SINK, CONTEXT, QUESTION = range(4)
INSTRUCTION = "Answer the question using only the documents below. Reply with a short answer."
CONTEXT_SUFFIXES = (".txt", ".md")
MAX_CONTEXT_FILES = 200
_PLACEHOLDER = re.compile(r"\{(context|question)\}")


@dataclass(frozen=True)
class Passage:
    """One document of the context: a name (its file) and its text."""

    name: str
    text: str


def load_context(path: str | Path) -> list[Passage]:
    """A file (one passage) or a folder (its .txt and .md files, sorted by name, one passage each)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in CONTEXT_SUFFIXES)
        if not files:
            raise DataError(f"{p}: no .txt or .md file in this folder")
        if len(files) > MAX_CONTEXT_FILES:
            raise DataError(f"{p}: {len(files)} files; at most {MAX_CONTEXT_FILES} passages")
    elif p.exists():
        files = [p]
    else:
        raise DataError(f"{p}: no such file or folder")
    out = []
    for f in files:
        text = read_text(f, MAX_TEXT).strip()
        if text:
            out.append(Passage(f.name, text))
    if not out:
        raise DataError(f"{p}: the context is empty")
    return out


def as_passages(context: Sequence[Passage] | str | Path) -> list[Passage]:
    """The passages of a context given as passages, a text (one passage named "context") or a
    path (`load_context`)."""
    if isinstance(context, Path):
        return load_context(context)
    if isinstance(context, str):
        if not context.strip():
            raise DataError("the context is empty")
        return [Passage("context", context.strip())]
    return list(context)


_SENTENCE = re.compile(r"\S.*?(?:[.!?][\"')\]]*(?=\s|\Z)|(?=\n)|\Z)", re.DOTALL)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text`: up to '.', '!' or '?' (and closing quotes or
    brackets) before whitespace, or up to a line break."""
    return [m.span() for m in _SENTENCE.finditer(text)]


@dataclass(frozen=True)
class Sentence:
    """A context sentence: its passage, token span `[start, end)` in the prompt and text."""

    passage: int
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class TracePrompt:
    """A tokenized prompt with what attribution needs to know of its positions: the passages'
    and the question's token spans and the context's sentences."""

    ids: tuple[int, ...]
    text: str
    passage_names: tuple[str, ...]
    passages: tuple[tuple[int, int], ...]
    question: tuple[int, int]
    sentences: tuple[Sentence, ...]

    @property
    def n(self) -> int:
        return len(self.ids)

    def regions(self) -> np.ndarray:
        """int `[n]`: the region (`REGIONS` index) of each prompt position."""
        r = np.full(self.n, OTHER, dtype=np.int64)
        for s, e in self.passages:
            r[s:e] = CONTEXT
        r[self.question[0] : self.question[1]] = QUESTION
        r[: min(SINK_TOKENS, self.n)] = SINK
        return r

    def sentence_of(self) -> np.ndarray:
        """int `[n]`: the sentence index of each prompt position, -1 outside every sentence."""
        out = np.full(self.n, -1, dtype=np.int64)
        for i, s in enumerate(self.sentences):
            out[s.start : s.end] = i
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ids")
        d["n_tokens"] = self.n
        return d


def locate_prompt(
    tokenizer: Any,
    text: str,
    passages: Sequence[tuple[str, int, int]],
    question: tuple[int, int],
    max_tokens: int | None = None,
) -> TracePrompt:
    """Tokenize `text` and map character spans to tokens: `passages` are (name, start, end) and
    `question` (start, end) character spans in `text`. A token belongs to the span holding its
    last character. A prompt over `max_tokens` (the model's window) is refused before the spans
    are mapped, which takes time quadratic in the prompt."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if max_tokens is not None and len(ids) > max_tokens:
        raise ConfigError(
            f"the prompt is {len(ids)} tokens, over the model's context of {max_tokens}; shorten the context"
        )
    ends = [e - 1 if e > s else -1 for s, e in offsets]

    def tokens(c0: int, c1: int) -> tuple[int, int]:
        idx = [i for i, c in enumerate(ends) if c0 <= c < c1]
        return (idx[0], idx[-1] + 1) if idx else (0, 0)

    spans, sentences = [], []
    for p, (_, c0, c1) in enumerate(passages):
        spans.append(tokens(c0, c1))
        for s0, s1 in sentence_spans(text[c0:c1]):
            t0, t1 = tokens(c0 + s0, c0 + s1)
            if t1 > t0:
                sentences.append(Sentence(p, t0, t1, text[c0 + s0 : c0 + s1]))
    if not any(e > s for s, e in spans):
        raise DataError("the context holds no token")
    return TracePrompt(
        tuple(ids), text, tuple(n for n, _, _ in passages), tuple(spans), tokens(*question), tuple(sentences)
    )


def check_template(template: str) -> list[str]:
    """The template split around its placeholders: literal text, then "{context}" / "{question}"
    markers. Each placeholder must appear exactly once."""
    parts = _PLACEHOLDER.split(template)  # literal, name, literal, name, literal
    names = parts[1::2]
    for name in ("context", "question"):
        if names.count(name) != 1:
            raise ConfigError(f"the prompt template must hold {{{name}}} exactly once, found {names.count(name)}")
    return parts


def default_template(instruction: str = INSTRUCTION) -> str:
    """The user message of `attribute`: the instruction, the documents, then the question."""
    return (f"{instruction}\n\n" if instruction else "") + "{context}\n\nQuestion: {question}"


def build_trace_prompt(
    tokenizer: Any,
    passages: Sequence[Passage],
    question: str,
    *,
    chat: bool = True,
    instruction: str = INSTRUCTION,
    assistant_prefix: str = "",
    titled: bool = True,
    template: str | None = None,
    max_tokens: int | None = None,
) -> TracePrompt:
    """The attribution prompt in one user message (inside the chat template with `chat`): by
    default the instruction, the passages (titled "Document i (name):" when `titled` and there are
    several), then "Question: ..."; `template` (with `{context}` and `{question}`) replaces that
    layout, the instruction included. A prompt over `max_tokens` is refused (`locate_prompt`)."""
    question = question.strip()
    if not question:
        raise ConfigError("the question is empty")
    if not passages:
        raise DataError("no passage in the context")
    parts = check_template(default_template(instruction) if template is None else template)
    body, where, q_span = "", [], (0, 0)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            body += part
        elif part == "question":
            q_span = (len(body), len(body) + len(question))
            body += question
        else:
            for j, p in enumerate(passages):
                if j:
                    body += "\n\n"
                body += f"Document {j + 1} ({p.name}):\n" if titled and len(passages) > 1 else ""
                where.append((p.name, len(body), len(body) + len(p.text)))
                body += p.text
    text, pos = build_prompt_at(tokenizer, body, chat=chat, assistant_prefix=assistant_prefix, plain_separator="\n")
    if pos < 0:
        raise DataError("the chat template altered the message text")
    shifted = [(name, pos + c0, pos + c1) for name, c0, c1 in where]
    return locate_prompt(tokenizer, text, shifted, (pos + q_span[0], pos + q_span[1]), max_tokens)


def prompt_of_sample(tokenizer: Any, sample: Sample) -> TracePrompt:
    """The trace prompt of a needle sample (the detection prompt): one passage, the document."""
    enc = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    off = enc["offset_mapping"]
    c0, c1 = off[sample.document_start][0], off[sample.document_end - 1][1]
    q0, q1 = off[sample.question_start][0], off[sample.question_end - 1][1]
    tp = locate_prompt(tokenizer, sample.prompt, [("document", c0, c1)], (q0, q1))
    if tp.ids != tuple(sample.prompt_ids):
        raise DataError(f"{sample.id}: the prompt does not tokenize back to its ids")
    return tp
