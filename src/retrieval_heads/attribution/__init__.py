"""Answer attribution: where each answer token came from, and whether a retrieval head supports it.

    lm = load_model("smollm2-135m")
    att = attribute(lm, load_context("notes/"), "Who signed the contract?")   # heads: ref:smollm2-135m
    att = attribute(lm, context, question, answer="Ada Brandt")  # trace an answer you already have
    att.support            # the answer's support: mean copy support over its content tokens
    att.tokens[0].sentence # index into att.prompt.sentences: the token's source sentence
    att.tokens[0].state    # context, question, unsupported or other
    att.save("out/")       # attribution.json + attribution.html (self-contained, offline)

Modules, each on the ones below it: `batch` (many questions, one model load), `answer` (one
attributed answer: `attribute`, `Attribution`), `page` (the HTML page), `scores` (token and answer
scores), `tracing` (the engine that reads the attention rows; grounding-eval and passage-rank use
it too), `context` (documents, the prompt layout and its token spans).
"""

from __future__ import annotations

from .answer import HTML_FILE, JSON_FILE, Attribution, attribute, default_heads, shipped_map
from .batch import BATCH_FILE, Question, attribute_batch, read_questions, save_batch
from .context import (
    CONTEXT,
    INSTRUCTION,
    OTHER,
    QUESTION,
    REGIONS,
    SINK,
    Passage,
    Sentence,
    TracePrompt,
    build_trace_prompt,
    load_context,
    prompt_of_sample,
    sentence_spans,
)
from .page import render_html
from .scores import SCORE_FIELDS, STATES, TokenAttribution, answer_scores, token_scores
from .tracing import DEFAULT_K, ENGINES, Trace, question_attention, trace, watched_heads

__all__ = [
    "BATCH_FILE",
    "CONTEXT",
    "DEFAULT_K",
    "ENGINES",
    "HTML_FILE",
    "INSTRUCTION",
    "JSON_FILE",
    "OTHER",
    "QUESTION",
    "REGIONS",
    "SCORE_FIELDS",
    "SINK",
    "STATES",
    "Attribution",
    "Passage",
    "Question",
    "Sentence",
    "TokenAttribution",
    "Trace",
    "TracePrompt",
    "answer_scores",
    "attribute",
    "attribute_batch",
    "build_trace_prompt",
    "default_heads",
    "load_context",
    "prompt_of_sample",
    "question_attention",
    "read_questions",
    "render_html",
    "save_batch",
    "sentence_spans",
    "shipped_map",
    "token_scores",
    "trace",
    "watched_heads",
]
