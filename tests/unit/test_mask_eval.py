"""mask-eval end to end on tiny models: conditions, seeds, resume, error kinds, bad input via the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval_heads.decoding import StopRule
from retrieval_heads.errors import ConfigError
from retrieval_heads.experiments import conditions
from retrieval_heads.experiments.conditions import build_conditions, generate
from retrieval_heads.experiments.mask_eval import MaskEvalConfig, MaskEvalResult, mask_eval
from retrieval_heads.heads import random_heads, rank_heads
from retrieval_heads.needles import Needle, make_sample
from retrieval_heads.runs import read_records
from retrieval_heads.scorefile import write_scores
from retrieval_heads.tasks import niah
from retrieval_heads.tasks.base import Doc, Request
from retrieval_heads.tasks.niah import content_recall, error_kind, exact_match
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
    Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
)
SCORES = np.array([[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]])  # tiny llama: 2 layers x 4 heads


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", attn_implementation="sdpa")


@pytest.fixture
def cfg(haystack_file):
    return MaskEvalConfig(
        ks=(0, 2, 3),
        random_seeds=(0, 1),
        lengths=(80,),
        depths=(10.0, 90.0),
        needles=NEEDLES,
        max_new_tokens=5,
        chat=False,
        haystack=str(haystack_file),
        watch=3,
    )


def test_random_heads_exclude_the_top_set_and_are_seeded():
    scores = np.random.default_rng(0).random((6, 8))
    order = rank_heads(scores)
    assert order[0] == np.unravel_index(scores.argmax(), scores.shape)
    for k in (1, 5, 10, 24):
        top = set(order[:k])
        for seed in range(5):
            r = random_heads(order[k:], k, seed)
            assert len(r) == len(set(r)) == k and not top & set(r)
            assert r == random_heads(order[k:], k, seed)  # reproducible from the recorded seed
        if k < 24:  # k = 24 of 48 heads takes every outside head
            assert len({random_heads(order[k:], k, s) for s in range(5)}) > 1


def test_conditions(cfg):
    conds = build_conditions(SCORES, cfg.ks, cfg.random_seeds, cfg.watch)
    assert [c.id for c in conds] == [
        "base",
        "top-k2",
        "random-k2-s0",
        "random-k2-s1",
        "top-k3",
        "random-k3-s0",
        "random-k3-s1",
    ]
    top3 = next(c for c in conds if c.id == "top-k3")
    assert set(top3.heads) == {(0, 0), (1, 1), (1, 3)}
    for c in conds:
        if c.kind == "random":
            assert not set(c.heads) & set(rank_heads(SCORES)[: c.k])
        assert not set(c.watch) & set(c.heads) and len(c.watch) == 3  # watched heads are unmasked
    assert conds[0].watch == ((0, 0), (1, 1), (1, 3))


@pytest.mark.parametrize(
    "ks,match", [((9,), "larger than the number of heads"), ((5,), "cannot draw 5 random"), ((-1,), ">= 0")]
)
def test_bad_k(cfg, ks, match):
    with pytest.raises(ConfigError, match=match):
        c = MaskEvalConfig(**{**cfg.__dict__, "ks": ks})
        build_conditions(SCORES, c.ks, c.random_seeds, c.watch)


def test_random_heads_come_from_non_retrieval_heads_by_default():
    scores = np.random.default_rng(1).random((6, 8)) * 0.3  # about a third of the heads score > 0.1
    order = rank_heads(scores)
    default = build_conditions(scores, (0, 2, 5), range(4))
    assert default == build_conditions(scores, (0, 2, 5), range(4), pool="non-retrieval")
    outside = build_conditions(scores, (0, 2, 5), range(4), pool="outside-top")
    for conds in (default, outside):
        for c in conds:
            if c.kind == "random":
                assert len(set(c.heads)) == c.k and not set(c.heads) & set(order[: c.k])
    assert all(scores[h] <= 0.1 for c in default if c.kind == "random" for h in c.heads)
    assert any(scores[h] > 0.1 for c in outside if c.kind == "random" for h in c.heads)  # the old pool
    assert build_conditions(scores, (5,), (3,)) == build_conditions(scores, (5,), (3,))  # seeded
    # unscored (NaN) heads are never drawn as non-retrieval heads
    nan = SCORES.copy()
    nan[1, 2] = np.nan
    drawn = {h for c in build_conditions(nan, (2,), range(10)) if c.kind == "random" for h in c.heads}
    assert drawn == {(0, 1), (0, 3), (1, 0)}
    with pytest.raises(ConfigError, match="unknown random pool 'nearby'"):
        build_conditions(SCORES, (2,), (0,), pool="nearby")
    # 3 heads of SCORES score <= 0.1 outside its top 5: one clear error; the old pool allows K = 4
    with pytest.raises(ConfigError, match=r"cannot draw 5 random heads from the 3 heads with score <= 0\.1"):
        build_conditions(SCORES, (0, 5), (0,))
    with pytest.raises(ConfigError, match=r"cannot draw 4 random heads from the 2 heads with score <= 0\.1"):
        build_conditions(np.array([[0.9, 0.15, 0.2, 0.05], [0.0, 0.6, 0.15, 0.3]]), (4,), (0,))
    assert build_conditions(SCORES, (4,), (0,), pool="outside-top")[-1].k == 4
    assert build_conditions(SCORES, (5,), ())[-1].id == "top-k5"  # no random draw, no pool needed


def test_paired_top_minus_random_and_the_pool_in_the_table(tmp_path):
    from retrieval_heads.runs import CONFIG_FILE, RECORDS_FILE

    conds = build_conditions(SCORES, (0, 2), (0, 1))
    attention = {"sink": 0.5, "needle": 0.5, "elsewhere": 0.0}
    recs = [
        {"condition": c, "kind": c.split("-")[0], "k": 0 if c == "base" else 2, "seed": None, "sample_id": sid,
         "niah_score": v, "exact": v == 100, "error_kind": "retrieved", "attention": attention}
        for c, sid, v in [
            ("base", "a", 100.0), ("base", "b", 100.0),
            ("top-k2", "a", 0.0), ("top-k2", "b", 100.0),
            ("random-k2-s0", "a", 100.0), ("random-k2-s0", "b", 100.0),
            ("random-k2-s1", "a", 50.0),  # seed 1 did not finish sample b: b's random score is seed 0's
        ]
    ]  # fmt: skip
    res = MaskEvalResult("x", conds, recs, {"random_pool": "non-retrieval"})
    pd = res.paired()
    assert pd["k"] == [2] and pd["n"] == [2] and pd["mean"] == [(-75.0 + 0.0) / 2]  # a: 0 - 75, b: 100 - 100
    assert pd["low"][0] <= -37.5 <= pd["high"][0] and pd["low"][0] >= -75.0
    table = res.table()
    assert (
        table.splitlines()[0]
        == "random heads drawn from: heads with score <= 0.1 outside the top K (pool 'non-retrieval')"
    )
    assert "top minus random NIAH, paired [95% CI]" in table and "| -37.5 [" in table
    d = res.to_dict()
    assert d["paired_top_minus_random"] == pd and d["random_pool"] == "non-retrieval"
    assert d["bootstrap"]["n_boot"] == 2000 and d["bootstrap"]["seed"] == 0
    again = MaskEvalResult("x", conds, recs, {"random_pool": "non-retrieval"}, n_boot=500, boot_seed=3)
    assert again.paired()["mean"] == pd["mean"] and again.to_dict()["bootstrap"]["n_boot"] == 500
    # a run saved before `random_pool` existed loads, and says it drew from every head outside the top K
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"model": "x", "conditions": [c.to_dict() for c in conds]}))
    lines = [json.dumps({"id": f"{r['condition']}/{r['sample_id']}", **r}) + "\n" for r in recs]
    (tmp_path / RECORDS_FILE).write_text("".join(lines))
    old = MaskEvalResult.load(tmp_path)
    assert old.to_dict()["random_pool"] == "outside-top" and "every head outside the top K" in old.table()
    assert old.paired() == pd


def test_mask_eval_end_to_end_and_resume(lm, cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    res = mask_eval(lm, SCORES, cfg, out=out, show_progress=False)
    n = 7 * 2 * 2  # conditions x samples
    assert len(res.records) == n
    for name in ("config.json", "records.jsonl", "summary.json", "table.md"):  # the CLI draws mask_eval.png/.svg
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["random_seeds"] == [0, 1] and config["random_pool"] == "non-retrieval"
    assert {c["seed"] for c in config["conditions"] if c["kind"] == "random"} == {0, 1}
    rec = res.records[0]
    assert rec["error_kind"] in niah.ERROR_KINDS and 0 <= rec["niah_score"] <= 100
    assert set(rec["attention"]) == {"sink", "needle", "elsewhere"}
    assert abs(sum(rec["attention"].values()) - 1) < 1e-9
    assert np.asarray(rec["watch_argmax"]).shape == (len(rec["generated_ids"]), 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["curves"]["k"] == [0, 2, 3] and len(summary["errors"]) == 7
    assert summary["paired_top_minus_random"]["k"] == [2, 3] and summary["paired_top_minus_random"]["n"] == [4, 4]
    assert "| K |" in res.table()

    # resume: drop the last records and tear the last line, then rerun: only the missing ones run
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (out / "records.jsonl").write_text("".join(lines[:-3]) + lines[-3][:20])
    calls = []
    real = conditions.generate
    monkeypatch.setattr(conditions, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = mask_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert len(calls) == 3
    assert [r["generated_text"] for r in again.records] == [r["generated_text"] for r in res.records]
    assert len(read_records(out / "records.jsonl")) == n
    loaded = MaskEvalResult.load(out)
    assert loaded.curves() == again.curves()
    # a finished run reruns nothing
    calls.clear()
    mask_eval(lm, SCORES, cfg, out=out, show_progress=False)
    assert not calls

    # the HTML report shows the curves, the error kinds per condition and examples
    from retrieval_heads.report import build_report
    from retrieval_heads.results import DetectionResult

    page = build_report([DetectionResult("scores", SCORES[None])], mask_evals=[loaded])
    assert "Masking retrieval vs random heads" in page and "hallucination</th>" in page
    assert page.count("top-k2") >= 1 and "Examples</h3>" in page


def test_masking_the_top_heads_changes_tiny_generation(lm, cfg):
    """Sanity: masking every head with zero output changes the text (the hooks are active)."""
    full = MaskEvalConfig(**{**cfg.__dict__, "ks": (0, 8), "random_seeds": (), "method": "zero"})
    res = mask_eval(lm, SCORES, full, show_progress=False)
    base = [r["generated_ids"] for r in res.records if r["k"] == 0]
    masked = [r["generated_ids"] for r in res.records if r["k"] == 8]
    assert base != masked


@pytest.mark.parametrize("arch", ["gemma3", "gpt2"])
def test_sdpa_prefill_eager_decode_matches_eager(arch, haystack_file):
    from retrieval_heads.needles import load_haystack

    a = tiny_model(arch, attn_implementation="sdpa")
    b = tiny_model(arch, attn_implementation="eager")
    s = make_sample(a.tokenizer, load_haystack(haystack_file), NEEDLES[0], 80, 50, chat=False)
    watch = [(0, 1), (1, 2)]
    ga, wa = generate(a, s.prompt_ids, 6, StopRule(a.tokenizer), watch)
    gb, wb = generate(b, s.prompt_ids, 6, StopRule(b.tokenizer), watch)
    assert ga == gb and np.array_equal(wa, wb)
    assert a.model.config._attn_implementation == "sdpa"  # restored after decoding


def test_error_kinds(haystack_file):
    from retrieval_heads.needles import load_haystack

    lm = tiny_model("llama")
    s = make_sample(lm.tokenizer, load_haystack(haystack_file), NEEDLES[1], 120, 50, chat=False)
    assert error_kind(s, "the password is lantern fig seventy .") == ("retrieved", None)
    assert error_kind(s, "lantern fig") == ("incomplete", None)
    assert error_kind(s, "the password is blue") == ("hallucination", None)
    # copying the question or the needle's own words is not a wrong extraction
    assert error_kind(s, "what is the password ? the password is")[0] == "hallucination"
    kind, span = error_kind(s, "the city program language was made")
    assert kind == "wrong_extraction" and span == "the city program language was"
    assert exact_match("Lake Umber", "over lake umber.") and not exact_match("Lake Umber", "lake of umber")
    assert content_recall("a violet heron over Lake Umber", "a red bird") == 0.0


# ------------------------------------------------------------------------------------- CLI
def _scores_file(tmp_path, arr):
    p = tmp_path / "scores.json"
    write_scores(p, np.asarray(arr)[None])
    return p


@pytest.mark.parametrize(
    "args,match",
    [
        (["--k", "0,9"], "K=9 is larger than the number of heads (8)"),
        (["--k", "5"], "cannot draw 5 random heads"),
        (["--method", "gaussian"], "unknown masking method 'gaussian'"),
        (["--mask-phase", "prefill"], "unknown mask phase"),
        (["--k", "a,b"], "--k must be a comma list"),
        (["--random-pool", "nearby"], "unknown --random-pool 'nearby'"),
        (["--k", "5", "--random-pool", "outside-top"], "cannot draw 5 random heads outside the top 5 of 8"),
    ],
)
def test_cli_bad_input(cli, tiny_llama_dir, needles_file, haystack_file, tmp_path, args, match):
    scores = _scores_file(tmp_path, SCORES)
    code, _out, err = cli(
        "mask-eval",
        "--scores",
        scores,
        "--model",
        tiny_llama_dir,
        "--needles",
        needles_file,
        "--haystack",
        haystack_file,
        "--lengths",
        "80",
        "--depths",
        "50",
        "--no-chat",
        "--out",
        tmp_path / "run",
        "--no-progress",
        *args,
    )
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and match in lines[0], err


def test_cli_shape_mismatch(cli, tiny_llama_dir, needles_file, haystack_file, tmp_path):
    scores = _scores_file(tmp_path, np.ones((3, 4)))
    code, _out, err = cli(
        "mask-eval",
        "--scores",
        scores,
        "--model",
        tiny_llama_dir,
        "--needles",
        needles_file,
        "--haystack",
        haystack_file,
        "--lengths",
        "80",
        "--k",
        "0,1",
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "shape (3, 4)" in lines[0] and "2 x 4" in lines[0], err


def test_cli_runs(cli, tiny_llama_dir, needles_file, haystack_file, tmp_path):
    scores = _scores_file(tmp_path, SCORES)
    code, out, err = cli(
        "mask-eval",
        "--scores",
        scores,
        "--model",
        tiny_llama_dir,
        "--needles",
        needles_file,
        "--haystack",
        haystack_file,
        "--lengths",
        "80",
        "--depths",
        "50",
        "--no-chat",
        "--k",
        "0,2",
        "--random-seeds",
        "1",
        "--max-new-tokens",
        "4",
        "--method",
        "zero",
        "--mask-phase",
        "decode",
        "--out",
        tmp_path / "run",
        "--no-progress",
    )
    assert code == 0, err
    assert "| K |" in out and (tmp_path / "run" / "mask_eval.png").exists()


def test_execution_order_and_partial_curves(cfg):
    from retrieval_heads.experiments.conditions import execution_order

    conds = build_conditions(SCORES, cfg.ks, cfg.random_seeds, cfg.watch)
    assert [c.id for c in execution_order(conds)] == [
        "base",
        "top-k2",
        "random-k2-s0",
        "top-k3",
        "random-k3-s0",
        "random-k2-s1",
        "random-k3-s1",
    ]
    recs = [
        {"condition": c, "niah_score": s, "exact": s == 100, "error_kind": "retrieved"}
        for c, s in [
            ("base", 100.0),
            ("top-k2", 0.0),
            ("top-k3", 50.0),
            ("random-k2-s0", 100.0),
            ("random-k3-s0", 80.0),
        ]
    ]
    cv = MaskEvalResult("x", conds, recs).curves()  # seed 1 not run yet: random = seed 0 alone
    assert cv["top_score"] == [100.0, 0.0, 50.0] and cv["random_score"] == [100.0, 100.0, 80.0]
    assert cv["random_draws"] == [0, 1, 1]


# ------------------------------------------------------------------------------------- the niah task
@pytest.mark.parametrize("chat", [False, True])
def test_niah_task_docs_are_the_needle_samples(haystack_file, chat):
    from retrieval_heads.needles import load_haystack
    from retrieval_heads.tasks.registry import get_task
    from retrieval_heads.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    if chat:
        tok.chat_template = (
            "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )
    task = get_task(
        "niah", needles=NEEDLES, lengths=(80, 120), depths=(10.0, 90.0), path=str(haystack_file), max_new_tokens=7
    )
    assert isinstance(task, niah.NIAH) and task.size == 8
    with pytest.raises(ConfigError, match="prepare"):
        task.docs(task.size, 0, len)
    task.prepare(tok, chat)
    docs = task.docs(task.size, 0, len)
    assert [d.id for d in docs] == [f"{n.id}-L{L}-D{d:g}" for n in NEEDLES for L in (80, 120) for d in (10.0, 90.0)]
    assert len(task.docs(3, 0, len)) == 3
    hay = load_haystack(haystack_file)
    for d in docs:
        s = d.fields["sample"]
        assert s == make_sample(tok, hay, s.needle, s.length, s.depth, chat=chat)
        assert d.answers == (s.needle.answer,)
        req = task.request(d, "answer-only")
        # the one prompt path rebuilds the sample's prompt and ids exactly: the needle span holds
        assert req.prompt(tok, chat) == s.prompt and s.needle.question in req.user
        assert tuple(tok(req.prompt(tok, chat), add_special_tokens=False)["input_ids"]) == s.prompt_ids
        assert req.max_new_tokens == 7 and req.assistant_prefix == ""
    with pytest.raises(ConfigError, match="no prompt style"):
        task.request(docs[0], "cot")
    assert task.config()["lengths"] == [80, 120] and task.config()["needles"][0]["id"] == "stew"


def test_niah_task_scores_the_whole_response(lm):
    task = niah.NIAH(needles=NEEDLES)
    doc = Doc("x", {}, ("smoked tamarind",))
    assert task.extract_answer(" smoked tamarind .\n", doc, "answer-only") == " smoked tamarind .\n"
    assert task.score(doc, "it is smoked tamarind") == {"answer_recall": 1.0, "exact": 1.0}
    assert task.score(doc, "tamarind smoked") == {"answer_recall": 1.0, "exact": 0.0}
    assert task.score(doc, "smoked fish")["answer_recall"] == 0.5
    req = Request("x", "q", stop=("\n",))
    stop = task.stop_rule(lm.tokenizer, req)
    assert isinstance(stop, StopRule) and stop.cut("a\nb") == "a\nb"  # the authors' rule, nothing cut
    assert [m.name for m in task.metrics] == ["answer_recall", "exact"]
    with pytest.raises(ConfigError, match="no needles"):
        niah.NIAH(needles=())


def test_task_eval_runs_niah_like_mask_eval(lm, cfg):
    """One loop: task-eval on the niah task answers exactly as mask-eval does (nothing masked)."""
    from retrieval_heads.experiments.task_eval import TaskEvalConfig, task_eval

    mcfg = MaskEvalConfig(**{**cfg.__dict__, "ks": (0, 2), "random_seeds": (), "watch": 0})
    masked = mask_eval(lm, SCORES, mcfg, show_progress=False)
    tcfg = TaskEvalConfig(
        task="niah",
        k=2,
        random_seeds=(),
        chat=False,
        limit=4,
        task_args={
            "needles": NEEDLES,
            "lengths": (80,),
            "depths": (10.0, 90.0),
            "path": cfg.haystack,
            "max_new_tokens": 5,
        },
    )
    res = task_eval(lm, SCORES, tcfg, show_progress=False)
    assert res.metrics == ["answer_recall", "exact"] and res.config["task"]["name"] == "niah"
    by_id = {r["id"]: r for r in masked.records}
    assert len(res.records) == len(masked.records) == 8
    for r in res.records:
        m = by_id[r["id"]]
        assert r["generated_text"] == m["generated_text"] and r["prompt_tokens"] == m["prompt_tokens"]
        assert r["scores"] == {"answer_recall": m["answer_recall"], "exact": float(m["exact"])}
