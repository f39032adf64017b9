"""Every reader of a user's file (score maps, run folders, needles, haystacks, task data) ends in a
clean result or our own RetrievalHeadsError (errors.py), never another exception: property tests on
random bytes, random JSON and JSON shaped like our files."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval_heads.errors import DataError, RetrievalHeadsError
from retrieval_heads.runs import read_records


def _reader_cases():
    from retrieval_heads.distributed import merge_runs
    from retrieval_heads.experiments.kv_eval import KVEvalResult
    from retrieval_heads.experiments.mask_results import MaskEvalResult
    from retrieval_heads.experiments.task_eval import TaskEvalResult
    from retrieval_heads.needles import load_haystack, load_needles
    from retrieval_heads.results import DetectionResult
    from retrieval_heads.runs import read_config
    from retrieval_heads.scorefile import read_scores
    from retrieval_heads.tasks.qa import read_json as qa_read_json
    from retrieval_heads.tasks.reasoning import read_jsonl_gz

    def folder(d: Path, config: bytes, records: bytes) -> Path:
        d.mkdir(exist_ok=True)
        (d / "config.json").write_bytes(config)
        (d / "records.jsonl").write_bytes(records)
        return d

    return {
        "read_scores": lambda d, a, b: read_scores(_write(d / "s.json", a)),
        "read_records": lambda d, a, b: read_records(_write(d / "r.jsonl", a)),
        "read_config": lambda d, a, b: read_config(_write(d / "config.json", a)),
        "load_needles": lambda d, a, b: load_needles(_write(d / "n.jsonl", a)),
        "load_haystack": lambda d, a, b: load_haystack(_write(d / "h.txt", a)),
        "DetectionResult.load(file)": lambda d, a, b: DetectionResult.load(_write(d / "x.json", a)),
        "DetectionResult.load(folder)": lambda d, a, b: DetectionResult.load(folder(d / "run", a, b)),
        "MaskEvalResult.load": lambda d, a, b: MaskEvalResult.load(folder(d / "run", a, b)),
        "TaskEvalResult.load": lambda d, a, b: TaskEvalResult.load(folder(d / "run", a, b)),
        "KVEvalResult.load": lambda d, a, b: KVEvalResult.load(folder(d / "run", a, b)),
        "merge_runs": lambda d, a, b: merge_runs([folder(d / "run", a, b)]),
        # task data: SQuAD/HotpotQA JSON and GSM8K/MMLU JSONL (plain or gzip)
        "qa data": lambda d, a, b: qa_read_json(str(_write(d / "squad.json", a))),
        "reasoning jsonl": lambda d, a, b: read_jsonl_gz(_write(d / "t.jsonl", a)),
        "reasoning jsonl.gz": lambda d, a, b: read_jsonl_gz(_write(d / "t.jsonl.gz", a)),
    }


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_every_reader_is_checked():
    assert sorted(_reader_cases()) == sorted(READERS)


def _check_reader(name: str, first: bytes, second: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _reader_cases()[name](Path(tmp), first, second)
        except RetrievalHeadsError:
            pass  # our own, one-line error: fine; anything else fails the test


READERS = [
    "read_scores",
    "read_records",
    "read_config",
    "load_needles",
    "load_haystack",
    "DetectionResult.load(file)",
    "DetectionResult.load(folder)",
    "MaskEvalResult.load",
    "TaskEvalResult.load",
    "KVEvalResult.load",
    "merge_runs",
    "qa data",
    "reasoning jsonl",
    "reasoning jsonl.gz",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
# JSON shaped like our files, so the readers get past the parser: score maps, records, configs
head_keys = st.builds(lambda l, h: f"{l}-{h}", st.integers(0, 5000), st.integers(0, 5000))
score_maps = st.dictionaries(
    head_keys | st.text(max_size=5), json_values | st.lists(st.floats(), max_size=3), max_size=5
)
records = st.lists(
    st.fixed_dictionaries(
        {"id": st.text(max_size=3) | st.integers()},
        optional={
            "kept": json_values,
            "needle_tokens": json_values,
            "span_tokens": json_values,
            "copy_counts": json_values | st.lists(st.lists(st.integers(-1, 3) | st.floats(), max_size=3), max_size=3),
            "k": json_values,
            "kind": st.sampled_from(["base", "top", "random", "ranking", "memory"]) | json_values,
            "condition": json_values,
            "scores": json_values,
            "length": json_values,
            "depth": json_values,
        },
    ),
    max_size=4,
)
configs = st.fixed_dictionaries(
    {"version": st.just("0.1.0"), "model": st.text(max_size=5)},
    optional={
        "grid": json_values,
        "task": json_values,
        "kind": json_values,
        "ks": json_values,
        "conditions": json_values,
        "metrics": json_values,
        "needles": json_values,
    },
)


def _dump(obj) -> bytes:
    return json.dumps(obj).encode()


def _jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("reader", READERS)
@PROPERTY
@given(first=st.binary(max_size=200), second=st.binary(max_size=200))
def test_readers_on_random_bytes(reader, first, second):
    _check_reader(reader, first, second)


@pytest.mark.parametrize("reader", READERS)
@PROPERTY
@given(first=json_values, second=st.lists(json_values, max_size=4))
def test_readers_on_random_json(reader, first, second):
    _check_reader(reader, _dump(first), _jsonl(second))


@pytest.mark.parametrize("reader", READERS)
@PROPERTY
@given(data=st.data())
def test_readers_on_json_shaped_like_our_files(reader, data):
    if reader in ("read_scores", "DetectionResult.load(file)"):
        first = _dump(data.draw(score_maps))
    elif reader == "load_needles":
        first = _jsonl(
            data.draw(st.lists(st.dictionaries(st.sampled_from(["needle", "question", "answer", "id"]), json_values)))
        )
    else:
        first = _dump(data.draw(configs))
    _check_reader(reader, first, _jsonl(data.draw(records)))


@PROPERTY
@given(obj=json_values | score_maps)
def test_parse_scores_on_random_json(obj):
    from retrieval_heads.scorefile import parse_scores

    try:
        out = parse_scores(obj, "x")
    except DataError:
        return
    assert out.ndim == 3 and np.isfinite(out).all() and (out >= 0).all()


@PROPERTY
@given(recs=records | st.lists(json_values, max_size=3))
def test_from_records_on_random_json(recs):
    from retrieval_heads.results import DetectionResult

    try:
        r = DetectionResult.from_records("m", recs)
    except DataError:
        return
    assert np.isfinite(r.per_sample).all()
