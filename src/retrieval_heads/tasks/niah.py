"""Needle retrieval (NIAH) as a task: the documents are needle samples (needles x lengths x
depths on a haystack), the answer is the whole response, scored as in the paper.

    task = get_task("niah", lengths=(500,), depths=(50.0,))
    task.prepare(tokenizer, chat=True)   # needle samples need the tokenizer: exact needle token span
    doc = task.docs(task.size, 0, count_tokens)[0]   # doc.fields["sample"] is the `needles.Sample`

Scores: NIAH score = ROUGE-1 recall x 100 of the needle's answer in the response (the authors'),
exact match (the answer's words contiguous in the response).

Error kinds, from the *content-word recall* c (answer words minus articles and prepositions, so
a hallucinated "a red bird" does not count as partial retrieval of "a violet heron over Lake
Umber"):
- ``retrieved``: c = 1;
- ``incomplete``: 0 < c < 1 (part of the answer);
- ``wrong_extraction``: c = 0 and the response repeats a run of >= 5 consecutive words of the
  haystack (outside the needle) that appears neither in the question nor in the needle;
- ``hallucination``: c = 0 otherwise (the answer is absent and nothing else was copied).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..decoding import StopRule, build_prompt
from ..errors import ConfigError, NeedleNotFoundError
from ..needles import EVALUATION_NEEDLES, QUESTION_TEMPLATE, Needle, Sample, load_haystack, make_sample
from ..scoring import answer_recall
from .base import CountTokens, Doc, Metric, Request, Task

ERROR_KINDS = ("retrieved", "incomplete", "hallucination", "wrong_extraction")
STOPWORDS = frozenset("a an the of with over from in on at to and or by for is was named".split())
COPY_WORDS = 5  # a wrong extraction copies at least this many consecutive haystack words

_WORDS: Any = None


def words(text: str) -> list[str]:
    """Lowercased alphanumeric words, as ROUGE-1 (rouge-score's default tokenizer) sees them."""
    global _WORDS
    if _WORDS is None:
        from rouge_score.tokenizers import DefaultTokenizer

        _WORDS = DefaultTokenizer(use_stemmer=False)
    return _WORDS.tokenize(text)


def exact_match(answer: str, text: str) -> bool:
    """The answer's words appear contiguously, in order, in the response (case/punctuation-free)."""
    a, t = " ".join(words(answer)), " ".join(words(text))
    return bool(a) and f" {a} " in f" {t} "


def content_recall(answer: str, text: str) -> float:
    """Share of the answer's content words (STOPWORDS removed) present in the response."""
    content = [w for w in words(answer) if w not in STOPWORDS] or words(answer)
    got = set(words(text))
    return sum(w in got for w in content) / len(content) if content else 0.0


def ngrams(ws: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def copied_haystack_span(text: str, sample: Sample, n: int = COPY_WORDS) -> str | None:
    """The first run of n response words found in the haystack (needle removed) but neither in the
    question nor in the needle, or None."""
    doc_end = sample.prompt.find(QUESTION_TEMPLATE.format(question=sample.needle.question))
    context = sample.prompt[: doc_end if doc_end >= 0 else len(sample.prompt)]
    context = context.replace(sample.needle.needle, " | ")
    hay = ngrams(words(context), n)
    own = ngrams(words(sample.needle.question), n) | ngrams(words(sample.needle.needle), n)
    ws = words(text)
    for i in range(len(ws) - n + 1):
        g = tuple(ws[i : i + n])
        if g in hay and g not in own:
            return " ".join(g)
    return None


def error_kind(sample: Sample, text: str) -> tuple[str, str | None]:
    """(kind, copied span) for a response; see the module docstring for the definitions."""
    c = content_recall(sample.needle.answer, text)
    if c >= 1.0:
        return "retrieved", None
    if c > 0:
        return "incomplete", None
    span = copied_haystack_span(text, sample)
    return ("wrong_extraction", span) if span else ("hallucination", None)


# ----------------------------------------------------------------------------------- the task
class NeedleStop(StopRule):
    """The authors' stop rule for needle answers (EOS, or a newline once the answer has text). The
    response is scored whole, so nothing is cut."""

    def cut(self, text: str) -> str:
        return text


def user_message(tokenizer: Any, prompt: str, chat: bool) -> str:
    """The user message inside a prompt built by `decoding.build_prompt` (no prefix or separator):
    what the template puts before and after a message is found with a one-character message."""
    head, _, tail = build_prompt(tokenizer, "\x00", chat=chat).partition("\x00")
    if not (prompt.startswith(head) and prompt.endswith(tail)) or len(prompt) < len(head) + len(tail):
        raise NeedleNotFoundError("the chat template altered the prompt around the user message")
    return prompt[len(head) : len(prompt) - len(tail)]


class NIAH(Task):
    """Needle retrieval: one document per (needle, length, depth), in that order (the seed is not
    used). `path`: haystack folder or file (default: the Paul Graham essays)."""

    name = "niah"
    metrics = (Metric("answer_recall"), Metric("exact"))
    prompt_styles = ("answer-only",)  # the authors' prompt: document, then the question
    default_limit = 18  # the default grid: 3 needles x 2 lengths x 3 depths

    def __init__(
        self,
        needles: Sequence[Needle] = EVALUATION_NEEDLES,
        lengths: Sequence[int] = (500, 1000),
        depths: Sequence[float] = (10.0, 50.0, 90.0),
        path: str | None = None,
        max_new_tokens: int = 32,
    ) -> None:
        if not needles:
            raise ConfigError("no needles")
        if not lengths or not depths:
            raise ConfigError("niah needs at least one length and one depth")
        self.needles, self.path = tuple(needles), path
        self.lengths, self.depths = tuple(int(n) for n in lengths), tuple(float(d) for d in depths)
        self.max_new_tokens = max_new_tokens
        self.haystack = ""  # the haystack text, read by `prepare`
        self.tokenizer: Any = None
        self.chat = True

    @property
    def size(self) -> int:
        """Documents in the grid."""
        return len(self.needles) * len(self.lengths) * len(self.depths)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "needles": [n.to_dict() for n in self.needles],
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "haystack": self.path,
            "max_new_tokens": self.max_new_tokens,
        }

    def prepare(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        if not self.haystack:
            self.haystack = load_haystack(self.path)

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        if self.tokenizer is None:
            raise ConfigError("the niah task builds its samples with the model's tokenizer: call prepare() first")
        grid = [(n, length, d) for n in self.needles for length in self.lengths for d in self.depths][:limit]
        out = []
        for needle, length, depth in grid:
            s = make_sample(self.tokenizer, self.haystack, needle, length, depth, chat=self.chat)
            user = user_message(self.tokenizer, s.prompt, self.chat)
            out.append(Doc(s.id, {"sample": s, "user": user, "question": needle.question}, (needle.answer,)))
        return out

    def request(self, doc: Doc, style: str) -> Request:
        # No separator and no prefix: `Request.prompt` rebuilds the sample's prompt exactly.
        self.check_style(style)
        return Request(doc.id, doc.fields["user"], "", self.max_new_tokens, ("\n",), plain_separator="")

    def stop_rule(self, tokenizer: Any, request: Request) -> NeedleStop:
        return NeedleStop(tokenizer)

    def extract_answer(self, text: str, doc: Doc, style: str) -> str:
        return text  # the NIAH score reads the whole response

    def score(self, doc: Doc, prediction: str) -> dict[str, float]:
        answer = doc.answers[0]
        return {"answer_recall": answer_recall(answer, prediction), "exact": float(exact_match(answer, prediction))}
