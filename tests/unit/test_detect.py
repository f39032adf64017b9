"""Detection end to end on tiny models: files, resume, determinism, config conflicts, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval_heads.detection import DetectConfig, Grid, detect
from retrieval_heads.needles import Needle
from retrieval_heads.results import DetectionResult
from retrieval_heads.runs import read_records
from retrieval_heads.testing import ARCHITECTURES, tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
    Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "pw"),
)
GRID = Grid(lengths=(80, 160), depths=(0.0, 50.0, 100.0), needles=NEEDLES)
# recall_threshold -1 keeps every sample, so random tiny models still produce scores
CFG = DetectConfig(engine="reference", max_new_tokens=6, recall_threshold=-1.0, chat=False)


@pytest.fixture
def cfg(haystack_file):
    return DetectConfig(**{**CFG.__dict__, "haystack": str(haystack_file)})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_detect_runs_on_every_architecture(arch, cfg):
    lm = tiny_model(arch)
    res = detect(lm, Grid((80,), (50.0,), NEEDLES[:1]), cfg, show_progress=False)
    assert res.shape == (lm.spec.n_layers, lm.spec.n_heads)
    assert res.n_kept == 1 and np.isfinite(res.scores).all()
    rec = res.records[0]
    assert rec["needle_end"] - rec["needle_start"] == rec["needle_tokens"] > 0
    assert 1 <= len(rec["generated_ids"]) <= 6


def test_run_folder_files_and_determinism(tmp_path, cfg, monkeypatch):
    import retrieval_heads.runner as R

    stamp = R.run_stamp("cpu", "float32")  # when and where: the same for both runs, so config.json is comparable
    monkeypatch.setattr(R, "run_stamp", lambda device, dtype=None: stamp)
    lm = tiny_model("llama")
    a = detect(lm, GRID, cfg, out=tmp_path / "a", show_progress=False)
    b = detect(lm, GRID, cfg, out=tmp_path / "b", show_progress=False)
    for name in ("retrieval_scores.json", "summary.json", "config.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    recs = read_records(tmp_path / "a" / "records.jsonl")
    assert len(recs) == len(GRID) == 12
    keys = {
        "id",
        "needle_id",
        "length",
        "depth",
        "prompt_tokens",
        "needle_start",
        "needle_end",
        "generated_text",
        "answer_recall",
        "kept",
        "copy_counts",
    }
    assert keys <= set(recs[0])
    authors = json.loads((tmp_path / "a" / "retrieval_scores.json").read_text())
    assert set(authors) == {f"{l}-{h}" for l in range(2) for h in range(4)}
    assert all(len(v) == 12 for v in authors.values())
    loaded = DetectionResult.load(tmp_path / "a")
    np.testing.assert_allclose(loaded.scores, a.scores)
    np.testing.assert_allclose(DetectionResult.load(tmp_path / "a" / "retrieval_scores.json").scores, a.scores)
    np.testing.assert_allclose(a.scores, b.scores)


def test_resume_after_interrupted_run(tmp_path, cfg, monkeypatch):
    lm = tiny_model("llama")
    full = detect(lm, GRID, cfg, out=tmp_path / "full", show_progress=False)

    from retrieval_heads.engines.reference import ReferenceEngine

    real_run = ReferenceEngine.run
    calls = {"n": 0}

    def crashing_run(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # killed in the middle of sample 6
        return real_run(self, *a, **k)

    monkeypatch.setattr(ReferenceEngine, "run", crashing_run)
    with pytest.raises(KeyboardInterrupt):
        detect(lm, GRID, cfg, out=tmp_path / "r", show_progress=False)
    assert not (tmp_path / "r" / "retrieval_scores.json").exists()  # no half-finished result
    path = tmp_path / "r" / "records.jsonl"
    assert len(read_records(path)) == 5
    with path.open("a") as f:  # and a torn line, as if killed mid-write
        f.write('{"id": "stew-L80')
    monkeypatch.setattr(ReferenceEngine, "run", real_run)
    calls["n"] = 0
    counted = {"n": 0}

    def counting_run(self, *a, **k):
        counted["n"] += 1
        return real_run(self, *a, **k)

    monkeypatch.setattr(ReferenceEngine, "run", counting_run)
    resumed = detect(lm, GRID, cfg, out=tmp_path / "r", show_progress=False)
    assert counted["n"] == 7  # only the unfinished samples ran
    recs = read_records(path)
    assert len(recs) == 12 and len({r["id"] for r in recs}) == 12
    assert (tmp_path / "r" / "retrieval_scores.json").read_text() == (
        tmp_path / "full" / "retrieval_scores.json"
    ).read_text()
    np.testing.assert_array_equal(resumed.scores, full.scores)


def test_different_config_is_refused_unless_overwrite(tmp_path, cfg, cli, tiny_llama_dir, haystack_file, needles_file):
    base = [
        "detect",
        "--model",
        tiny_llama_dir,
        "--haystack",
        haystack_file,
        "--needles",
        needles_file,
        "--depths",
        "50",
        "--max-new-tokens",
        "3",
        "--no-chat",
        "--no-progress",
        "--out",
        tmp_path / "run",
    ]
    code, out, err = cli(*base, "--lengths", "80")
    assert code == 0, err
    assert "Retrieved needles by length and depth" in out  # a random model keeps nothing: no head table
    assert (tmp_path / "run" / "retrieval_scores.json").exists()
    code, out, err = cli(*base, "--lengths", "120")
    assert code != 0
    assert err.count("\n") == 1 and "different config" in err and "grid" in err
    code, out, err = cli(*base, "--lengths", "120", "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["grid"]["lengths"] == [120]


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_inputs_give_one_line_and_nonzero_exit(tmp_path, cli, tiny_llama_dir, haystack_file, needles_file):
    common = ["--no-progress", "--max-new-tokens", "2", "--no-chat"]
    ok = ["--haystack", haystack_file, "--needles", needles_file, "--lengths", "80", "--depths", "50"]

    def expect(args, pattern, out_name):
        out = tmp_path / out_name
        code, _, err = cli("detect", *args, *common, "--out", out)
        assert code != 0
        assert pattern in _one_error_line(err), err
        # nothing half-written: no final files
        assert not (out / "retrieval_scores.json").exists()

    # unknown model / alias (hub offline in tests)
    expect(["--model", "no-such-org/no-such-model", *ok], "cannot load model", "m1")
    # a model that is not a causal LM
    from transformers import DistilBertConfig

    bert = tmp_path / "distilbert"  # an encoder: no causal LM head exists for it
    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=32).save_pretrained(bert)
    expect(["--model", bert, *ok], "not a causal language model", "m2")
    # a corrupt GGUF
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    expect(["--model", bad, *ok], "cannot read GGUF", "m3")
    # batch sizes the engine cannot honour: 0 is refused by the option itself (usage error, exit 2)
    code, _, err = cli("detect", "--model", tiny_llama_dir, *ok, *common, "--batch-size", "0", "--out", tmp_path / "b")
    assert code == 2 and "--batch-size" in err and not (tmp_path / "b").exists()
    expect(
        ["--model", tiny_llama_dir, *ok, "--engine", "reference", "--batch-size", "2"], "one sample at a time", "bs2"
    )
    # a length above max context (tiny model: 4096)
    expect(
        [
            "--model",
            tiny_llama_dir,
            "--haystack",
            haystack_file,
            "--needles",
            needles_file,
            "--lengths",
            "5000",
            "--depths",
            "50",
        ],
        "above the max context",
        "m4",
    )
    # a needle lost in tokenization (words unknown to the tiny vocabulary)
    lost = tmp_path / "lost.jsonl"
    lost.write_text(
        json.dumps({"id": "lost", "needle": "zorblax quintessence flumph .", "question": "q ?", "answer": "zorblax"})
        + "\n"
    )
    expect(
        [
            "--model",
            tiny_llama_dir,
            "--haystack",
            haystack_file,
            "--needles",
            lost,
            "--lengths",
            "80",
            "--depths",
            "50",
        ],
        "needle 'lost' not recoverable",
        "m5",
    )
    # an empty haystack
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    expect(
        [
            "--model",
            tiny_llama_dir,
            "--haystack",
            empty,
            "--needles",
            needles_file,
            "--lengths",
            "80",
            "--depths",
            "50",
        ],
        "haystack is empty",
        "m6",
    )
    # a malformed needles file
    mal = tmp_path / "mal.jsonl"
    mal.write_text('{"needle": "a"\n')
    expect(
        ["--model", tiny_llama_dir, "--haystack", haystack_file, "--needles", mal, "--lengths", "80", "--depths", "50"],
        "not valid JSON",
        "m7",
    )
    # a bad range
    expect(
        [
            "--model",
            tiny_llama_dir,
            "--haystack",
            haystack_file,
            "--needles",
            needles_file,
            "--lengths",
            "a:b",
            "--depths",
            "50",
        ],
        "cannot parse",
        "m8",
    )


def test_answer_span_scores_and_every_attention_score_from_one_pass(tmp_path, cfg):
    """The copy score is on the answer's tokens (the authors' scale) by default; the attention
    scores of the same rows are in every record, in the summary and as authors'-format files."""
    lm = tiny_model("llama")
    grid = Grid((80,), (50.0,), NEEDLES)
    res = detect(lm, grid, cfg, out=tmp_path / "a", show_progress=False)
    for rec in res.records:
        assert rec["span"] == "answer" and rec["span_tokens"] == rec["answer_end"] - rec["answer_start"]
        assert rec["needle_start"] <= rec["answer_start"] < rec["answer_end"] <= rec["needle_end"]
        assert rec["span_tokens"] < rec["needle_tokens"]
        assert set(rec["attention_scores"]) == {"topk_mass", "needle_mass", "distant_mass", "query_focus"}
    per = res.per_sample
    counts = np.array([r["copy_counts"] for r in res.records], dtype=float)
    np.testing.assert_allclose(per, counts / np.array([r["span_tokens"] for r in res.records])[:, None, None])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["score"] == "copy"
    assert set(summary["other_scores"]) == {"topk_mass", "needle_mass", "distant_mass", "query_focus"}
    assert 0 <= summary["top_10_stability"] <= 1
    low, high = np.array(summary["intervals"]["low"], float), np.array(summary["intervals"]["high"], float)
    assert (low <= res.scores + 1e-12).all() and (res.scores <= high + 1e-12).all()
    for name in ("topk_mass", "needle_mass", "distant_mass", "query_focus"):
        other = DetectionResult.load(tmp_path / "a" / "scores" / f"{name}.json")
        np.testing.assert_allclose(
            other.scores, DetectionResult.load(tmp_path / "a").with_score(name).scores, atol=1e-6
        )
    # --span needle keeps the old scale: copies on the whole needle / needle tokens
    old = detect(lm, grid, DetectConfig(**{**cfg.__dict__, "span": "needle"}), show_progress=False)
    for rec in old.records:
        assert rec["span"] == "needle" and rec["span_tokens"] == rec["needle_tokens"]


def test_with_score_intervals_and_stability_by_hand():
    per = np.array([[[1.0, 0.0]], [[0.0, 0.5]], [[1.0, 0.5]]])  # 3 kept samples, 1 layer x 2 heads
    other = np.array([[[0.0, 0.9]], [[0.1, 0.8]], [[0.0, 0.7]]])
    r = DetectionResult("m", per, extra={"needle_mass": other})
    assert r.score_names() == ["copy", "needle_mass"]
    np.testing.assert_allclose(r.scores, [[2 / 3, 1 / 3]])
    m = r.with_score("needle_mass")
    np.testing.assert_allclose(m.scores, [[1 / 30, 0.8]])
    assert [(h.layer, h.head) for h in m.top(1)] == [(0, 1)] and m.with_score(
        "copy"
    ).scores.tolist() == r.scores.tolist()
    low, high = r.intervals(n_boot=500)
    assert low[0, 0] == 0.0 and high[0, 0] == 1.0  # resamples of {1, 0, 1}: means from 0 to 1
    assert r.top_k_stability(2) == 1.0  # top-2 of 2 heads: always the same set
    assert 0 < r.top_k_stability(1, n_boot=500) < 1
    with pytest.raises(Exception, match="no score 'gain'"):
        r.with_score("gain")


def test_interleaved_order_covers_every_cell_first():
    grid = Grid(lengths=(100, 200, 300), depths=(0.0, 50.0, 100.0), needles=NEEDLES)
    pts = list(grid.interleaved_points())
    assert sorted((n.id, L, d) for n, L, d in pts) == sorted((n.id, L, d) for n, L, d in grid.points())
    first = pts[:9]
    assert len({(L, d) for _, L, d in first}) == 9  # each (length, depth) once before any repeats
    assert {n.id for n, _, _ in first} == {"stew", "pw"}  # needles rotate
    assert pts == list(grid.interleaved_points())  # fixed order


def test_until_stable_stops_when_the_top_heads_settle():
    from retrieval_heads.detection import STABLE_MIN_KEPT, STABLE_PATIENCE, stable

    def rec(counts):
        return {"kept": True, "copy_counts": counts, "needle_tokens": 4, "span_tokens": 4}

    same = [rec([[4, 0, 0, 0], [0, 3, 0, 0]]) for _ in range(30)]
    need = STABLE_MIN_KEPT + STABLE_PATIENCE - 1
    assert not stable(same[: need - 1], 2, 0.9)
    assert stable(same[:need], 2, 0.9)
    rng = np.random.default_rng(0)
    noisy = [rec(rng.integers(0, 2, (2, 4)).tolist()) for _ in range(30)]
    assert not stable(noisy, 2, 0.9)  # random copies: the top-2 changes from resample to resample
    assert not stable([*same[:need], {**same[0], "kept": False}], 2, 0.9)  # checked after kept samples only


def test_until_stable_run_records_its_order_and_stops(tmp_path, cfg):
    lm = tiny_model("llama")
    grid = Grid(lengths=(80, 120, 160), depths=(0.0, 50.0, 100.0), needles=NEEDLES)
    res = detect(
        lm,
        grid,
        DetectConfig(**{**cfg.__dict__, "until_stable": 2, "stable_jaccard": 0.01}),
        out=tmp_path / "s",
        show_progress=False,
    )
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["until_stable"]["k"] == 2 and config["until_stable"]["order"] == "interleaved"
    assert len(res.records) == 12 < len(grid)  # 10 kept at least, then 3 checks in a row: 12 of 18
    with pytest.raises(Exception, match="cannot run in shards"):
        from retrieval_heads.distributed import Shard

        detect(lm, grid, DetectConfig(**{**cfg.__dict__, "until_stable": 2}), shard=Shard(0, 2), show_progress=False)


def test_score_agreement_and_top_head_intervals():
    from retrieval_heads import analysis as A

    rng = np.random.default_rng(1)
    per = rng.random((8, 2, 5))
    r = DetectionResult("m", per, extra={"same": per.copy(), "reversed": -per})
    agree = A.score_agreement(r, k=3).set_index(["score_a", "score_b"])
    assert agree.loc[("copy", "same"), "spearman"] == pytest.approx(1.0)
    assert agree.loc[("copy", "same"), "top3_overlap"] == 1.0
    assert agree.loc[("copy", "reversed"), "spearman"] == pytest.approx(-1.0)
    assert agree.loc[("copy", "reversed"), "top3_overlap"] == 0.0
    top = A.top_heads(r, 3)
    assert (top["ci_low"] <= top["score"]).all() and (top["score"] <= top["ci_high"]).all()


def test_ties_are_broken_by_a_second_score_not_by_layer():
    from retrieval_heads.experiments.conditions import build_conditions, tiebreak_map

    # copy scores tie at 0.5 for (0, 0) and (1, 1); topk_mass prefers (1, 1)
    per = np.array([[[0.5, 0.0], [0.0, 0.5]]] * 2)
    topk = np.array([[[0.1, 0.0], [0.0, 0.9]]] * 2)
    r = DetectionResult("m", per, extra={"topk_mass": topk})
    assert [(h.layer, h.head) for h in r.top(2)] == [(1, 1), (0, 0)]
    assert r.ranking_scores()[1, 1] > r.ranking_scores()[0, 0]
    conds = build_conditions(r.scores, (1,), (), tiebreak=tiebreak_map(r))
    assert [c.heads for c in conds if c.kind == "top"] == [((1, 1),)]
    # ranked by topk_mass, its ties (none here) would go by the copy score
    assert r.with_score("topk_mass").tiebreak.tolist() == r.scores.tolist()
    # without other scores, the activation frequency breaks ties
    per2 = np.array([[[0.5, 0.5]], [[0.5, 0.0]], [[0.5, 1.0]]])  # same mean 0.5; head 0 copies in 3 of 3
    assert [(h.layer, h.head) for h in DetectionResult("m", per2).top(2)] == [(0, 0), (0, 1)]


def test_default_grid_fits_a_cpu_budget_and_on_a_gpu_the_model_context():
    from retrieval_heads.detection import GPU_ROOM, default_grid

    spec = tiny_model("llama").spec
    cpu = default_grid(spec)
    assert cpu == default_grid(spec, "cpu") == default_grid(spec, "mps")
    assert cpu.lengths == (500, 1333, 2166, 3000) and len(cpu) == 60
    gpu = default_grid(spec, "cuda:0")
    assert gpu.lengths[0] == 1000 and gpu.lengths[-1] == spec.max_context - GPU_ROOM and len(gpu.lengths) == 6
    assert gpu.depths == cpu.depths and gpu.needles == cpu.needles
    gpu.validate(spec, 50)


def test_config_choices_are_checked_once_and_match_the_help():
    from retrieval_heads.cli.detect import ENGINE_NAMES, SPAN_NAMES
    from retrieval_heads.engines import ENGINES, SPANS
    from retrieval_heads.errors import ConfigError

    assert set(ENGINE_NAMES) == set(ENGINES) and SPAN_NAMES == SPANS
    with pytest.raises(ConfigError, match="unknown engine 'slow'; choose from fast, reference"):
        DetectConfig(engine="slow")
    with pytest.raises(ConfigError, match="unknown span 'all'"):
        DetectConfig(span="all")
    with pytest.raises(ConfigError, match="--stable-jaccard"):
        DetectConfig(stable_jaccard=0)


# ---------------------------------------------------------------- when the model retrieves nothing (or little)
def _detect_cli(cli, out, model_dir, haystack_file, needles_file, *extra):
    grid = ["--haystack", haystack_file, "--needles", needles_file, "--lengths", "80,120", "--depths", "0,50"]
    common = ["--max-new-tokens", "3", "--no-chat", "--no-progress", "--out", out]
    return cli("detect", "--model", model_dir, *grid, *common, *extra)


def test_zero_kept_warns_in_one_line_shows_no_heads_and_exits_0(
    tmp_path, cli, tiny_llama_dir, haystack_file, needles_file
):
    # a random tiny model never says the answer: with the default recall threshold nothing is kept
    code, out, err = _detect_cli(cli, tmp_path / "run", tiny_llama_dir, haystack_file, needles_file)
    assert code == 0, err
    warning = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warning) == 1, err
    assert "retrieved none of the needles: 0 of 8 samples kept" in warning[0] and "recall > 0.5" in warning[0]
    assert "lowest recall at length" in warning[0] and "--recall-threshold" in warning[0] and "--chat" in warning[0]
    assert "Top 10" not in out and "nan" not in out.lower()
    assert "Retrieved needles by length and depth" in out and "0/2" in out
    raw = (tmp_path / "run" / "summary.json").read_text()
    assert "NaN" not in raw
    summary = json.loads(raw)
    assert summary["n_kept"] == 0 and summary["n_samples"] == 8 and summary["top"] == []
    assert summary["scores"][0][0] is None and summary["n_retrieval_heads"] is None
    assert summary["sparsity"]["zero"] is None and summary["top_10_stability"] is None
    assert [(c["length"], c["depth"], c["run"], c["kept"]) for c in summary["retrieval_by_cell"]] == [
        (80, 0.0, 2, 0),
        (80, 50.0, 2, 0),
        (120, 0.0, 2, 0),
        (120, 50.0, 2, 0),
    ]


def test_few_kept_prints_the_table_with_a_warning_and_no_ranked_zero_ties(
    tmp_path, cli, tiny_llama_dir, haystack_file, needles_file
):
    code, out, err = _detect_cli(
        cli,
        tmp_path / "run",
        tiny_llama_dir,
        haystack_file,
        needles_file,
        "--recall-threshold",
        "-1",
        "--lengths",
        "80",
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_kept"] == 4  # recall threshold -1 keeps every sample: 4 < 5
    assert "warning: only 4 of 4 samples kept (fewer than 5)" in err and "top-10 stability" in err
    scores = np.array(summary["scores"], dtype=float)
    ranked = [l for l in out.splitlines() if l.startswith("│") and l.split("│")[1].strip().isdigit()]
    ranked = [l for l in ranked if len(l.split("│")) == 7]  # rows of the heads table (rank .. freq.)
    assert len(ranked) == min(10, int((scores > 0).sum()))  # heads at 0 are not ranked
    if (scores == 0).any():
        assert "score 0 (ties: not ranked)" in out


def test_help_shows_the_choices_the_gpu_grid_and_the_exit_status(cli):
    code, out, _ = cli("detect", "--help")
    text = " ".join(out.replace("│", " ").split())  # the option table wraps inside its borders
    assert code == 0 and "<fast|reference>" in out and "<answer|needle>" in out
    assert "up to the model's context" in text and "Exit status 0" in text and "no needle was retrieved" in text
