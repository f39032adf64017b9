"""The shipped score maps (`reference.py`, `data/reference/`): every map carries its model's shape
with provenance, and `retrieval-heads refs` lists them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval_heads.errors import DataError
from retrieval_heads.reference import parse_reference_map, reference_info, reference_names, reference_path

ROOT = Path(__file__).resolve().parents[2]
# KV heads per layer from each model's published config.json (num_key_value_heads)
KV_HEADS = {
    "Meta-Llama-3-8B-Instruct": 8,
    "Mistral-7B-Instruct-v0.2": 8,
    "Mistral-7B-v0.2-hf": 8,
    "Mixtral-8x7B-v0.1": 8,
    "Yi-6B-200K": 4,
    "Qwen1.5-14B": 40,
    "Qwen1.5-14B-Chat": 40,
    "llama-2-7b-80k": 32,
    "llama-2-13b-64k": 40,
}


@pytest.mark.parametrize("name", reference_names())
def test_every_shipped_map_carries_its_shape_with_provenance(name):
    info = reference_info(f"ref:{name}")
    assert info.n_kv_heads is not None and info.n_heads % info.n_kv_heads == 0
    assert info.shape_source and info.origin and info.n_kept > 0
    base = name.removesuffix("_retrieval_reasoning")
    if base in KV_HEADS:
        assert info.n_kv_heads == KV_HEADS[base] and info.shape_source.startswith("config.json of ")
    else:  # our own default runs: the shape of the run's model spec
        spec = json.loads((ROOT / "docs" / "runs" / name / "config.json").read_text())["model_spec"]
        assert (info.n_layers, info.n_heads, info.n_kv_heads) == (spec["n_layers"], spec["n_heads"], spec["n_kv_heads"])


def test_kv_head_count_is_validated_and_optional():
    obj = json.loads(reference_path("Yi-6B-200K").read_text())
    assert parse_reference_map(obj, "yi")[3]["n_kv_heads"] == 4
    with pytest.raises(DataError, match="32 query heads cannot be grouped into 5 KV heads"):
        parse_reference_map({**obj, "n_kv_heads": 5}, "yi")
    unknown = {k: v for k, v in obj.items() if k != "n_kv_heads"}  # a map written before shapes shipped
    assert parse_reference_map(unknown, "yi")[3]["n_kv_heads"] is None


def test_refs_lists_every_map_with_shape_and_provenance(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one row per map
    code, out, err = cli("refs")
    assert code == 0, err
    for name in reference_names():
        assert name in out
    assert "32 x 32 (8)" in out and "32 x 32 (4)" in out and "nightdessert/Retrieval_Head" in out
    assert "dequantized" in out  # the default model is a 4-bit GGUF, said where the maps are listed
    code, out, err = cli("refs", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == set(reference_names())
    assert rows["Meta-Llama-3-8B-Instruct"]["n_kv_heads"] == 8
    assert rows["Mistral-7B-v0.2-hf"]["origin"].endswith("@7ea1f00a8582")
