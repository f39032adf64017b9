"""agreement (and `compare`'s agreement table): top-K overlap, Jaccard and Pearson of two runs of one
model with bootstrap intervals, on tiny run folders written here (no model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from retrieval_heads import agreement as G
from retrieval_heads.cli import main
from retrieval_heads.errors import ConfigError
from retrieval_heads.results import N_BOOT, DetectionResult
from retrieval_heads.runs import strict_json

# Two maps of a 2 x 3 model (copy counts out of 10 needle tokens), chosen to check by hand:
# top-3 of A = L0-H0, L0-H1, L0-H2; top-3 of B = L0-H0, L1-H2, L0-H2 -> 2 shared of 4 distinct heads;
# Pearson of [5, 4, 3, 2, 1, 0] and [5, 0, 3, 2, 1, 4]: 1.5 / 17.5 = 3 / 35.
MAP_A = [[5, 4, 3], [2, 1, 0]]
MAP_B = [[5, 0, 3], [2, 1, 4]]


def _run(path: Path, copy_maps: list, topk_maps: list | None = None, lengths: list[int] | None = None) -> Path:
    """A run folder whose kept samples have these copy counts (and topk_mass maps, lengths)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": "tiny"}))
    recs = []
    for i, c in enumerate(copy_maps):
        rec = {
            "id": f"s{i}",
            "needle_id": "a",
            "length": lengths[i] if lengths else 100,
            "depth": 50.0,
            "answer_recall": 1.0,
            "kept": True,
            "copy_counts": c,
            "needle_tokens": 10,
            "generated_text": "x",
            "prompt_tokens": 100 + i,
            "seconds": 1.5,
        }
        if topk_maps is not None:
            rec["attention_scores"] = {"topk_mass": topk_maps[i]}
        recs.append(rec)
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _varied(path: Path, seed: int, n: int = 8) -> Path:
    rng = np.random.default_rng(seed)
    strong = np.array([[0, 0, 0, 0], [0, 5, 0, 0], [0, 0, 3, 0]])  # two heads every sample copies with
    maps = [(rng.poisson(1.0, size=(3, 4)) + strong).tolist() for _ in range(n)]
    return _run(path, maps)


def _summary(run: Path, folder: Path) -> Path:
    """The run's snapshot: summary.json only (aggregates, no per-sample records)."""
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(strict_json(DetectionResult.load(run).summary())))
    return folder


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["retrieval-heads", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def _by_metric(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index("metric")


def test_a_run_with_itself_agrees_fully_with_intervals_around_the_point(tmp_path) -> None:
    r = DetectionResult.load(_varied(tmp_path / "a", seed=0))
    assert r.n_kept == 8
    df = _by_metric(G.run_agreement(r, r, "copy", 5))
    assert df.loc["overlap", "value"] == 5 and df.loc["jaccard", "value"] == 1.0
    assert df.loc["pearson", "value"] == pytest.approx(1.0)
    for m in G.METRICS:
        assert df.loc[m, "ci_low"] <= df.loc[m, "value"] + 1e-12 and df.loc[m, "value"] <= df.loc[m, "ci_high"] + 1e-12
    assert (df["n_boot"] == N_BOOT).all()


def test_two_runs_give_the_hand_checked_values(tmp_path) -> None:
    a = DetectionResult.load(_run(tmp_path / "a", [MAP_A, MAP_A]))
    b = DetectionResult.load(_run(tmp_path / "b", [MAP_B, MAP_B, MAP_B]))
    df = _by_metric(G.run_agreement(a, b, "copy", 3))
    assert df.loc["overlap", "value"] == 2
    assert df.loc["jaccard", "value"] == pytest.approx(0.5)
    assert df.loc["pearson", "value"] == pytest.approx(3 / 35)
    # every kept sample is the same map, so every resample gives the point value
    assert np.allclose(df["ci_low"], df["value"]) and np.allclose(df["ci_high"], df["value"])
    assert G.run_agreement(a, b, "copy", 6).set_index("metric").loc["jaccard", "value"] == 1.0  # all heads


def test_intervals_vary_when_the_samples_do(tmp_path) -> None:
    a = DetectionResult.load(_varied(tmp_path / "a", seed=1))
    b = DetectionResult.load(_varied(tmp_path / "b", seed=2))
    df = _by_metric(G.run_agreement(a, b, "copy", 4))
    assert (df["ci_low"] <= df["ci_high"]).all() and df.loc["pearson", "ci_low"] < df.loc["pearson", "ci_high"]
    assert 0 <= df.loc["overlap", "ci_low"] and df.loc["overlap", "ci_high"] <= 4


def test_another_score_is_ranked_by_with_score(tmp_path) -> None:
    zeros = [[0, 0, 0], [0, 0, 0]]
    a = DetectionResult.load(_run(tmp_path / "a", [zeros, zeros], [MAP_A, MAP_A]))
    b = DetectionResult.load(_run(tmp_path / "b", [zeros, zeros], [MAP_B, MAP_B]))
    df = _by_metric(G.run_agreement(a, b, "topk_mass", 3))
    assert df.loc["overlap", "value"] == 2 and df.loc["pearson", "value"] == pytest.approx(3 / 35)
    assert np.isnan(G.run_agreement(a, b, "copy", 3).set_index("metric").loc["pearson", "value"])  # constant maps


def test_a_summary_gives_point_values_without_intervals(tmp_path) -> None:
    run = _run(tmp_path / "a", [MAP_A, MAP_A], [MAP_A, MAP_A])
    full, summ = DetectionResult.load(run), DetectionResult.load(_summary(run, tmp_path / "snap"))
    assert not summ.has_per_sample
    for score in ("copy", "topk_mass"):
        df = _by_metric(G.run_agreement(full, summ, score, 3))
        assert df.loc["overlap", "value"] == 3 and df.loc["pearson", "value"] == pytest.approx(1.0)
        assert df[["ci_low", "ci_high"]].isna().all().all() and (df["n_boot"] == 0).all()
    note = G.interval_note([full, summ])
    assert note is not None and "no per-sample records" in note and note.count("\n") == 0
    assert G.interval_note([full]) is None


def test_bad_k_and_unknown_score_raise(tmp_path) -> None:
    r = DetectionResult.load(_run(tmp_path / "a", [MAP_A, MAP_A]))
    for k in (0, 7, -1):
        with pytest.raises(ConfigError, match="k must be a whole number from 1 to 6"):
            G.run_agreement(r, r, "copy", k)
    with pytest.raises(ConfigError, match="no score 'needle_mass'"):
        G.agreement_table([r, r], "needle_mass", 3)


def test_compare_writes_and_prints_the_agreement(tmp_path, monkeypatch, capsys) -> None:
    a = _run(tmp_path / "a", [MAP_A, MAP_A])
    b = _run(tmp_path / "b", [MAP_B, MAP_B])
    out = tmp_path / "out"
    code, stdout, err = _cli(monkeypatch, capsys, "compare", str(a), str(b), "--k", "3", "-o", str(out), "--no-figures")
    assert code == 0, err
    rows = json.loads((out / "agreement.json").read_text())
    got = {r["metric"]: r for r in rows}
    assert got["overlap"]["value"] == 2 and got["jaccard"]["value"] == pytest.approx(0.5)
    assert got["pearson"]["ci_low"] == pytest.approx(3 / 35) and got["pearson"]["k"] == 3
    csv = pd.read_csv(out / "agreement.csv")
    assert list(csv["metric"]) == list(G.METRICS) and set(csv["score"]) == {"copy"}
    assert "2/3" in stdout and "0.500" in stdout and (out / "correlation.json").exists()
    assert "note:" not in err


def test_compare_with_a_summary_shows_na_and_one_note(tmp_path, monkeypatch, capsys) -> None:
    run = _run(tmp_path / "a", [MAP_A, MAP_A])
    snap = _summary(run, tmp_path / "snap")
    out = tmp_path / "out"
    args = ("compare", str(run), str(snap), "-o", str(out), "--no-figures")  # --k 10: all 6 heads
    code, stdout, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "n/a" in stdout and err.count("note:") == 1 and "no per-sample records" in err
    rows = json.loads((out / "agreement.json").read_text())
    assert {r["metric"]: r["value"] for r in rows}["overlap"] == 6 and rows[0]["k"] == 6
    assert all(r["ci_low"] is None for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--k", "0"), "k must be"), (("--k", "7"), "from 1 to 6"), (("--score", "focus"), "no score 'focus'")],
)
def test_compare_bad_k_or_score_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message) -> None:
    a = _run(tmp_path / "a", [MAP_A, MAP_A])
    out = tmp_path / "out"
    code, _, err = _cli(monkeypatch, capsys, "compare", str(a), str(a), *args, "-o", str(out), "--no-figures")
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_compare_several_scores_and_the_cost_of_each_grid(tmp_path, monkeypatch, capsys) -> None:
    a = _run(tmp_path / "a", [MAP_A, MAP_A], topk_maps=[MAP_B, MAP_B])
    b = _run(tmp_path / "b", [MAP_B, MAP_B, MAP_B], topk_maps=[MAP_B, MAP_B, MAP_B])
    out = tmp_path / "out"
    args = ("compare", str(a), str(b), "--k", "3", "--score", "copy", "--score", "topk_mass", "-o", str(out))
    code, stdout, err = _cli(monkeypatch, capsys, *args, "--no-figures")
    assert code == 0, err
    rows = json.loads((out / "agreement.json").read_text())
    got = {(r["score"], r["metric"]): r["value"] for r in rows}
    assert got[("copy", "overlap")] == 2 and got[("topk_mass", "overlap")] == 3  # B's topk map equals A's
    assert stdout.count("Do the runs find the same heads?") == 2
    runs = json.loads((out / "agreement_runs.json").read_text())
    assert [r["n_samples"] for r in runs] == [2, 3] and [r["n_kept"] for r in runs] == [2, 3]
    assert [r["prompt_tokens"] for r in runs] == [201, 303] and [r["seconds"] for r in runs] == [3.0, 4.5]


def test_the_agreement_table_renders_the_compare_folder(tmp_path, monkeypatch, capsys) -> None:
    from retrieval_heads.docs_agreement import agreement_rows
    from retrieval_heads.errors import DataError

    a = _run(tmp_path / "a", [MAP_A, MAP_A])
    b = _run(tmp_path / "b", [MAP_B, MAP_B, MAP_B])
    out = tmp_path / "cmp"
    code, _, err = _cli(monkeypatch, capsys, "compare", str(a), str(b), "--k", "3", "-o", str(out), "--no-figures")
    assert code == 0, err
    table, line = agreement_rows(["cmp"], {}, tmp_path, "t.md:1")
    row_a, row_b = (x for x in table.splitlines() if x.startswith("| 100"))
    assert "| 2 (2) | 0.66 | 0.67 | 2/3 [2, 2]; r 0.086 [0.086, 0.086] |" in row_a  # tokens, seconds vs B
    assert "(reference) | 3 (3) | 1.00 | 1.00 | - |" in row_b
    assert "2 samples (2 kept), 201 prompt tokens" in table and "3 samples (3 kept), 303 prompt tokens" in table
    assert line.startswith("Generated by `retrieval-heads docs-tables` from cmp: `retrieval-heads compare`")
    (out / "agreement_runs.json").unlink()
    with pytest.raises(DataError, match=r"agreement_runs\.json not found"):
        agreement_rows(["cmp"], {}, tmp_path, "t.md:1")


def test_a_compare_folder_snapshots_its_two_files(tmp_path, monkeypatch, capsys) -> None:
    from retrieval_heads.docs_tables import snapshot

    a = _run(tmp_path / "a", [MAP_A, MAP_A])
    out = tmp_path / "cmp"
    code, _, err = _cli(monkeypatch, capsys, "compare", str(a), str(a), "-o", str(out))
    assert code == 0, err
    dest = snapshot(out, tmp_path / "docs")
    assert sorted(p.name for p in dest.iterdir()) == ["agreement.json", "agreement_runs.json"]
    assert (dest / "agreement.json").read_text() == (out / "agreement.json").read_text()


def test_compare_by_length_cuts_the_first_run_to_its_shorter_grids(tmp_path, monkeypatch, capsys) -> None:
    from retrieval_heads.docs_agreement import agreement_rows

    # A: two samples at length 100 copy like B, two at 200 copy otherwise: its <= 100 grid matches B
    a = _run(tmp_path / "a", [MAP_B, MAP_B, MAP_A, MAP_A], lengths=[100, 100, 200, 200])
    b = _run(tmp_path / "b", [MAP_B, MAP_B])
    out = tmp_path / "cmp"
    args = ("compare", str(a), str(b), "--k", "3", "--by-length", "-o", str(out), "--no-figures")
    code, _, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    rows = json.loads((out / "agreement.json").read_text())
    overlap = {r["a"]: r["value"] for r in rows if r["metric"] == "overlap"}
    assert overlap == {"tiny (a) (lengths <= 100)": 3, "tiny (a)": 2}  # the whole of A: mean of both maps
    runs = json.loads((out / "agreement_runs.json").read_text())
    assert [(r["name"], r["cut"], r["n_samples"], r["lengths"]) for r in runs] == [
        ("tiny (a) (lengths <= 100)", True, 2, [100]),
        ("tiny (a)", False, 4, [100, 200]),
        ("tiny (b)", False, 2, [100]),
    ]
    table, _ = agreement_rows(["cmp"], {}, tmp_path, "t.md:1")
    grids = [x.split(" |")[0] for x in table.splitlines() if x.startswith("| 1")]
    assert grids == ["| 100", "| 100-200", "| 100 (reference)"]
