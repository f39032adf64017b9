"""analysis / plots / report / CLI analyze-compare-report, without any model.

Shares and correlations on the authors' files are checked against values computed here from the
raw JSON, independently of the package's reader and statistics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from retrieval_heads import analysis as A
from retrieval_heads.cli import app, main
from retrieval_heads.errors import DataError
from retrieval_heads.results import DetectionResult

# The authors' and HeadKV's published maps, shipped as compact derived data (retrieval_heads.reference)
REF = Path(__file__).resolve().parents[2] / "src" / "retrieval_heads" / "data" / "reference"
HEADKV_NAMES = ["Meta-Llama-3-8B-Instruct", "Mistral-7B-Instruct-v0.2"]
SEVEN = [
    "llama-2-7b-80k",
    "llama-2-13b-64k",
    "Mistral-7B-v0.2-hf",
    "Mixtral-8x7B-v0.1",
    "Yi-6B-200K",
    "Qwen1.5-14B",
    "Qwen1.5-14B-Chat",
]


# ---------------------------------------------------------------- independent helpers (no package code)
def _raw_scores(path: Path) -> dict[tuple[int, int], float]:
    obj = json.loads(path.read_text())
    m = obj["retrieval_score"]
    return {(l, h): float(m[l][h]) for l in range(len(m)) for h in range(len(m[0]))}


def _vector(raw: dict[tuple[int, int], float]) -> np.ndarray:
    return np.array([raw[k] for k in sorted(raw)])


@pytest.fixture(scope="module")
def authors() -> dict[str, DetectionResult]:
    return {r.name: r for r in A.load_results([f"ref:{n}" for n in SEVEN + HEADKV_NAMES])}


@pytest.fixture(scope="module")
def raw() -> dict[str, dict[tuple[int, int], float]]:
    return {n: _raw_scores(REF / f"{n}.json") for n in SEVEN + HEADKV_NAMES}


def _run_folder(path: Path, seed: int = 0, n_layers: int = 3, n_heads: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": "tiny"}))
    recs = []
    for length in (100, 200):
        for depth in (0.0, 100.0):
            for needle in ("a", "b"):
                c = rng.poisson(0.5, size=(n_layers, n_heads))
                c[2, 1] += 6
                recall = float(rng.choice([0.25, 1.0]))
                recs.append(
                    {
                        "id": f"{needle}-{length}-{depth}",
                        "needle_id": needle,
                        "length": length,
                        "depth": depth,
                        "answer_recall": recall,
                        "kept": recall > 0.5,
                        "copy_counts": c.tolist(),
                        "needle_tokens": 10,
                        "generated_text": "x",
                    }
                )
    (path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _cli_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["retrieval-heads", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


# ---------------------------------------------------------------- the authors' files
def test_sparsity_matches_independent_computation(authors, raw) -> None:
    table = A.sparsity_table(list(authors.values())).set_index("model")
    for name, scores in raw.items():
        vals = list(scores.values())
        n = len(vals)
        row = table.loc[name]
        assert row["n_heads"] == n
        assert row["zero"] == pytest.approx(sum(v == 0 for v in vals) / n)
        assert row["(0,0.1]"] == pytest.approx(sum(0 < v <= 0.1 for v in vals) / n)
        assert row["(0.1,0.5]"] == pytest.approx(sum(0.1 < v <= 0.5 for v in vals) / n)
        assert row[">0.5"] == pytest.approx(sum(v > 0.5 for v in vals) / n)
        assert row["n_retrieval_heads"] == sum(v > 0.1 for v in vals)
    # the paper's picture (ALGORITHM.md): sparse, a few percent retrieval heads, in all seven models
    seven = table.loc[SEVEN]
    assert seven["zero"].between(0.49, 0.735).all()  # 73.2 % for Llama-2-13B (doc rounds)
    assert (seven["(0.1,0.5]"] + seven[">0.5"]).between(0.0205, 0.0625).all()  # 2.1 % .. 6.2 %, rounded
    assert seven[">0.5"].between(0.0006, 0.0069).all()


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_correlations_match_independent_computation(authors, raw, method) -> None:
    names = [
        "Mistral-7B-v0.2-hf",
        "Mixtral-8x7B-v0.1",
        "llama-2-7b-80k",
        "Yi-6B-200K",
        "Mistral-7B-Instruct-v0.2",
        "Meta-Llama-3-8B-Instruct",
    ]
    m = A.correlation_matrix([authors[n] for n in names], method)
    for a in names:
        for b in names:
            x, y = _vector(raw[a]), _vector(raw[b])
            if method == "spearman":  # Spearman = Pearson of average ranks
                x, y = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
            assert m.loc[a, b] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)
    pairs = A.correlation_pairs([authors["Qwen1.5-14B"], authors["Qwen1.5-14B-Chat"]])
    x, y = _vector(raw["Qwen1.5-14B"]), _vector(raw["Qwen1.5-14B-Chat"])
    assert pairs.loc[0, "pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pairs.loc[0, "pearson_p"] < 1e-10


def test_correlations_show_the_papers_picture(authors) -> None:
    p32 = A.correlation_matrix(
        [
            authors[n]
            for n in (
                "Mistral-7B-v0.2-hf",
                "Mixtral-8x7B-v0.1",
                "llama-2-7b-80k",
                "Yi-6B-200K",
                "Mistral-7B-Instruct-v0.2",
                "Meta-Llama-3-8B-Instruct",
            )
        ]
    )
    p40 = A.correlation_matrix([authors[n] for n in ("Qwen1.5-14B", "Qwen1.5-14B-Chat", "llama-2-13b-64k")])
    assert p32.loc["Mistral-7B-v0.2-hf", "Mixtral-8x7B-v0.1"] > 0.85
    assert p40.loc["Qwen1.5-14B", "Qwen1.5-14B-Chat"] > 0.85
    assert p32.loc["Mistral-7B-v0.2-hf", "Mistral-7B-Instruct-v0.2"] > 0.9  # two groups, same heads
    for a, b in [
        ("llama-2-7b-80k", "Mistral-7B-v0.2-hf"),
        ("Yi-6B-200K", "Mixtral-8x7B-v0.1"),
        ("Mistral-7B-Instruct-v0.2", "Meta-Llama-3-8B-Instruct"),
    ]:
        assert abs(p32.loc[a, b]) < 0.1
    assert abs(p40.loc["Qwen1.5-14B", "llama-2-13b-64k"]) < 0.1
    s32 = A.correlation_matrix(
        [authors["Mistral-7B-v0.2-hf"], authors["Mixtral-8x7B-v0.1"], authors["llama-2-7b-80k"]], "spearman"
    )
    assert s32.iloc[0, 1] > 0.8 and abs(s32.iloc[0, 2]) < 0.2


def test_shape_mismatch_is_a_clear_error(authors, monkeypatch, capsys) -> None:
    with pytest.raises(A.ShapeMismatchError, match=r"32x32.*40x40|40x40.*32x32"):
        A.correlation_matrix([authors["Mistral-7B-v0.2-hf"], authors["Qwen1.5-14B"]])
    code, _, err = _cli_main(monkeypatch, capsys, "compare", "ref:Yi-6B-200K", str(REF / "Qwen1.5-14B.json"))
    assert code == 2 and err.count("\n") == 1 and "differ in shape" in err


def test_reference_maps_ship_with_provenance_and_load_as_results() -> None:
    from retrieval_heads.reference import reference_names

    assert set(SEVEN + HEADKV_NAMES) <= set(reference_names())
    for name in SEVEN + HEADKV_NAMES:
        obj = json.loads((REF / f"{name}.json").read_text())
        assert obj["repository"] in ("nightdessert/Retrieval_Head", "FYYFU/HeadKV") and len(obj["raw_sha256"]) == 64
        r = DetectionResult.load(f"ref:{name}")
        assert r.n_kept == obj["n_kept"] > 100 and not r.has_per_sample
        assert np.array_equal(r.scores, np.asarray(obj["retrieval_score"]))
    assert (
        DetectionResult.load("ref:Mistral-7B-v0.2-hf").config["reference"]["commit"]
        == "7ea1f00a85825f0b3619a233f924c698b9d03a9f"
    )
    with pytest.raises(DataError, match="no reference map"):
        DetectionResult.load("ref:no-such-model")
    with pytest.raises(DataError, match="no per-sample"):
        A.rank_stability(DetectionResult.load("ref:Yi-6B-200K"))


def test_compare_cli_writes_matrices(tmp_path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "compare",
            "ref:Mistral-7B-v0.2-hf",
            str(REF / "Mixtral-8x7B-v0.1.json"),
            "ref:llama-2-7b-80k",
            "-o",
            str(tmp_path),
            "--no-figures",
        ],
    )
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "correlation.json").read_text())
    assert saved["pearson"]["Mistral-7B-v0.2-hf"]["Mixtral-8x7B-v0.1"] > 0.85
    assert len(saved["pairs"]) == 3 and {"spearman", "pearson_p"} <= set(saved["pairs"][0])
    m = pd.read_csv(tmp_path / "correlation_spearman.csv", index_col=0)
    assert m.shape == (3, 3)


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"0-0": [0.1, 0.2], "0-1": [0.3', "not valid JSON"),  # truncated download
        ('{"0-0": [0.1], "1-1": [0.2]}', "missing"),
        ('{"0-0": [0.1], "0-1": "x"}', "not a list of numbers"),
        ('{"a-b": [0.1]}', "bad key"),
        ("[1, 2]", "non-empty JSON object"),
    ],
)
def test_malformed_score_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, text, problem) -> None:
    bad = tmp_path / "broken_scores.json"
    bad.write_text(text)
    code, _, err = _cli_main(monkeypatch, capsys, "analyze", str(bad), "-o", str(tmp_path / "out"))
    assert code == 2
    assert err.count("\n") == 1 and str(bad) in err and problem in err


# ---------------------------------------------------------------- run folders and synthetic data
def test_top_heads_niah_grid_and_rank_stability(tmp_path) -> None:
    run = _run_folder(tmp_path / "run")
    r = A.load_results([run])[0]
    top = A.top_heads(r, 3)
    assert (top.loc[0, "layer"], top.loc[0, "head"], top.loc[0, "label"]) == (2, 1, "L2-H1")
    assert top.loc[0, "activation_frequency"] == 1.0 and list(top["rank"]) == [1, 2, 3]

    grid = A.niah_grid(r)
    recs = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    for length in (100, 200):
        for depth in (0.0, 100.0):
            cell = [x["answer_recall"] for x in recs if x["length"] == length and x["depth"] == depth]
            assert grid.loc[depth, length] == pytest.approx(sum(cell) / len(cell))
    assert list(grid.columns) == [100, 200] and list(grid.index) == [0.0, 100.0]

    stab = A.rank_stability(r, k=3)
    last = stab[stab["n_samples"] == stab["n_samples"].max()]
    assert last["n_samples"].iloc[0] == r.n_kept
    assert list(last["rank"]) == list(last["final_rank"]) and (last["overlap"] == 1.0).all()
    assert (stab[stab["label"] == "L2-H1"]["rank"] == 1).all()  # the planted head leads from sample one


def test_rank_stability_follows_accumulating_samples() -> None:
    per = np.zeros((4, 1, 3))
    per[0, 0] = [1.0, 0.0, 0.0]  # head 0 leads after one sample ...
    per[1:, 0] = [0.0, 1.0, 0.5]  # ... then head 1 overtakes it
    r = DetectionResult("synthetic", per)
    stab = A.rank_stability(r, k=2).set_index(["n_samples", "label"])["rank"]
    assert stab[(1, "L0-H1")] == 2 and stab[(4, "L0-H1")] == 1
    assert stab[(1, "L0-H2")] == 2 and stab[(4, "L0-H2")] == 2  # ties share the best rank
    with pytest.raises(DataError):
        A.rank_stability(DetectionResult("empty", np.zeros((0, 2, 2))))


def test_niah_grid_needs_records() -> None:
    with pytest.raises(DataError, match="no per-sample records"):
        A.niah_grid(DetectionResult("scores-only", np.zeros((2, 2, 2))))


def test_duplicate_names_are_made_unique(tmp_path) -> None:
    a, b = _run_folder(tmp_path / "a"), _run_folder(tmp_path / "b", seed=1)
    names = [r.name for r in A.load_results([a, b])]
    assert names == ["tiny (a)", "tiny (b)"]
    assert len({r.name for r in A.load_results([a, a])}) == 2


def test_analyze_cli_writes_tables_and_figures(tmp_path) -> None:
    run = _run_folder(tmp_path / "run")
    scores = tmp_path / "my.model-v0.1.json"  # dots in the name must not eat the file suffix
    scores.write_text(json.dumps({f"{l}-{h}": [0.0, 0.4 * (l == 1)] for l in range(3) for h in range(4)}))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(run), str(scores), "-o", str(out), "--top", "4"])
    assert res.exit_code == 0, res.output
    assert "retrieval heads" in res.output and "tiny" in res.output
    table = pd.read_csv(out / "sparsity.csv")
    assert list(table["model"]) == ["tiny", "my.model-v0.1"]
    assert table.loc[1, "n_retrieval_heads"] == 4 and table.loc[1, "(0.1,0.5]"] == pytest.approx(4 / 12)
    top = json.loads((out / "top_heads.json").read_text())
    assert len(top) == 8 and {"score", "activation_frequency", "layer", "head"} <= set(top[0])
    for stem in (
        "sparsity",
        "tiny_heatmap",
        "tiny_score_vs_frequency",
        "tiny_rank_stability",
        "tiny_niah",
        "my.model-v0.1_heatmap",
    ):
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, f"{stem}.{ext}"
    assert (out / "tiny_niah.csv").exists() and not (out / "my.model-v0.1_niah.png").exists()


def test_figures_have_titles_labels_and_colorbars(tmp_path) -> None:
    import matplotlib.pyplot as plt

    from retrieval_heads.plots import detection as P

    r = A.load_results([_run_folder(tmp_path / "run")])[0]
    figs = {
        "sparsity": (P.plot_sparsity(A.sparsity_table([r])), False),
        "freq": (P.plot_score_vs_frequency(r, 5), False),
        "heatmap": (P.plot_heatmap(r), True),
        "rank": (P.plot_rank_stability(A.rank_stability(r, 3), r.name), False),
        "niah": (P.plot_niah(A.niah_grid(r), r.name), True),
        "corr": (P.plot_correlation(A.correlation_matrix([r, r])), True),
    }
    for name, (fig, colorbar) in figs.items():
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), name
        assert (len(fig.axes) == 2) == colorbar, name
        if colorbar:
            assert fig.axes[1].get_ylabel(), f"{name}: colorbar label"
        plt.close(fig)
    written = P.save_figure(P.plot_heatmap(r), tmp_path / "fig" / "x.v0.2")
    assert [p.name for p in written] == ["x.v0.2.png", "x.v0.2.svg"]


def test_report_html_is_self_contained(tmp_path) -> None:
    from retrieval_heads.report import build_report

    r = A.load_results([_run_folder(tmp_path / "run")])[0]
    html = build_report([r], top_k=4)
    assert html.startswith("<!DOCTYPE html>") and "<link" not in html
    assert 'src="http' not in html and "src='http" not in html
    assert html.count("data:image/png;base64,") >= 5  # sparsity, heatmap, Fig. 4, Fig. 13, NIAH
    assert "activation frequency %{customdata" in html and 'id="heatmap-0"' in html
    assert "plotly.js v" in html.lower() or "plotly.js" in html  # the bundle itself, inlined


# ---------------------------------------------------------------- summaries, snapshots, shipped maps
SNAPSHOTS = Path(__file__).resolve().parents[2] / "docs" / "runs"


def test_score_agreement_of_a_summary_matches_its_run(tmp_path) -> None:
    """A summary keeps each score's mean map: the agreement table is the full run's."""
    rng = np.random.default_rng(1)
    per = rng.random((6, 3, 4))
    extra = {"topk_mass": rng.random((6, 3, 4)), "needle_mass": per * 0.5 + rng.random((6, 3, 4)) * 0.1}
    run = DetectionResult("m", per, [], {"model": "m"}, None, extra)
    run.save(tmp_path)
    summary = DetectionResult.from_summary(json.loads((tmp_path / "summary.json").read_text()), {}, "s")
    assert not summary.has_per_sample and summary.score_names() == run.score_names()
    pd.testing.assert_frame_equal(A.score_agreement(summary), A.score_agreement(run))
    why = "(they need the run folder's per-sample records)"
    assert A.skipped_note(summary) == f"m: skipped rank stability and the NIAH grid {why}"
    assert A.skipped_note(run) == f"m: skipped the NIAH grid {why}"  # per-sample scores, no records
    assert A.skipped_note(A.load_results([_run_folder(tmp_path / "full")])[0]) is None


@pytest.mark.parametrize("source", [str(SNAPSHOTS / "smollm2-135m"), "ref:Meta-Llama-3-8B-Instruct"])
def test_analyze_and_report_on_snapshots_and_shipped_maps(tmp_path, monkeypatch, capsys, source) -> None:
    out = tmp_path / "a"
    code, _, err = _cli_main(monkeypatch, capsys, "analyze", source, "-o", str(out), "--top", "5")
    assert code == 0, err
    notes = err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: ") and "skipped rank stability" in notes[0]
    assert (out / "top_heads.csv").exists() and (out / "sparsity.png").exists()
    assert not list(out.glob("*rank_stability*"))
    if source.startswith("ref:"):  # one score only
        assert not (out / "score_agreement.csv").exists()
    else:  # five scores: every pair
        assert len(pd.read_csv(out / "score_agreement.csv")) == 10
    page = tmp_path / "r.html"
    code, _, err = _cli_main(monkeypatch, capsys, "report", source, "--out", str(page), "--top", "5")
    assert code == 0, err
    assert "skipped rank stability" in page.read_text()


def test_report_keeps_output_as_a_deprecated_alias(tmp_path, monkeypatch, capsys) -> None:
    page = tmp_path / "old.html"
    code, _, err = _cli_main(monkeypatch, capsys, "report", "ref:Yi-6B-200K", "--output", str(page))
    assert code == 0 and page.exists() and "--output is deprecated" in err


def test_compare_a_snapshot_with_the_map_shipped_from_it(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "c"
    snapshot = str(SNAPSHOTS / "smollm2-135m")
    code, _, err = _cli_main(
        monkeypatch, capsys, "compare", snapshot, "ref:smollm2-135m", "-o", str(out), "--no-figures"
    )
    assert code == 0, err
    pairs = json.loads((out / "correlation.json").read_text())["pairs"]
    assert len(pairs) == 1 and pairs[0]["pearson"] == pytest.approx(1.0) and pairs[0]["n_heads"] == 270
