"""Answer attribution: where each generated token came from, and whether a retrieval head supports it.

    lm = load_model("smollm2-135m")
    heads = watched_heads(DetectionResult.load("ref:smollm2-135m"), k=10)
    att = attribute(lm, load_context("notes/"), "Who signed the contract?", heads)
    att.support            # the answer's support: mean copy support over its content tokens
    att.tokens[0].sentence # index into att.prompt.sentences: the token's source sentence
    att.save("out/")       # attribution.json + attribution.html (self-contained, offline)

Per generated token t, for each watched head (the top-K heads of a detection run, a score file or a
shipped map), the attention row of the query that produced t (as in detection: the last prompt
position for the first token, then each decode step) gives:

- the **argmax** key position; the head *copies* t when that key lies in the context and holds the
  same token id as t (the paper's copy-paste criterion);
- the attention **mass** on each prompt region (sink = the first 4 positions, context, question,
  the rest of the template) and on each context sentence.

Token scores: ``copy`` = share of watched heads that copy t (**the support score**); ``context_mass``
= mean mass of the watched heads on the context; the **source sentence** = the context sentence
with the largest mean mass of the watched heads. The same two scores over *all* heads
(``all_copy``, ``all_context_mass``) and the model's own log-probability and entropy of t are kept
as the baselines of the grounding evaluation. The answer's scores are means over its content
tokens (tokens with a letter or digit); a content token is *unsupported* when no watched head
copies it.

Two paths read the same rows: ``reference`` (eager attention with `output_attentions`, the
oracle, as `engines.reference`) and ``fast`` (SDPA, the rows recomputed by `engines.fast`'s
capture function); tests assert they agree.

Passage ranking (`question_attention`): the attention mass that the question's tokens pay to each
passage, per head, from one eager pass over the question's rows (QRHead-like, without its
calibration).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decoding import StopRule, build_prompt, cache_io, greedy, greedy_with_attentions
from .engines.base import SINK_TOKENS
from .errors import ConfigError, DataError
from .heads import Head, top_heads
from .masking import mask_heads
from .models import LoadedModel, attention_implementation
from .needles import Sample
from .results import DetectionResult
from .scorefile import atomic_write_text

ENGINES = ("fast", "reference")
DEFAULT_K = 10
REGIONS = ("other", "sink", "context", "question")  # prompt regions; keys after the prompt: generated
OTHER, SINK, CONTEXT, QUESTION = range(4)
INSTRUCTION = "Answer the question using only the documents below. Reply with a short answer."
CONTEXT_SUFFIXES = (".txt", ".md")
MAX_CONTEXT_FILES = 200
JSON_FILE, HTML_FILE = "attribution.json", "attribution.html"


# ----------------------------------------------------------------------------------- context and prompt
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
    elif p.is_file():
        files = [p]
    else:
        raise DataError(f"{p}: no such file or folder")
    out = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"{f}: not UTF-8 text") from None
        if text:
            out.append(Passage(f.name, text))
    if not out:
        raise DataError(f"{p}: the context is empty")
    return out


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
) -> TracePrompt:
    """Tokenize `text` and map character spans to tokens: `passages` are (name, start, end) and
    `question` (start, end) character spans in `text`. A token belongs to the span holding its
    last character."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
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


def build_trace_prompt(
    tokenizer: Any,
    passages: Sequence[Passage],
    question: str,
    *,
    chat: bool = True,
    instruction: str = INSTRUCTION,
    assistant_prefix: str = "",
    titled: bool = True,
) -> TracePrompt:
    """The attribution prompt: instruction, the passages (titled "Document i (name):" when
    `titled` and there are several), then "Question: ..." in one user message."""
    if not question.strip():
        raise ConfigError("the question is empty")
    if not passages:
        raise DataError("no passage in the context")
    parts: list[str] = [instruction] if instruction else []
    where: list[tuple[str, int, int]] = []
    for i, p in enumerate(passages):
        head = f"Document {i + 1} ({p.name}):\n" if titled and len(passages) > 1 else ""
        parts.append(head + p.text)
    body = "\n\n".join(parts) + f"\n\nQuestion: {question.strip()}"
    text = build_prompt(tokenizer, body, chat=chat, assistant_prefix=assistant_prefix, plain_separator="\n")
    pos = text.find(body)
    if pos < 0:
        raise DataError("the chat template altered the message text")
    cursor = pos
    for p in passages:
        c0 = text.index(p.text, cursor)
        where.append((p.name, c0, c0 + len(p.text)))
        cursor = c0 + len(p.text)
    q0 = text.index(question.strip(), cursor)
    return locate_prompt(tokenizer, text, where, (q0, q0 + len(question.strip())))


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


# ----------------------------------------------------------------------------------- heads
def watched_heads(scores: DetectionResult, k: int = DEFAULT_K, exclude: Sequence[Head] = ()) -> list[Head]:
    """The top-k heads of a detection result by its ranking (score, then its tie-break), leaving
    out `exclude` (masked heads, whose attention is meaningless)."""
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    if np.isnan(scores.scores).all():
        raise ConfigError(f"{scores.name}: the score map scores no head")
    skip = set(exclude)
    ranked = [h for h in top_heads(scores.scores, scores.shape[0] * scores.shape[1], scores.tiebreak) if h not in skip]
    return ranked[:k]


# ----------------------------------------------------------------------------------- tracing
@dataclass
class Trace:
    """Raw per-step readings of one greedy generation (steps = generated tokens).

    argmax: int `[steps, L, H]` absolute key positions; region_mass: float `[steps, L, H, 4]` mass
    on the prompt regions (`REGIONS`); sentence_mass: float `[steps, n_sentences]` mean mass of the
    watched heads; logprob, entropy: `[steps]` of the model's next-token distribution (nats)."""

    generated_ids: list[int]
    argmax: np.ndarray
    region_mass: np.ndarray
    sentence_mass: np.ndarray
    logprob: np.ndarray
    entropy: np.ndarray
    watched: list[Head]


class _Reader:
    """Reduces each step's attention rows (per layer: fp32 weights `[H, K]` over the keys
    `[offset, offset + K)`) to a Trace's readings as they arrive (nothing O(n^2) is kept)."""

    def __init__(self, prompt: TracePrompt, watched: Sequence[Head], device: Any) -> None:
        import torch

        n = prompt.n
        self.n = n
        self.watched = list(watched)
        self.region = torch.nn.functional.one_hot(torch.as_tensor(prompt.regions()), len(REGIONS)).float().to(device)
        sent = torch.as_tensor(prompt.sentence_of())
        n_sent = max(len(prompt.sentences), 1)
        onehot = torch.zeros(n, n_sent)
        inside = sent >= 0
        onehot[torch.nonzero(inside)[:, 0], sent[inside]] = 1.0
        self.sent = onehot.to(device)
        self.n_sent = len(prompt.sentences)
        self.steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = []

    def read(self, rows: Sequence[tuple[Any, int]], logits: Any) -> None:
        import torch

        argmax, mass = [], []
        sent = torch.zeros(self.sent.shape[1], device=self.sent.device)
        for layer, (w, off) in enumerate(rows):
            argmax.append(w.argmax(-1) + off)
            p = max(self.n - off, 0)  # keys of the row that are prompt positions
            mass.append(w[:, :p] @ self.region[off : off + p])
            for l, h in self.watched:
                if l == layer:
                    sent += w[h, :p] @ self.sent[off : off + p]
        logp = torch.log_softmax(logits.float(), -1)
        self.steps.append(
            (
                torch.stack(argmax).cpu().numpy().astype(np.int64),
                torch.stack(mass).cpu().numpy(),
                (sent / max(len(self.watched), 1)).cpu().numpy()[: self.n_sent],
                float(logp.max()),
                float(-(logp.exp() * logp).sum()),
            )
        )

    def trace(self, generated: list[int]) -> Trace:
        a, m, s, lp, ent = zip(*self.steps, strict=True) if self.steps else ((), (), (), (), ())
        return Trace(generated, np.stack(a), np.stack(m), np.stack(s), np.array(lp), np.array(ent), self.watched)


def trace(
    lm: LoadedModel,
    prompt: TracePrompt,
    watched: Sequence[Head],
    *,
    max_new_tokens: int = 48,
    stop: Callable[[list[int]], bool] | None = None,
    engine: str = "fast",
    masked: Sequence[Head] = (),
) -> Trace:
    """Generate greedily from `prompt` and read every head's attention row for each generated
    token (`engine`: fast or reference, the same readings); `masked` heads are masked (uniform,
    prefill and decode) while generating."""
    import torch

    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt.n + max_new_tokens > lm.spec.max_context:
        raise ConfigError(
            f"prompt of {prompt.n} tokens + {max_new_tokens} new tokens exceeds {lm.spec.name}'s "
            f"context of {lm.spec.max_context}"
        )
    L, H = lm.spec.shape
    for l, h in watched:
        if not (0 <= l < L and 0 <= h < H):
            raise ConfigError(f"head L{l}-H{h} is outside {lm.spec.name}'s {L} x {H} heads")
    model = lm.model
    device = next(model.parameters()).device
    stop = stop or StopRule(lm.tokenizer)
    reader = _Reader(prompt, watched, device)
    ids = torch.tensor([prompt.ids], device=device)
    n = prompt.n
    with torch.no_grad(), mask_heads(model, list(masked)):
        if engine == "fast":
            from .engines.fast import capture_argmax

            with capture_argmax(model) as rec:

                def fast_step(t: int, out: Any) -> None:
                    total = n + t  # keys up to the query that produces token t
                    rows = [(rec.rows[i][2][0], total - rec.rows[i][1]) for i in range(L)]
                    rec.rows.clear()
                    reader.read(rows, out.logits[0, -1])

                generated, _ = greedy(
                    model, ids, cache=None, max_new_tokens=max_new_tokens, stop=stop, on_step=fast_step
                )
        else:

            def eager_step(t: int, out: Any) -> None:
                total = n + t
                reader.read([(a[0, :, -1, :].float(), total - a.shape[-1]) for a in out.attentions], out.logits[0, -1])

            with attention_implementation(model, "eager"):
                generated = greedy_with_attentions(
                    model, ids, max_new_tokens=max_new_tokens, stop=stop, on_step=eager_step
                )
    return reader.trace(generated)


def question_attention(lm: LoadedModel, prompt: TracePrompt) -> np.ndarray:
    """float `[L, H, n_passages]`: per head, the attention mass that the question's tokens pay to
    each passage, summed over the question's tokens. The prompt up to the question is prefilled
    with the model's own attention, then the question's rows are read with eager attention."""
    import torch

    q0, q1 = prompt.question
    if q0 < 1 or q1 <= q0:
        raise DataError("the prompt has no question after its context")
    model = lm.model
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)
    onehot = torch.zeros(q1, len(prompt.passages), device=device)
    for i, (s, e) in enumerate(prompt.passages):
        onehot[s:e, i] = 1.0
    kw, attr = cache_io(model)
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :q0], use_cache=True), attr)
        with attention_implementation(model, "eager"):
            out = model(input_ids=ids[:, q0:q1], **{kw: cache}, use_cache=True, output_attentions=True)
    layers = []
    for a in out.attentions:  # [1, H, question rows, K_l]: the last K_l keys up to q1
        k = a.shape[-1]
        layers.append((a[0].float() @ onehot[q1 - k : q1]).sum(1))  # [H, passages]
    return torch.stack(layers).cpu().numpy()


# ----------------------------------------------------------------------------------- scores
def is_content(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


@dataclass(frozen=True)
class TokenAttribution:
    """One generated token: its scores (see the module docstring) and where the watched heads look."""

    index: int
    token_id: int
    text: str
    content: bool
    copy: float
    context_mass: float
    sink_mass: float
    all_copy: float
    all_context_mass: float
    logprob: float
    entropy: float
    sentence: int | None  # index into the prompt's sentences, None when no sentence gets attention
    sentence_share: float  # that sentence's share of the watched heads' mass on the context
    argmax: tuple[int, ...]  # the watched heads' argmax positions
    copying_heads: tuple[str, ...]

    @property
    def supported(self) -> bool:
        return not self.content or self.copy > 0


def token_scores(prompt: TracePrompt, tr: Trace, tokenizer: Any) -> list[TokenAttribution]:
    """Per generated token, the scores of the module docstring from a Trace."""
    region = prompt.regions()
    ids = np.asarray(prompt.ids)
    out = []
    wl = [l for l, _ in tr.watched]
    wh = [h for _, h in tr.watched]
    for t, tok in enumerate(tr.generated_ids):
        a = tr.argmax[t]  # [L, H]
        inside = a < prompt.n
        safe = np.where(inside, a, 0)
        copies = inside & (region[safe] == CONTEXT) & (ids[safe] == tok)
        mass = tr.region_mass[t]  # [L, H, 4]
        sm = tr.sentence_mass[t]
        ctx = float(mass[wl, wh, CONTEXT].mean()) if tr.watched else float("nan")
        best = int(sm.argmax()) if sm.size and sm.max() > 0 else None
        text = tokenizer.decode([tok], skip_special_tokens=True)
        out.append(
            TokenAttribution(
                index=t,
                token_id=int(tok),
                text=text,
                content=is_content(text),
                copy=float(copies[wl, wh].mean()) if tr.watched else float("nan"),
                context_mass=ctx,
                sink_mass=float(mass[wl, wh, SINK].mean()) if tr.watched else float("nan"),
                all_copy=float(copies.mean()),
                all_context_mass=float(mass[..., CONTEXT].mean()),
                logprob=float(tr.logprob[t]),
                entropy=float(tr.entropy[t]),
                sentence=best,
                sentence_share=float(sm[best] / ctx) if best is not None and ctx > 0 else 0.0,
                argmax=tuple(int(x) for x in a[wl, wh]),
                copying_heads=tuple(f"L{l}-H{h}" for l, h in tr.watched if copies[l, h]),
            )
        )
    return out


SCORE_FIELDS = ("copy", "context_mass", "all_copy", "all_context_mass", "logprob", "entropy", "sink_mass")


def answer_scores(tokens: Sequence[TokenAttribution]) -> dict[str, float]:
    """Means over the answer's content tokens (all tokens when none is a content token; NaN for
    no token) of each token score, plus the share of unsupported content tokens."""
    chosen = [t for t in tokens if t.content] or list(tokens)
    if not chosen:
        return {**{f: float("nan") for f in SCORE_FIELDS}, "unsupported": float("nan"), "n_tokens": 0}
    out = {f: float(np.mean([getattr(t, f) for t in chosen])) for f in SCORE_FIELDS}
    out["unsupported"] = float(np.mean([not t.supported for t in chosen]))
    out["n_tokens"] = len(chosen)
    return out


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
            "format": "retrieval-heads attribution v1",
            "model": self.model,
            "question": self.question,
            "answer": self.answer,
            "support": self.support,
            "scores": self.scores,
            "heads": [f"L{l}-H{h}" for l, h in self.heads],
            "heads_source": self.heads_source,
            "engine": self.engine,
            "sources": self.sources(),
            "tokens": [{**asdict(t), "supported": t.supported} for t in self.tokens],
            "prompt": self.prompt.to_dict(),
        }

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """`attribution.json` and `attribution.html` in `folder`, each written atomically."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        data = json.dumps(_finite(self.to_dict()), indent=1, ensure_ascii=False)
        atomic_write_text(d / JSON_FILE, data)
        atomic_write_text(d / HTML_FILE, render_html(self))
        return d / JSON_FILE, d / HTML_FILE


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def attribute(
    lm: LoadedModel,
    passages: Sequence[Passage],
    question: str,
    heads: Sequence[Head],
    *,
    heads_source: str = "",
    max_new_tokens: int = 48,
    chat: bool = True,
    engine: str = "fast",
) -> Attribution:
    """Answer `question` from `passages` greedily and attribute every generated token."""
    prompt = build_trace_prompt(lm.tokenizer, passages, question, chat=chat)
    tr = trace(lm, prompt, heads, max_new_tokens=max_new_tokens, engine=engine)
    tokens = token_scores(prompt, tr, lm.tokenizer)
    answer = lm.tokenizer.decode(tr.generated_ids, skip_special_tokens=True).strip()
    return Attribution(
        lm.spec.name, question, answer, list(heads), heads_source, engine, prompt, tokens, answer_scores(tokens)
    )


# ----------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1000px;
padding:1.5em;color:#222;line-height:1.5}
.meta{color:#666;font-size:.9em} .answer{font-size:1.25em;background:#f7f7f7;padding:.6em .8em;border-radius:4px}
a.tok{color:inherit;text-decoration:none;border-bottom:2px solid #4a90d9;padding:0 1px}
span.tok{padding:0 1px} .unsupported{background:#ffd6d6;border-bottom:2px dashed #c00 !important}
.sent{border-radius:3px} .sent.active{outline:2px solid #4a90d9;background:#cfe3ff !important}
.passage{border:1px solid #ddd;padding:.6em .9em;margin:.8em 0;white-space:pre-wrap}
.passage h3{margin:.1em 0 .4em;font-size:1em;white-space:normal}
table.data{border-collapse:collapse;font-size:.85em}
table.data td,table.data th{border:1px solid #ddd;padding:.2em .5em}
.legend span{margin-right:1.2em}
"""

_JS = """
document.querySelectorAll('a.tok').forEach(function(a){
  var s=document.getElementById(a.getAttribute('href').slice(1));
  if(!s){return;}
  a.addEventListener('mouseenter',function(){s.classList.add('active');});
  a.addEventListener('mouseleave',function(){s.classList.remove('active');});
  a.addEventListener('focus',function(){s.classList.add('active');});
  a.addEventListener('blur',function(){s.classList.remove('active');});
});
"""


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def render_html(att: Attribution) -> str:
    """One self-contained page (no network): the answer, each token linked to its source sentence,
    unsupported tokens marked; the context with sentences shaded by how many answer tokens point
    to them; the per-token table. Every user text is escaped."""
    e = html.escape
    ps = att.prompt
    votes = {s["sentence"]: s["tokens"] for s in att.sources()}
    top = max(votes.values(), default=1)
    toks = []
    for t in att.tokens:
        title = (
            f"copy {_fmt(t.copy)} ({', '.join(t.copying_heads) or 'no head'}), context mass {_fmt(t.context_mass)}, "
            f"log-prob {_fmt(t.logprob)}"
        )
        cls = "tok unsupported" if not t.supported else "tok"
        if t.sentence is not None and t.content:
            toks.append(f'<a class="{cls}" href="#s{t.sentence}" title="{e(title)}">{e(t.text)}</a>')
        else:
            toks.append(f'<span class="{cls}" title="{e(title)}">{e(t.text)}</span>')
    passages = []
    by_passage: dict[int, list[int]] = {}
    for i, s in enumerate(ps.sentences):
        by_passage.setdefault(s.passage, []).append(i)
    for p, name in enumerate(ps.passage_names):
        sents = []
        for i in by_passage.get(p, []):
            alpha = 0.15 + 0.55 * votes[i] / top if i in votes else 0.0
            style = f' style="background:rgba(255,200,0,{alpha:.2f})"' if alpha else ""
            sents.append(f'<span class="sent" id="s{i}"{style}>{e(ps.sentences[i].text)}</span>')
        passages.append(f'<div class="passage"><h3>{e(name)}</h3>{" ".join(sents)}</div>')
    rows = "".join(
        f"<tr><td>{t.index}</td><td>{e(repr(t.text))}</td><td>{_fmt(t.copy)}</td><td>{_fmt(t.context_mass)}</td>"
        f"<td>{_fmt(t.logprob)}</td><td>{'' if t.supported else 'unsupported'}</td>"
        f"<td>{'' if t.sentence is None else t.sentence}</td></tr>"
        for t in att.tokens
    )
    sc = att.scores
    heads = ", ".join(f"L{l}-H{h}" for l, h in att.heads)
    body = f"""<h1>Where the answer came from</h1>
<p class="meta">model {e(att.model)}; watched heads ({len(att.heads)}, from {e(att.heads_source or "given")}):
{e(heads)}; engine {e(att.engine)}</p>
<p><b>Question:</b> {e(att.question)}</p>
<p class="answer" id="answer">{"".join(toks)}</p>
<p><b>Support {_fmt(sc.get("copy", float("nan")))}</b> (share of watched heads copying each content token from the
context, averaged); unsupported content tokens {_fmt(100 * sc.get("unsupported", float("nan")), 0)} %;
context mass {_fmt(sc.get("context_mass", float("nan")))}; mean log-prob {_fmt(sc.get("logprob", float("nan")))}.</p>
<p class="legend"><span><a class="tok" href="#answer">token</a> linked to its source sentence (hover)</span>
<span><span class="tok unsupported">token</span> no watched head copies it</span></p>
<h2>Context</h2>
{"".join(passages)}
<h2>Tokens</h2>
<table class="data"><tr><th>#</th><th>token</th><th>copy</th><th>context mass</th><th>log-prob</th><th></th>
<th>sentence</th></tr>{rows}</table>"""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Attribution</title>'
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n<script>{_JS}</script>\n</body></html>\n"
    )
