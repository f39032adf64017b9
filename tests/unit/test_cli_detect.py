"""`retrieval-heads detect` (cli/detect.py) on bad input: one line, exit 2, no run folder left."""

from __future__ import annotations

import json

from .test_app import _one_line


def test_lengths_inf_on_the_command_line(cli, tmp_path, tiny_llama_dir, haystack_file, needles_file):
    common = ["--model", tiny_llama_dir, "--haystack", haystack_file, "--needles", needles_file]
    code, _, err = cli("detect", *common, "--lengths", "inf", "--out", tmp_path / "o")
    assert code == 2 and "inf or nan" in _one_line(err)


def test_a_failed_start_leaves_no_config(cli, tmp_path, tiny_llama_dir, haystack_file):
    lost = tmp_path / "lost.jsonl"
    lost.write_text(
        json.dumps({"id": "lost", "needle": "zorblax quintessence flumph .", "question": "q ?", "answer": "zorblax"})
        + "\n"
    )
    out = tmp_path / "out"
    code, _, err = cli(
        "detect",
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
        "--no-chat",
        "--no-progress",
        "--out",
        out,
    )
    assert code == 2, err
    assert not out.exists()


def test_under_torchrun_cuda_means_the_local_rank_gpu(cli, monkeypatch, tmp_path):
    import retrieval_heads.cli.detect as command
    from retrieval_heads import distributed, models
    from retrieval_heads.errors import ConfigError

    seen = {}

    def fake_open(name, **kw):
        seen.update(kw, name=name)
        raise ConfigError("stop here")

    monkeypatch.setattr(command, "open_model", fake_open)
    monkeypatch.setattr(distributed, "torchrun_rank", lambda: (1, 2))
    monkeypatch.setattr(models, "resolve_device", lambda device="auto": "cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    code, _, err = cli("detect", "--model", "m", "--engine", "reference", "--threads", "1", "--out", tmp_path / "o")
    assert code == 2 and "stop here" in err
    assert seen == {
        "name": "m",
        "attn_implementation": "eager",
        "device": "cuda:1",
        "dtype": "auto",
        "device_map": None,
        "trust_remote_code": False,
        "threads": 1,
    }
