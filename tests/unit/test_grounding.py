"""experiments.grounding: the AUROC statistics, the result table and an end-to-end run on SQuAD-format
data (the extractive-qa task's reader) with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.experiments.grounding import GroundingConfig, GroundingResult, grounding_eval
from retrieval_heads.experiments.stats import auroc, bootstrap_auroc, bootstrap_auroc_difference
from retrieval_heads.results import DetectionResult
from retrieval_heads.testing import tiny_model

from .attribution_helpers import peaked


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


def test_grounding_config_checks_the_engine():
    with pytest.raises(ConfigError, match="unknown engine 'turbo'"):
        GroundingConfig(engine="turbo")


def test_a_bad_engine_is_refused_before_the_run_folder_or_the_model(cli, tmp_path: Path, monkeypatch):
    """The config is checked before anything is written, so the corrected rerun needs no --overwrite."""
    import retrieval_heads.cli.options as O

    monkeypatch.setattr(O, "open_model", lambda *a, **k: pytest.fail("the model must not load"))
    out = tmp_path / "ge"
    root = Path(__file__).resolve().parents[2]
    code, _, err = cli(
        "grounding-eval", "--scores", root / "docs" / "runs" / "smollm2-135m", "--engine", "bogus", "-o", out
    )
    assert code == 2 and err.strip() == "error: unknown engine 'bogus'; choose from fast, reference"
    assert not out.exists()
