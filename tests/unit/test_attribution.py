"""Answer attribution (issue 19): prompt spans, the two tracing paths against an independent eager
forward, token and answer scores, masking, question attention, JSON/HTML output, the grounding and
passage-ranking experiments on tiny models, AUROC and the CLI's bad-input lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from retrieval_heads.attribution import (
    CONTEXT,
    ENGINES,
    QUESTION,
    SINK,
    Passage,
    Trace,
    answer_scores,
    attribute,
    build_trace_prompt,
    load_context,
    question_attention,
    render_html,
    sentence_spans,
    token_scores,
    trace,
    watched_heads,
)
from retrieval_heads.cli import app
from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.experiments.grounding import GroundingConfig, GroundingResult, grounding_eval
from retrieval_heads.experiments.passages import (
    PassageConfig,
    PassageResult,
    bm25_scores,
    passage_rank,
    recall_at,
)
from retrieval_heads.experiments.stats import auroc, bootstrap_auroc, bootstrap_auroc_difference
from retrieval_heads.results import DetectionResult
from retrieval_heads.testing import tiny_model

NEVER = lambda generated: False  # noqa: E731  fixed-length generation
PASSAGES = [
    Passage("a.txt", "the captain was named seven . the password is lantern fig seventy ."),
    Passage("b.txt", "the city of money . people think a good idea is to write ."),
]
QUESTION_TEXT = "what is the password ?"


def peaked(lm, std: float = 0.4):
    """Larger query/key weights: peaked attention rows like a trained model's (see test_fast_engine)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lm.model.modules():
            for name in ("q_proj", "k_proj", "c_attn"):
                if hasattr(m, name):
                    w = getattr(m, name).weight
                    w.copy_(torch.randn(w.shape, generator=g) * std)
    return lm


def all_heads(lm):
    L, H = lm.spec.shape
    return [(l, h) for l in range(L) for h in range(H)]


# ----------------------------------------------------------------------------------- prompt
def test_sentence_spans():
    text = 'He left. "Why?" she asked! Then\nnew line and end'
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "He left.",
        '"Why?"',
        "she asked!",
        "Then",
        "new line and end",
    ]


def test_prompt_spans_hold_the_passages_question_and_sentences():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    tp = build_trace_prompt(tok, PASSAGES, QUESTION_TEXT, chat=False)
    assert tp.ids == tuple(tok(tp.text, add_special_tokens=False)["input_ids"])
    for (s, e), p in zip(tp.passages, PASSAGES, strict=True):
        assert tok.decode(tp.ids[s:e]).split() == p.text.split()
    assert tok.decode(tp.ids[tp.question[0] : tp.question[1]]).split() == QUESTION_TEXT.split()
    assert [s.text for s in tp.sentences] == [
        "the captain was named seven .",
        "the password is lantern fig seventy .",
        "the city of money .",
        "people think a good idea is to write .",
    ]
    for s in tp.sentences:
        assert tok.decode(tp.ids[s.start : s.end]).split() == s.text.split()
    regions = tp.regions()
    assert (regions[: min(4, tp.n)] == SINK).all()
    assert (regions[tp.question[0] : tp.question[1]] == QUESTION).all()
    assert (regions[tp.passages[1][0] : tp.passages[1][1]] == CONTEXT).all()
    assert (tp.sentence_of()[tp.sentences[1].start : tp.sentences[1].end] == 1).all()


def test_prompt_bad_input():
    lm = tiny_model("llama")
    with pytest.raises(ConfigError):
        build_trace_prompt(lm.tokenizer, PASSAGES, "  ", chat=False)
    with pytest.raises(DataError):
        build_trace_prompt(lm.tokenizer, [], QUESTION_TEXT, chat=False)


def test_load_context(tmp_path: Path):
    (tmp_path / "b.txt").write_text("second passage.")
    (tmp_path / "a.md").write_text("first passage.")
    (tmp_path / "skip.json").write_text("{}")
    ps = load_context(tmp_path)
    assert [p.name for p in ps] == ["a.md", "b.txt"] and ps[0].text == "first passage."
    assert load_context(tmp_path / "b.txt") == [Passage("b.txt", "second passage.")]
    with pytest.raises(DataError, match="no such"):
        load_context(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \.txt"):
        load_context(empty)
    (empty / "x.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DataError, match="UTF-8"):
        load_context(empty / "x.txt")


# ----------------------------------------------------------------------------------- tracing
def independent_rows(lm, prompt_ids, generated, t):
    """Eager full forward (no cache) of prompt + generated[:t]: each layer's row of the query that
    produced generated token t, `[H, n + t]` (full-attention models only)."""
    ids = torch.tensor([list(prompt_ids) + generated[:t]])
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_attentions=True)
    return [a[0, :, -1, :].float() for a in out.attentions]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_trace_equals_an_independent_eager_forward(arch):
    lm = peaked(tiny_model(arch))  # eager: the forward below returns its weights
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)
    watched = [(1, 0), (0, 3)]
    region = torch.nn.functional.one_hot(torch.as_tensor(tp.regions()), 4).float()
    for engine in ENGINES:
        tr = trace(lm, tp, watched, max_new_tokens=4, stop=NEVER, engine=engine)
        assert len(tr.generated_ids) == 4 and tr.argmax.shape == (4, *lm.spec.shape)
        for t in range(4):
            rows = independent_rows(lm, tp.ids, tr.generated_ids, t)
            argmax = np.stack([r.argmax(-1).numpy() for r in rows])
            np.testing.assert_array_equal(tr.argmax[t], argmax, err_msg=f"{engine} step {t}")
            mass = np.stack([(r[:, : tp.n] @ region).numpy() for r in rows])
            np.testing.assert_allclose(tr.region_mass[t], mass, atol=1e-5)
            sent = torch.tensor(tp.sentence_of())
            want = np.zeros(len(tp.sentences))
            for l, h in watched:
                for i in range(len(tp.sentences)):
                    want[i] += float(rows[l][h, : tp.n][sent == i].sum()) / len(watched)
            np.testing.assert_allclose(tr.sentence_mass[t], want, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral", "gpt2"])
def test_fast_path_equals_the_reference(arch):
    """The fast path (SDPA + captured rows) reads what the eager oracle reads, sliding windows included."""
    lm = peaked(tiny_model(arch, attn_implementation="sdpa"))
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)  # > 16 tokens: gemma3's window
    assert tp.n > 40
    fast = trace(lm, tp, all_heads(lm), max_new_tokens=6, stop=NEVER, engine="fast")
    ref = trace(lm, tp, all_heads(lm), max_new_tokens=6, stop=NEVER, engine="reference")
    assert lm.model.config._attn_implementation == "sdpa"  # restored
    assert fast.generated_ids == ref.generated_ids
    np.testing.assert_array_equal(fast.argmax, ref.argmax)
    for name in ("region_mass", "sentence_mass", "logprob", "entropy"):
        np.testing.assert_allclose(getattr(fast, name), getattr(ref, name), atol=1e-4, err_msg=name)


def test_logprob_and_entropy_are_the_models():
    lm = peaked(tiny_model("llama"))
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)
    tr = trace(lm, tp, [(0, 0)], max_new_tokens=2, stop=NEVER)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([list(tp.ids)])).logits[0, -1]
    logp = torch.log_softmax(logits, -1)
    assert tr.generated_ids[0] == int(logits.argmax())
    assert tr.logprob[0] == pytest.approx(float(logp.max()), abs=1e-5)
    assert tr.entropy[0] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)


def test_masked_head_reads_uniform():
    """A uniformly masked head attends equally to every key: argmax on the first, mass by counts."""
    lm = peaked(tiny_model("llama"))
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)
    tr = trace(lm, tp, [(1, 2)], max_new_tokens=1, stop=NEVER, masked=[(1, 2)])
    assert tr.argmax[0, 1, 2] == 0
    counts = np.bincount(tp.regions(), minlength=4) / tp.n
    np.testing.assert_allclose(tr.region_mass[0, 1, 2], counts, atol=1e-5)
    free = trace(lm, tp, [(1, 2)], max_new_tokens=1, stop=NEVER)
    assert not np.allclose(free.region_mass[0, 1, 2], counts, atol=1e-3)


def test_trace_bad_input():
    lm = tiny_model("llama")
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False)
    with pytest.raises(ConfigError, match="engine"):
        trace(lm, tp, [(0, 0)], engine="turbo")
    with pytest.raises(ConfigError, match="outside"):
        trace(lm, tp, [(5, 0)])
    with pytest.raises(ConfigError, match="context"):
        trace(lm, tp, [(0, 0)], max_new_tokens=10_000)


# ----------------------------------------------------------------------------------- scores
def test_copy_support_counts_heads_whose_argmax_holds_the_token():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    tp = build_trace_prompt(tok, PASSAGES, QUESTION_TEXT, chat=False)
    lantern = tok.convert_tokens_to_ids("lantern")
    pos = tp.ids.index(lantern)  # inside passage a
    question_pos = tp.question[0]  # "what": in the question, not the context
    what = tp.ids[question_pos]
    comma = tok.convert_tokens_to_ids(",")
    L, H = lm.spec.shape
    steps = 3
    argmax = np.zeros((steps, L, H), dtype=np.int64)
    argmax[0, 0, 0] = argmax[0, 0, 1] = pos  # 2 of 4 watched heads copy "lantern"
    argmax[0, 1, 3] = pos  # an unwatched head copies too
    argmax[1, :, :] = question_pos  # "what" copied from the question: not support
    mass = np.zeros((steps, L, H, 4))
    mass[..., CONTEXT] = 0.5
    sent = np.zeros((steps, len(tp.sentences)))
    sent[0, 1] = 0.4
    watched = [(0, 0), (0, 1), (0, 2), (1, 0)]
    tr = Trace([lantern, what, comma], argmax, mass, sent, np.full(steps, -1.0), np.ones(steps), watched)
    toks = token_scores(tp, tr, tok)
    assert toks[0].copy == 0.5 and toks[0].copying_heads == ("L0-H0", "L0-H1")
    assert toks[0].all_copy == pytest.approx(3 / (L * H))
    assert toks[0].sentence == 1 and toks[0].sentence_share == pytest.approx(0.8)
    assert toks[1].copy == 0 and not toks[1].supported and toks[1].sentence is None
    assert toks[2].copy == 0 and toks[2].supported and not toks[2].content  # punctuation is never flagged
    scores = answer_scores(toks)
    assert scores["copy"] == 0.25 and scores["unsupported"] == 0.5 and scores["n_tokens"] == 2
    assert scores["context_mass"] == pytest.approx(0.5)


def test_watched_heads_follow_the_ranking():
    s = np.array([[0.1, 0.9, 0.0], [0.5, np.nan, 0.7]])
    r = DetectionResult.from_aggregate("m", s, np.ones_like(s), 3)
    assert watched_heads(r, 3) == [(0, 1), (1, 2), (1, 0)]
    assert watched_heads(r, 2, exclude=[(0, 1)]) == [(1, 2), (1, 0)]
    with pytest.raises(ConfigError):
        watched_heads(r, 0)


# ----------------------------------------------------------------------------------- output
def test_attribute_writes_strict_json_and_escaped_html(tmp_path: Path):
    lm = peaked(tiny_model("llama"))
    evil = [Passage("<b>x</b>.txt", "the password is <script>alert(1)</script> lantern fig ."), PASSAGES[1]]
    att = attribute(lm, evil, 'what is the "password" & <i>key</i> ?', [(0, 0), (1, 1)], chat=False, max_new_tokens=4)
    assert (
        1 <= len(att.tokens) <= 4
        and att.answer == lm.tokenizer.decode([t.token_id for t in att.tokens], skip_special_tokens=True).strip()
    )
    js, page = att.save(tmp_path)
    data = json.loads(js.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["format"] == "retrieval-heads attribution v1" and len(data["tokens"]) == len(att.tokens)
    assert data["heads"] == ["L0-H0", "L1-H1"] and data["support"] == att.support
    text = page.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>x</b>" not in text and "<i>key</i>" not in text
    assert "http://" not in text and "https://" not in text
    for t in att.tokens:
        if t.sentence is not None and t.content:
            assert f'href="#s{t.sentence}"' in text and f'id="s{t.sentence}"' in text
    assert text == render_html(att)


# ----------------------------------------------------------------------------------- question attention
def test_question_attention_equals_an_independent_forward():
    lm = peaked(tiny_model("qwen2", attn_implementation="sdpa"))
    tp = build_trace_prompt(lm.tokenizer, PASSAGES, QUESTION_TEXT, chat=False, titled=False)
    got = question_attention(lm, tp)
    assert got.shape == (*lm.spec.shape, 2)
    q0, q1 = tp.question
    with torch.no_grad():
        lm.model.set_attn_implementation("eager")
        out = lm.model(input_ids=torch.tensor([list(tp.ids[:q1])]), output_attentions=True)
        lm.model.set_attn_implementation("sdpa")
    for l, a in enumerate(out.attentions):
        for p, (s, e) in enumerate(tp.passages):
            np.testing.assert_allclose(got[l, :, p], a[0, :, q0:q1, s:e].sum((-1, -2)).numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------- statistics
def test_auroc_is_the_pairwise_probability():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, 40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))
    assert auroc([1, 2, 3], [False, True, True]) == 1.0 and auroc([3, 2, 1], [False, True, True]) == 0.0
    assert np.isnan(auroc([1, 2], [True, True]))
    assert auroc([np.nan, 1.0], [False, True]) == 1.0  # NaN ranks lowest
    point, lo, hi = bootstrap_auroc(s, y, n_boot=300, seed=1)
    assert lo <= point <= hi and (lo, hi) == bootstrap_auroc(s, y, n_boot=300, seed=1)[1:]
    assert bootstrap_auroc_difference(s, s, y, n_boot=100) == (0.0, 0.0, 0.0)
    diff, lo, hi = bootstrap_auroc_difference(s, -s, y, n_boot=300, seed=1)
    assert diff == pytest.approx(auroc(s, y) - auroc(-s, y)) and lo <= diff <= hi


def test_recall_and_bm25():
    assert recall_at(np.array([0.1, 0.9, 0.5, 0.9]), [1, 2]) == 0.5  # tie: index 1 and 3, lower first
    assert recall_at(np.array([0.1, 0.9, 0.5, 0.2]), [1, 2]) == 1.0
    paras = [("A", "a song about rivers"), ("B", "she painted a lighthouse"), ("C", "trains"), ("D", "a dog")]
    s = bm25_scores("who painted the lighthouse", paras)
    assert s[1] > 0 and s[1] == max(s) and s[0] == s[2] == 0


# ----------------------------------------------------------------------------------- experiments
def hotpot_file(path: Path) -> Path:
    words = "the captain was named seven . people think a good idea is to write ."
    records = []
    for i in range(3):
        context = [[f"t{j}", [f"{words} {j} ."]] for j in range(5)]
        records.append(
            {
                "_id": f"q{i}",
                "question": "who was the captain ?",
                "answer": "seven",
                "context": context,
                "supporting_facts": [["t1", 0], ["t3", 0]],
                "type": "bridge",
            }
        )
    path.write_text(json.dumps(records))
    return path


def test_passage_rank_end_to_end(tmp_path: Path):
    lm = peaked(tiny_model("llama", attn_implementation="sdpa"))
    scores = DetectionResult.from_aggregate("tiny", np.arange(8.0).reshape(2, 4), np.ones((2, 4)), 5)
    cfg = PassageConfig(limit=3, k=2, chat=False, data=str(hotpot_file(tmp_path / "h.json")))
    res = passage_rank(lm, scores, cfg, out=tmp_path / "run", show_progress=False, n_boot=200)
    assert dict(res.config["head_sets"])["retrieval heads"] == [[1, 3], [1, 2]]
    assert len(res.records) == 3 and all(r["gold"] == [1, 3] for r in res.records)
    mass = np.asarray(res.records[0]["mass"])
    assert mass.shape == (2, 4, 5) and (mass >= 0).all()
    table = res.table()
    assert "retrieval heads" in table and "all heads" in table and "BM25" in table and "chance" in table
    again = PassageResult.load(tmp_path / "run", n_boot=200)
    assert again.table() == table
    assert (tmp_path / "run" / "table.md").read_text().strip() == table


def test_grounding_result_auroc_and_table():
    recs = []
    for i in range(10):
        grounded = i < 5
        scores = {
            "copy": 0.8 if grounded else 0.1,
            "context_mass": 0.5,
            "all_copy": 0.1,
            "all_context_mass": 0.5,
            "logprob": -1.0 - i,
            "entropy": 1.0,
            "sink_mass": 0.2,
            "unsupported": 0.0,
            "n_tokens": 2,
        }
        recs.append({"id": f"r{i}", "set": "niah" if i % 2 else "squad", "grounded": grounded, "scores": scores})
    recs.append({"id": "x", "set": "squad", "grounded": None, "scores": recs[0]["scores"]})  # left out
    res = GroundingResult.from_run({}, recs, n_boot=200)
    rows = {r["score"]: r for r in res.aurocs()}
    assert rows["copy"]["all"][0] == 1.0 and rows["context_mass"]["all"][0] == 0.5
    assert rows["logprob"]["all"][0] == 1.0
    assert rows["copy-logprob"]["all"] == (0.0, 0.0, 0.0)  # both separate perfectly
    assert res.counts()["all"] == (5, 5)
    table = res.table()
    assert "| n grounded / ungrounded | " in table and "1.00 [1.00, 1.00]" in table and "+0.00 [+0.00, +0.00]" in table


def test_grounding_eval_end_to_end_on_squad(tmp_path: Path):
    lm = peaked(tiny_model("llama", attn_implementation="sdpa"))
    text = "the captain was named seven . the password is lantern fig seventy ."
    qas = [
        {"id": "a1", "question": "who was the captain ?", "answers": [{"text": "seven"}], "is_impossible": False},
        {"id": "a2", "question": "what is the password ?", "answers": [{"text": "lantern"}], "is_impossible": False},
        {"id": "u1", "question": "where is the city ?", "answers": [], "is_impossible": True},
    ]
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"context": text, "qas": qas}]}]}))
    scores = DetectionResult.from_aggregate("tiny", np.arange(8.0).reshape(2, 4), np.ones((2, 4)), 5)
    cfg = GroundingConfig(
        k=2,
        lengths=(),
        masked_lengths=(),
        squad_answerable=2,
        squad_unanswerable=1,
        chat=False,
        squad_data=str(squad),
        max_new_tokens=3,
    )
    res = grounding_eval(lm, scores, cfg, out=tmp_path / "run", show_progress=False, n_boot=100)
    assert {r["id"] for r in res.records} == {"squad/a1", "squad/a2", "squad/u1"}
    u = next(r for r in res.records if r["id"] == "squad/u1")
    assert u["grounded"] is False and u["watched"] == [[1, 3], [1, 2]] and len(u["tokens"]) >= 1
    assert set(u["scores"]) >= {"copy", "logprob", "entropy", "all_copy"}
    assert (tmp_path / "run" / "table.md").is_file()
    with pytest.raises(DataError, match="asked for 5"):
        grounding_eval(
            lm,
            scores,
            GroundingConfig(lengths=(), masked_lengths=(), squad_answerable=5, squad_data=str(squad)),
            show_progress=False,
        )


# ----------------------------------------------------------------------------------- CLI
def test_cli_bad_input_is_one_line(tmp_path: Path):
    runner = CliRunner()
    doc = tmp_path / "doc.txt"
    doc.write_text("some text.")
    for args, msg in (
        (["attribute", "-q", "why?", "--context", str(tmp_path / "missing")], "no such file"),
        (["attribute", "-q", " ", "--context", str(doc)], "--question is empty"),
        (["attribute", "-q", "why?", "--context", str(doc), "--engine", "turbo"], "unknown engine"),
        (["attribute", "-q", "why?", "--context", str(doc), "--model", "some/unknown-model"], "no shipped score map"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code != 0
        assert isinstance(res.exception, (DataError, ConfigError)) and msg in str(res.exception), (args, res.output)
