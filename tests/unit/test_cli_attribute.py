"""The attribution commands (cli/attribute.py, cli/grounding_eval.py, cli/passage_rank.py): bad
input as one line before any model loads, a given answer, a batch of 20 questions with one model
load, the shipped map of a hub id, and --help showing every choice and option."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval_heads.cli import app
from retrieval_heads.cli import attribute as attribute_cli
from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.scorefile import write_scores
from retrieval_heads.testing import tiny_model

from .attribution_helpers import PASSAGES, peaked, questions_file

runner = CliRunner()


@pytest.fixture
def loads(monkeypatch):
    """open_model replaced by a counter that hands out one peaked tiny llama."""
    calls: list[str] = []

    def fake_open(name, **kwargs):
        calls.append(name)
        assert kwargs["attn_implementation"] == "sdpa" and kwargs["device"] == "auto" and kwargs["dtype"] == "auto"
        return peaked(tiny_model("llama", attn_implementation="sdpa"))

    monkeypatch.setattr(attribute_cli, "open_model", fake_open)
    return calls


@pytest.fixture
def tiny_scores(tmp_path: Path) -> Path:
    path = tmp_path / "scores.json"  # authors' format: one score per sample and head
    write_scores(path, np.arange(8.0).reshape(1, 2, 4) / 8)
    return path


def test_bad_input_is_one_line_before_the_model(tmp_path: Path, loads):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text.")
    qs = tmp_path / "q.jsonl"
    qs.write_text('{"question": "q ?", "context": "x ."}\n')
    for args, msg in (
        (["-q", "why?", "--context", str(tmp_path / "missing")], "no such file"),
        (["-q", " ", "--context", str(doc)], "--question is empty"),
        (["--context", str(doc)], "give --question or --questions"),
        (["-q", "why?"], "give --context"),
        (["-q", "why?", "--context", str(doc), "--answer", " "], "--answer is empty"),
        (["-q", "why?", "--context", str(doc), "--engine", "turbo"], "unknown engine"),
        (["-q", "why?", "--context", str(doc), "--prompt-template", "{context} only"], "{question} exactly once"),
        (["-q", "why?", "--context", str(doc), "--model", "some/unknown-model"], "no shipped score map"),
        (["--questions", str(qs), "-q", "why?"], "drop --question/--answer"),
        (["--questions", str(tmp_path / "none.jsonl")], "file not found"),
    ):
        res = runner.invoke(app, ["attribute", *args])
        assert res.exit_code != 0, args
        assert isinstance(res.exception, (DataError, ConfigError, OSError)) and msg in str(res.exception), (args, res)
    assert loads == []


def test_a_hub_id_uses_its_shipped_map(tmp_path: Path, loads):
    doc = tmp_path / "doc.txt"
    doc.write_text(PASSAGES[0].text)
    args = ["attribute", "-q", "what is the password ?", "--context", str(doc)]
    res = runner.invoke(app, [*args, "--model", "meta-llama/Meta-Llama-3-8B-Instruct"])
    assert loads == ["meta-llama/Meta-Llama-3-8B-Instruct"]
    assert isinstance(res.exception, ConfigError)  # the tiny stand-in has another shape than the map's
    assert "ref:Meta-Llama-3-8B-Instruct scores 32 x 32 heads" in str(res.exception)


def test_attribute_a_given_answer(tmp_path: Path, loads, tiny_scores: Path):
    doc = tmp_path / "doc.txt"
    doc.write_text(PASSAGES[0].text)
    out = tmp_path / "out"
    args = ["attribute", "-q", "what is the password ?", "--context", str(doc), "--scores", str(tiny_scores)]
    res = runner.invoke(
        app, [*args, "--model", "tiny", "--no-chat", "--answer", "the password is lantern fig .", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "answer (given): the password is lantern fig ." in res.output and "from the question" in res.output
    data = json.loads((out / "attribution.json").read_text())
    assert data["answer_given"] and [t["text"] for t in data["tokens"]] == "the password is lantern fig .".split()
    assert data["heads"] == ["L1-H3", "L1-H2", "L1-H1", "L1-H0", "L0-H3", "L0-H2", "L0-H1", "L0-H0"]
    assert (out / "attribution.html").is_file() and loads == ["tiny"]


def test_a_batch_of_20_questions_loads_the_model_once(tmp_path: Path, loads, tiny_scores: Path):
    path = questions_file(tmp_path)
    out = tmp_path / "out"
    args = ["attribute", "--questions", str(path), "--context", str(tmp_path / "docs"), "--scores", str(tiny_scores)]
    res = runner.invoke(
        app, [*args, "--model", "tiny", "--no-chat", "--max-new-tokens", "3", "--watch", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert loads == ["tiny"]  # one model load for 20 questions
    rows = [json.loads(line) for line in (out / "attributions.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and rows[5]["id"] == "five" and all(r["heads"] == ["L1-H3", "L1-H2"] for r in rows)
    assert sum(r["answer_given"] for r in rows) == 10
    assert (out / "attribution.html").read_text().count('<section class="item"') == 20
    assert len(re.findall(r"^\[\S+\] support", res.output, flags=re.M)) == 20


@pytest.mark.parametrize("command", ["attribute", "grounding-eval", "passage-rank"])
def test_help_shows_choices_and_describes_every_option(command):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0
    text = res.output
    for flag in ("--device", "--dtype", "--device-map", "--trust-remote-code", "--threads", "--watch", "--out"):
        assert flag in text, flag
    assert "<copy|topk_mass|needle_mass|distant_mass|query_focus>" in text
    if command != "passage-rank":
        assert "<fast|reference>" in text
    import typer

    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    undescribed = [p.name for p in params if not getattr(p, "help", None)]
    assert len(params) > 10 and not undescribed, undescribed
