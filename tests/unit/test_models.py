"""Model loading (`models.py`): `auto` device and dtype, and what a user is told of the default model."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import torch

from retrieval_heads import models as M
from retrieval_heads.errors import ModelLoadError


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    mps = getattr(torch.backends, "mps", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert M.resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: True)
        assert M.resolve_device("auto") == "mps"
        monkeypatch.setattr(mps, "is_available", lambda: False)
    assert M.resolve_device("auto") == "cpu"
    assert M.resolve_device("cuda:1") == "cuda:1"  # an explicit device is taken as given


def test_auto_dtype_is_bfloat16_on_a_gpu_and_float32_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert M.resolve_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert M.resolve_dtype("auto", "cuda:0") == "float32"
    assert M.resolve_dtype("auto", "cpu") == "float32"
    assert M.resolve_dtype("float16", "cpu") == "float16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_defaults_on_a_cpu_machine_are_cpu_and_float32(tiny_llama_dir):
    """`auto` must give today's CPU numbers: float32 weights on the CPU."""
    lm = M.load_model(str(tiny_llama_dir))
    p = next(lm.model.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="unknown dtype 'float64'"):
        M.load_model(str(tiny_llama_dir), dtype="float64")  # type: ignore[arg-type]


def test_default_model_note_says_it_is_a_dequantized_gguf():
    note = M.default_model_note()
    assert M.DEFAULT_MODEL in note and M.ALIASES[M.DEFAULT_MODEL].gguf_name in note and "dequantized" in note


# ---------------------------------------------------------------- GGUF cache: one converter
def test_concurrent_gguf_conversions_convert_once(tmp_path, monkeypatch):
    import transformers

    from retrieval_heads import models
    from retrieval_heads.testing import tiny_model

    monkeypatch.setenv("RETRIEVAL_HEADS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    lm = tiny_model("llama")
    calls = []

    def slow_model(*a, **k):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # the window in which another process would convert too
        return lm.model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", slow_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: lm.tokenizer)
    old = os.umask(0o022)
    try:
        results, errors = [], []

        def convert():
            try:
                results.append(models.gguf_to_safetensors(gguf))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=convert) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.umask(old)
    assert not errors, errors
    assert len(calls) == 1 and len(set(results)) == 1
    out = results[0]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0700: a shared cache
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o644}  # not safetensors' 0600
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_a_run_with_default_flags_records_cpu_and_float32(cli, tiny_llama_dir, haystack_file, needles_file, tmp_path):
    """`--device auto --dtype auto` (the defaults) resolve to cpu/float32 here, recorded in the config."""
    import json

    out = tmp_path / "run"
    args = ("--lengths", "80", "--depths", "50", "--needles", needles_file, "--haystack", haystack_file)
    code, _, err = cli("detect", "--model", tiny_llama_dir, *args, "--max-new-tokens", "3", "--no-chat", "-o", out)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["machine"]["device"] == "cpu"
    assert config["machine"].get("dtype", "float32") == "float32"
