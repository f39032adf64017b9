"""One attributed answer: `attribute` traces an answer (the model's own, or one given) and scores
every token; `Attribution` holds the result and writes `attribution.json` and `attribution.html`.

    att = attribute(lm, load_context("notes/"), "Who signed the contract?")       # the model answers
    att = attribute(lm, "The deed was signed by ...", "Who signed it?", answer="Ada Brandt")  # given
    att.support, att.sources(), att.tokens[0].state
    att.save("out/")

Without `heads`, the watched heads are the top K of the map shipped for the model
(`shipped_map`: its alias, or a hub id or folder whose last part names a shipped map).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..decoding import check_control_strings
from ..errors import ConfigError
from ..heads import Head
from ..models import LoadedModel
from ..reference import reference_names
from ..results import DetectionResult
from ..runs import strict_json
from ..scorefile import atomic_write_text
from .context import Passage, TracePrompt, as_passages, build_trace_prompt
from .page import render_html
from .scores import TokenAttribution, answer_scores, token_scores
from .tracing import DEFAULT_K, trace, watched_heads

FORMAT = "retrieval-heads attribution v1"
JSON_FILE, HTML_FILE = "attribution.json", "attribution.html"
PAGE_START = '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Attribution</title>'


def _ours(path: Path) -> bool:
    """Whether an existing output file is one we wrote: our format on its first JSON line, or our page."""
    if path.is_symlink() or not path.is_file():  # a link or a pipe is never one of ours
        return False
    try:
        with path.open("rb") as f:
            head = f.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    if path.suffix == ".html":
        return head.startswith(PAGE_START)
    return f'"format": "{FORMAT}"' in head or f'"format":"{FORMAT}"' in head


def check_outputs(folder: str | Path, names: Sequence[str]) -> None:
    """Refuse (one ConfigError) to replace an output file of `names` in `folder` that we did not write
    (a user's attribution.json), before anything is written."""
    for name in names:
        p = Path(folder) / name
        if (p.exists() or p.is_symlink()) and not _ours(p):
            raise ConfigError(f"{p} exists and is not an attribution file; give another output folder")


def shipped_map(model: str) -> str | None:
    """`ref:<name>` of the score map shipped for `model` (an alias, or a hub id or local folder
    whose last part is a map's name, case aside: meta-llama/Meta-Llama-3-8B-Instruct ->
    ref:Meta-Llama-3-8B-Instruct), else None."""
    names = {n.lower(): n for n in reference_names()}
    key = model.rstrip("/").rsplit("/", 1)[-1].lower()
    return f"ref:{names[key]}" if key in names else None


def default_heads(model: str, k: int = DEFAULT_K) -> tuple[list[Head], str]:
    """The top-k heads of the map shipped for `model`, and that map's name."""
    source = shipped_map(model)
    if source is None:
        raise ConfigError(
            f"no shipped score map for {model!r}; give the heads or a score map (a detection run of this "
            f"model: retrieval-heads detect --model {model})"
        )
    return watched_heads(DetectionResult.load(source), k), source


@dataclass
class Attribution:
    """The answer to one question, each token attributed; `support` is the answer's copy support."""

    model: str
    question: str
    answer: str
    heads: list[Head]
    heads_source: str
    engine: str
    prompt: TracePrompt
    tokens: list[TokenAttribution]
    scores: dict[str, float] = field(default_factory=dict)
    given: bool = False  # the answer was given (teacher-forced), not generated

    @property
    def support(self) -> float:
        return self.scores["copy"]

    def sources(self) -> list[dict[str, Any]]:
        """The context sentences that the answer's content tokens point to, most tokens first."""
        count: dict[int, int] = {}
        for t in self.tokens:
            if t.content and t.sentence is not None:
                count[t.sentence] = count.get(t.sentence, 0) + 1
        order = sorted(count, key=lambda s: (-count[s], s))
        ps = self.prompt
        return [
            {
                "sentence": s,
                "passage": ps.passage_names[ps.sentences[s].passage],
                "tokens": count[s],
                "text": ps.sentences[s].text,
            }
            for s in order
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "question": self.question,
            "answer": self.answer,
            "answer_given": self.given,
            "support": self.support,
            "scores": self.scores,
            "heads": [f"L{l}-H{h}" for l, h in self.heads],
            "heads_source": self.heads_source,
            "engine": self.engine,
            "sources": self.sources(),
            "tokens": [{**asdict(t), "supported": t.supported, "state": t.state} for t in self.tokens],
            "prompt": self.prompt.to_dict(),
        }

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """`attribution.json` and `attribution.html` in `folder`, each written atomically."""
        d = Path(folder)
        check_outputs(d, (JSON_FILE, HTML_FILE))
        d.mkdir(parents=True, exist_ok=True)
        data = strict_json(self.to_dict())
        atomic_write_text(d / JSON_FILE, json.dumps(data, indent=1, ensure_ascii=False))
        atomic_write_text(d / HTML_FILE, render_html([data]))
        return d / JSON_FILE, d / HTML_FILE


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The tokens of a given answer as the model would write them after the prompt."""
    check_control_strings(tokenizer, answer)
    ids = list(tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError("the answer is empty")
    return ids


def attribute(
    lm: LoadedModel,
    context: Sequence[Passage] | str | Path,
    question: str,
    heads: Sequence[Head] | None = None,
    *,
    answer: str | None = None,
    prompt_template: str | None = None,
    k: int = DEFAULT_K,
    heads_source: str = "",
    max_new_tokens: int = 48,
    chat: bool = True,
    engine: str = "fast",
) -> Attribution:
    """Attribute every token of the answer to `question` from `context`.

    Args:
        lm: the model (`load_model`).
        context: a list of `Passage`s, a text (one passage), or a `Path` to a file or a folder of
            .txt/.md files (`load_context`).
        question: the question, placed after the documents by the default prompt.
        heads: the watched heads, `(layer, head)` pairs; default: the top `k` heads of the map
            shipped for the model (`shipped_map`), else a ConfigError.
        answer: an answer you already have: all its tokens are traced, teacher-forced, instead of
            the model's greedy answer (which stops at EOS or a line break, or after `max_new_tokens`).
        prompt_template: the user message with `{context}` and `{question}`, once each.
        engine: "fast" (SDPA, rows recomputed) or "reference" (eager attention): the same readings.

    Returns:
        The `Attribution`: answer, scores, per-token states and sources; `.save(folder)` writes
        attribution.json and attribution.html.
    """
    if heads is None:
        heads, heads_source = default_heads(lm.spec.name, k)
    prompt = build_trace_prompt(
        lm.tokenizer,
        as_passages(context),
        question,
        chat=chat,
        template=prompt_template,
        max_tokens=lm.spec.max_context - max(max_new_tokens, 1),
    )
    forced = None if answer is None else answer_ids(lm.tokenizer, answer)
    tr = trace(lm, prompt, heads, max_new_tokens=max_new_tokens, engine=engine, answer_ids=forced)
    tokens = token_scores(prompt, tr, lm.tokenizer)
    text = answer.strip() if answer is not None else lm.tokenizer.decode(tr.generated_ids, skip_special_tokens=True)
    return Attribution(
        lm.spec.name,
        question,
        text.strip(),
        list(heads),
        heads_source,
        engine,
        prompt,
        tokens,
        answer_scores(tokens),
        given=answer is not None,
    )
