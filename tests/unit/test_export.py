"""KV-head exports (`kvcache/export.py`) from every score source: the KV-head count comes from the
run's model spec or the shipped map's shape, never guessed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval_heads.errors import ConfigError, DataError
from retrieval_heads.kvcache import read_duo_pattern, read_duo_tsv
from retrieval_heads.kvcache.export import kv_head_count
from retrieval_heads.scorefile import write_scores

SNAPSHOTS = Path(__file__).resolve().parents[2] / "docs" / "runs"


def test_kv_head_count_sources():
    assert kv_head_count({}, 8, given=2) == 2
    assert kv_head_count({"model_spec": {"n_kv_heads": 3}}, 9) == 3
    assert kv_head_count({"reference": {"n_kv_heads": 8}}, 32) == 8
    assert kv_head_count({"model_spec": {"n_kv_heads": 3}}, 9, given=9) == 9  # --kv-heads wins
    with pytest.raises(ConfigError, match="give --kv-heads"):
        kv_head_count({"reference": {"n_kv_heads": None}}, 32)
    with pytest.raises(ConfigError, match="9 query heads cannot be grouped into 2 KV heads"):
        kv_head_count({}, 9, given=2)


@pytest.mark.parametrize(
    "scores,shape",
    [
        ("ref:Meta-Llama-3-8B-Instruct", (32, 8)),
        ("ref:Yi-6B-200K", (32, 4)),
        ("ref:llama-2-7b-80k", (32, 32)),
        (str(SNAPSHOTS / "smollm2-135m"), (30, 3)),
        (str(SNAPSHOTS / "gemma3-270m"), (18, 1)),
    ],
)
def test_export_heads_writes_kv_head_patterns(cli, tmp_path, scores, shape):
    out = tmp_path / "x"
    code, stdout, err = cli("export-heads", "--scores", scores, "--budget", "0.5", "--out", out)
    assert code == 0, err
    whole = read_duo_tsv(out / "full_attention_heads.tsv")
    assert whole.shape == shape and 0 < whole.sum() < whole.size
    assert read_duo_pattern(out / "duo_pattern")[0].shape == shape
    assert len(json.loads((out / "kv_head_scores.json").read_text())) == shape[0] * shape[1]
    assert f"of {shape[0] * shape[1]} KV heads whole" in stdout


def test_export_heads_refuses_an_unknown_kv_head_count(cli, tmp_path):
    scores = tmp_path / "authors.json"  # the authors' format names query heads only
    write_scores(scores, np.random.default_rng(0).random((2, 2, 4)))
    code, _, err = cli("export-heads", "--scores", scores, "--score", "copy", "--n-whole", "2", "--out", tmp_path / "x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--kv-heads" in err
    assert not (tmp_path / "x").exists()
    code, _, err = cli("export-heads", "--scores", scores, "--n-whole", "2", "--kv-heads", "2", "--out", tmp_path / "x")
    assert code == 0, err


@pytest.mark.parametrize(
    "record, error, match",
    [
        ({"kv_scores": [[0.1, 0.2]]}, None, None),
        ({}, DataError, "no list of KV-head scores"),
        ({"kv_scores": "abc"}, DataError, "no list of KV-head scores"),
        ({"kv_scores": [[0.1], [0.2, 0.3]]}, DataError, "no list of KV-head scores"),
        ({"kv_scores": {"a": 1}}, DataError, "no list of KV-head scores"),
        ({"kv_scores": [[1e400, 0.2]]}, DataError, "infinite"),
        ({"kv_scores": [[0.1, 0.2, 0.3]]}, ConfigError, "has shape"),
    ],
)
def test_measured_ranking_of_malformed_kv_run_records(tmp_path, record, error, match):
    from retrieval_heads.kvcache.export import measured_ranking

    (tmp_path / "records.jsonl").write_text(
        json.dumps({"id": "ranking/gain", "kind": "ranking", "ranking": "gain", **record}) + "\n"
    )
    if error is None:
        assert measured_ranking(tmp_path, "gain", (1, 2)).tolist() == [[0.1, 0.2]]
        with pytest.raises(ConfigError, match="holds no needle_attention ranking"):
            measured_ranking(tmp_path, "needle_attention", (1, 2))
        with pytest.raises(ConfigError, match="needs --kv-run"):
            measured_ranking(None, "gain", (1, 2))
    else:
        with pytest.raises(error, match=match):
            measured_ranking(tmp_path, "gain", (1, 2))
