"""export-heads: KV-head lists in the authors' format and DuoAttention's, from the detection scores
or a ranking kv-eval measured; the score by default the best one the source holds."""

from __future__ import annotations

import json

import numpy as np

from retrieval_heads.kvcache import read_duo_pattern, read_duo_tsv
from retrieval_heads.scorefile import write_scores

SCORES = np.array([[0.9, 0.0, 0.2, 0.05], [0.0, 0.6, 0.0, 0.3]])


def _scores_file(tmp_path, arr):
    p = tmp_path / "scores.json"
    write_scores(p, np.asarray(arr)[None])
    return p


def test_cli_export_heads(cli, tmp_path):
    scores = _scores_file(tmp_path, SCORES)
    code, _out, err = cli(
        "export-heads", "--scores", scores, "--out", tmp_path / "x", "--n-whole", "2", "--kv-heads", "2"
    )
    assert code == 0, err
    # KV scores: layer 0 -> [0.9, 0.2], layer 1 -> [0.6, 0.3] (max over the query heads of each)
    assert read_duo_tsv(tmp_path / "x" / "full_attention_heads.tsv").tolist() == [[True, False], [True, False]]
    assert json.loads((tmp_path / "x" / "kv_head_scores.json").read_text())["0-0"] == [0.9]
    values, config = read_duo_pattern(tmp_path / "x" / "duo_pattern")  # what DuoAttention and kvpress read
    np.testing.assert_allclose(values, [[1.0, 0.0], [2 / 3, 1 / 3]], atol=1e-6)
    assert (config["sink_size"], config["recent_size"], config["score"]) == (4, 60, "copy")
    assert err.count("warning: ") == 1 and "no needle_mass" in err  # a score file holds copy only
    code, _, err = cli("export-heads", "--scores", scores, "--out", tmp_path / "y")
    assert code != 0 and "exactly one of --budget and --n-whole" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("export-heads", "--scores", scores, "--out", tmp_path / "y", "--n-whole", "1", "--kv-heads", "3")
    assert code != 0 and "cannot be grouped" in err


def test_cli_export_measured_ranking(cli, tmp_path):
    """export-heads --ranking needle_attention takes the KV-head scores a kv-eval run measured."""
    scores = _scores_file(tmp_path, SCORES)
    run = tmp_path / "kvrun"
    run.mkdir()
    measured = [[0.1, 0.7], [0.5, 0.2]]  # a different order than the retrieval scores
    (run / "records.jsonl").write_text(
        json.dumps(
            {"id": "ranking/needle_attention", "kind": "ranking", "ranking": "needle_attention", "kv_scores": measured}
        )
        + "\n"
    )
    code, _, err = cli(
        "export-heads",
        "--scores",
        scores,
        "--out",
        tmp_path / "x",
        "--n-whole",
        "2",
        "--kv-heads",
        "2",
        "--ranking",
        "needle_attention",
        "--kv-run",
        run,
    )
    assert code == 0, err
    assert read_duo_tsv(tmp_path / "x" / "full_attention_heads.tsv").tolist() == [[False, True], [True, False]]
    assert json.loads((tmp_path / "x" / "kv_head_scores.json").read_text())["0-1"] == [0.7]
    for extra, match in (
        (["--ranking", "gain", "--kv-run", run], "holds no gain ranking"),
        (["--ranking", "needle_attention"], "needs --kv-run"),
        (["--ranking", "h2o", "--kv-run", run], "unknown ranking 'h2o'"),
    ):
        code, _, err = cli(
            "export-heads", "--scores", scores, "--out", tmp_path / "y", "--n-whole", "1", "--kv-heads", "2", *extra
        )
        assert code != 0 and match in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "y" / "kv_head_scores.json").exists()


def test_export_heads_never_replaces_files_it_did_not_write(cli, tmp_path):
    scores = _scores_file(tmp_path, SCORES)
    args = ("export-heads", "--scores", scores, "--n-whole", "2", "--kv-heads", "2", "--out")
    for name in ("full_attention_heads.tsv", "kv_head_scores.json"):
        user = tmp_path / f"user-{name}"
        user.mkdir()
        (user / name).write_text("a trained pattern\n")
        code, _out, err = cli(*args, user)
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "did not write" in err, err
        assert (user / name).read_text() == "a trained pattern\n" and sorted(p.name for p in user.iterdir()) == [name]
    duo = tmp_path / "duo" / "duo_pattern"  # a DuoAttention pattern folder of the user's
    duo.mkdir(parents=True)
    (duo / "config.json").write_text('{"sink_size": 64, "recent_size": 256}')
    code, _out, err = cli(*args, tmp_path / "duo")
    assert code == 2 and "did not write" in err and (duo / "config.json").read_text().startswith('{"sink_size": 64')
    assert not (tmp_path / "duo" / "kv_head_scores.json").exists()
    # our own folder is rewritten freely
    assert cli(*args, tmp_path / "ours")[0] == 0
    assert cli(*args, tmp_path / "ours")[0] == 0
