"""finetune-eval end to end on tiny models: conditions, data, the masked control, resume, the
table, the figure and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retrieval_heads.detection import Grid
from retrieval_heads.errors import ConfigError
from retrieval_heads.experiments import finetune
from retrieval_heads.experiments.finetune import FinetuneConfig, finetune_eval, training_data
from retrieval_heads.experiments.finetune_results import FinetuneResult, finetune_table
from retrieval_heads.needles import DETECTION_NEEDLES, EVALUATION_NEEDLES, Needle
from retrieval_heads.plots.training import plot_training
from retrieval_heads.runs import read_records
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
)


@pytest.fixture
def cfg(haystack_file) -> FinetuneConfig:
    return FinetuneConfig(
        steps=4,
        seq_len=32,
        learning_rate=1e-2,
        warmup_steps=0,
        watch_every=2,
        watch_grid=Grid((80,), (50.0,), NEEDLES),
        detect_grid=Grid((80,), (0.0, 100.0), NEEDLES),
        max_new_tokens=4,
        chat=False,
        haystack=str(haystack_file),
        recall_threshold=-1.0,  # random tiny models retrieve nothing: keep every sample
        control_k=2,
        k=3,
    )


def _run(cfg: FinetuneConfig, out, **changes):
    lm = tiny_model("llama", attn_implementation="sdpa")
    return lm, finetune_eval(lm, FinetuneConfig(**{**cfg.__dict__, **changes}), out=out, show_progress=False)


def test_continual_run_records_maps_trajectory_and_table(tmp_path, cfg):
    _, res = _run(cfg, tmp_path / "run")
    recs = read_records(tmp_path / "run" / "records.jsonl")
    phases = [r["phase"] for r in recs]
    assert phases.count("before") == phases.count("after") == 2
    assert [r["step"] for r in recs if r["phase"] == "watch"] == [0, 2, 4]
    assert [r["step"] for r in recs if r["phase"] == "loss"] == [4]  # logged every min(5, steps) steps
    c = res.comparison()
    assert c["kept_before"] == c["kept_after"] == 2
    assert 0 <= c["top3_overlap"] <= 3 and c["watch_calls"] == 3
    assert c["train_seconds"] > 0 and c["masked"] == []
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["label"] == "continual" and summary["trajectory"]["step"] == [0, 2, 4]
    assert len(summary["scores_before"]) == 2  # [layers][heads]
    table = (tmp_path / "run" / "table.md").read_text()
    assert table.startswith("| condition |") and "| continual | full, lr 0.01, 32 tok | 4 |" in table
    # the trained model differs: its maps come from two different models
    assert FinetuneResult.load(tmp_path / "run").row() == res.row()


def test_a_finished_run_is_read_back_without_training(tmp_path, cfg, monkeypatch):
    _, first = _run(cfg, tmp_path / "run")

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(finetune, "train", no_training)
    _, again = _run(cfg, tmp_path / "run")
    assert again.row() == first.row()
    assert json.dumps(again.trajectory()) == json.dumps(first.trajectory())  # NaN-safe equality


def test_masked_control_freezes_the_masked_heads_queries(tmp_path, cfg):
    """Uniform masking zeroes a head's query in every training forward: no gradient reaches its
    rows of q_proj, so exactly those rows keep their weights (AdamW without weight decay)."""
    lm = tiny_model("llama", attn_implementation="sdpa")
    q_before = [layer.self_attn.q_proj.weight.detach().clone() for layer in lm.model.model.layers]
    res = finetune_eval(lm, FinetuneConfig(**{**cfg.__dict__, "condition": "control"}), out=None, show_progress=False)
    masked = [tuple(h) for h in res.comparison()["masked"]]
    assert len(masked) == 2 and masked == [(h.layer, h.head) for h in res.before.top(2)]
    head_dim = lm.spec.head_dim
    for l, layer in enumerate(lm.model.model.layers):
        q = layer.self_attn.q_proj.weight.detach()
        for h in range(lm.spec.n_heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            same = torch.equal(q[rows], q_before[l][rows])
            assert same == ((l, h) in masked), (l, h)
    assert res.label == "control (mask top-2)"


def test_training_data_of_each_condition(cfg):
    tok = tiny_model("llama").tokenizer
    cont = training_data(tok, cfg)
    shuf = training_data(tok, FinetuneConfig(**{**cfg.__dict__, "condition": "control", "control": "shuffle"}))
    assert len(cont) == len(shuf) == cfg.steps * cfg.batch_size
    for a, b in zip(cont, shuf, strict=True):  # the same chunks, each one's tokens permuted
        assert a["input_ids"].shape == (cfg.seq_len,)
        assert torch.equal(a["input_ids"].sort().values, b["input_ids"].sort().values)
        assert torch.equal(b["input_ids"], b["labels"])
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(cont, shuf, strict=True))
    inst = training_data(tok, FinetuneConfig(**{**cfg.__dict__, "condition": "instruct"}))
    labels = torch.cat([x["labels"] for x in inst])
    assert (labels == -100).any() and (labels != -100).any()  # loss on the answers only


def test_instruction_data_never_shows_a_needle():
    from retrieval_heads.experiments.finetune import instruct_pairs

    pairs = instruct_pairs()
    assert len(pairs) > 1000
    text = " ".join(f"{q} {a}" for q, a in pairs).lower()
    for n in (*DETECTION_NEEDLES, *EVALUATION_NEEDLES):
        assert n.answer.lower() not in text and n.needle.lower() not in text


def test_bad_config_is_one_clear_error(cfg):
    for change, match in (
        ({"condition": "rlhf"}, "unknown condition 'rlhf'; choose from continual, instruct, control"),
        ({"control": "noise"}, "unknown control 'noise'; choose from mask, shuffle"),
        ({"steps": 0}, ">= 1"),
        ({"learning_rate": 0.0}, "learning rate"),
    ):
        with pytest.raises(ConfigError, match=match):  # at construction, before any work
            FinetuneConfig(**{**cfg.__dict__, **change})
    d = cfg.to_dict()  # the saved config: lists and plain dicts, as before
    assert d["watch_lengths"] == [80] and d["detect_depths"] == [0.0, 100.0] and "watch_grid" not in d
    assert d["detect_needles"] == [n.to_dict() for n in NEEDLES] and list(d)[12:15] == [
        "watch_every",
        "watch_lengths",
        "watch_depths",
    ]


def test_figure_and_table_of_several_runs(tmp_path, cfg):
    _, a = _run(cfg, None)
    _, b = _run(cfg, None, condition="instruct", lora=True, lora_r=2)
    table = finetune_table([a, b])
    assert table.count("\n") == 3 and "| instruct | LoRA r=2" in table
    paths = plot_training([a.to_dict(), b.to_dict()], tmp_path / "fig")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)
    assert np.isfinite(b.comparison()["train_seconds"])


def test_cli_rejects_bad_options_before_loading(cli):
    code, _, err = cli("finetune-eval", "--condition", "rlhf")
    assert code == 2 and err.strip().count("\n") == 0 and "unknown condition" in err
    code, _, err = cli("finetune-plot", "/nonexistent-run")
    assert code == 2 and "error:" in err


def test_cli_plot_of_a_finished_run(tmp_path, cfg, cli):
    _run(cfg, tmp_path / "run")
    code, _, err = cli("finetune-plot", str(tmp_path / "run"), "--out", str(tmp_path / "fig"))
    assert code == 0, err
    assert (tmp_path / "fig.png").exists() and (tmp_path / "fig.svg").exists()


def test_docs_table_of_several_runs(tmp_path, cfg):
    from retrieval_heads.docs_tables import generate

    _run(cfg, tmp_path / "a")
    _run(cfg, tmp_path / "b", condition="control", control="shuffle")
    text = generate("finetune-eval a b", root=tmp_path)
    lines = text.splitlines()
    assert lines[0].startswith("| condition |") and lines[2].startswith("| continual |")
    assert lines[3].startswith("| control (shuffle) |") and "Generated by" in text


def test_sizes_are_checked_against_the_model_before_any_folder(tmp_path, cfg, cli, tiny_llama_dir):
    lm = tiny_model("llama", attn_implementation="sdpa")
    for change, match in (
        ({"seq_len": 100_000}, "seq_len 100000 is above the max context"),
        ({"detect_grid": Grid((100_000,), (50.0,), NEEDLES)}, "length 100000 is above the max context"),
        ({"watch_grid": Grid((100_000,), (50.0,), NEEDLES)}, "length 100000 is above the max context"),
    ):
        with pytest.raises(ConfigError, match=match):
            finetune_eval(lm, FinetuneConfig(**{**cfg.__dict__, **change}), out=tmp_path / "run", show_progress=False)
        assert not (tmp_path / "run").exists()
    out = tmp_path / "cli-run"
    code, _, err = cli("finetune-eval", "--model", tiny_llama_dir, "--seq-len", "100000", "--out", out)
    assert code == 2 and "seq_len 100000" in err and not out.exists()


def test_an_empty_grid_is_refused_at_construction(cfg):
    for change in ({"watch_grid": Grid((), (50.0,), NEEDLES)}, {"detect_grid": Grid((80,), (), NEEDLES)}):
        with pytest.raises(ConfigError, match="grid is empty"):
            FinetuneConfig(**{**cfg.__dict__, **change})


def test_the_mask_control_refuses_a_detection_that_kept_no_sample(cfg):
    lm = tiny_model("llama", attn_implementation="sdpa")
    none_kept = FinetuneConfig(**{**cfg.__dict__, "condition": "control", "recall_threshold": 2.0})
    with pytest.raises(ConfigError, match="no kept detection sample"):  # not a control that masks nothing
        finetune_eval(lm, none_kept, out=None, show_progress=False)
