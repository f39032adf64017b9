"""`retrieval-heads analyze | compare | report`: the paper's head properties from run folders, their
snapshots (summary.json), shipped maps (`ref:<name>`) or authors'-format score files. What a source
does not hold (per-sample records) is skipped with a one-line note on stderr."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..results import RETRIEVAL_THRESHOLD
from .options import SCORE_NAMES, Threshold, choices

Figures = Annotated[bool, typer.Option("--figures/--no-figures", help="write PNG and SVG figures")]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_frame(df, stem: Path) -> list[Path]:
    from ..scorefile import atomic_write_text

    csv, js = stem.parent / f"{stem.name}.csv", stem.parent / f"{stem.name}.json"
    atomic_write_text(csv, df.to_csv(index=False))
    atomic_write_text(js, df.to_json(orient="records", indent=1))
    return [csv, js]


def _notes(results) -> None:
    """After the files are written: one line on stderr per result that holds less than a run folder
    (a summary, a shipped map, a score file)."""
    from .. import analysis as A

    for r in results:
        note = A.skipped_note(r)
        if note:
            typer.echo(f"note: {note}", err=True)


def analyze(
    runs: Annotated[list[Path], typer.Argument(help="run folders or authors'-format score files (JSON)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for tables (CSV, JSON) and figures")] = Path(
        "analysis"
    ),
    threshold: Threshold = RETRIEVAL_THRESHOLD,
    top: Annotated[int, typer.Option(min=1, help="top heads listed and plotted per run")] = 20,
    figures: Figures = True,
) -> None:
    """Sparsity, retrieval-head counts and top heads (paper Figs. 3, 4, 5, 13)."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from .. import analysis as A
    from ..scorefile import atomic_write_text

    results = A.load_results(runs)
    table = A.sparsity_table(results, threshold)
    console = Console()
    t = Table(title=f"Share of heads per retrieval-score bin; retrieval heads: score > {threshold:g}")
    for col in ("model", "layers x heads", "kept/samples", "= 0", "(0, 0.1]", "(0.1, 0.5]", "> 0.5", "retrieval heads"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for _, r in table.iterrows():
        t.add_row(
            str(r["model"]),
            f"{r['layers']} x {r['heads']}",
            f"{r['n_kept']}/{r['n_samples']}",
            *(f"{100 * r[b]:.2f} %" for b in A.SPARSITY_BINS),
            f"{r['n_retrieval_heads']} ({100 * r['retrieval_share']:.1f} %)",
        )
    console.print(t)
    written = _write_frame(table, out / "sparsity")
    tops = []
    for r in results:
        top_df = A.top_heads(r, top)
        tops.append(top_df)
        k = min(10, top)
        tt = Table(title=f"Top {k} heads of {r.name}")
        for col in ("rank", "layer", "head", "retrieval score", "activation freq."):
            tt.add_column(col, justify="right")
        for _, h in top_df.head(k).iterrows():
            tt.add_row(
                str(h["rank"]),
                str(h["layer"]),
                str(h["head"]),
                f"{h['score']:.3f}",
                "n/a" if pd.isna(h["activation_frequency"]) else f"{h['activation_frequency']:.2f}",
            )
        console.print(tt)
    written += _write_frame(pd.concat(tops, ignore_index=True), out / "top_heads")
    agree = [A.score_agreement(r) for r in results if len(r.score_names()) > 1]
    if agree:  # runs with several scores: how they agree (Spearman, top-10 overlap)
        written += _write_frame(pd.concat(agree, ignore_index=True), out / "score_agreement")
    if figures:
        from ..plots import detection as P

        written += P.save_figure(P.plot_sparsity(table), out / "sparsity")
        for r in results:
            if r.n_kept == 0:
                continue
            stem = _slug(r.name)
            written += P.save_figure(P.plot_heatmap(r), out / f"{stem}_heatmap")
            written += P.save_figure(P.plot_score_vs_frequency(r, top), out / f"{stem}_score_vs_frequency")
            if r.has_per_sample:  # reference maps hold aggregates only
                stab = A.rank_stability(r, min(10, top))
                written += _write_frame(stab, out / f"{stem}_rank_stability")
                written += P.save_figure(P.plot_rank_stability(stab, r.name), out / f"{stem}_rank_stability")
            if A.has_records(r):
                grid = A.niah_grid(r)
                atomic_write_text(out / f"{stem}_niah.csv", grid.to_csv())
                written += [out / f"{stem}_niah.csv"]
                written += P.save_figure(P.plot_niah(grid, r.name), out / f"{stem}_niah")
    typer.echo(f"wrote {len(written)} files to {out}")
    _notes(results)


def compare(
    runs: Annotated[list[Path], typer.Argument(help="two or more run folders or score files of one shape")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the matrices and figures")] = Path("analysis"),
    figures: Figures = True,
    score: Annotated[
        list[str] | None,
        typer.Option(
            "--score",
            metavar=choices(SCORE_NAMES),
            help="score(s) whose top heads and maps are compared; repeat for several [default: copy]",
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option("--k", help="top heads per run whose overlap and Jaccard index are reported [default: 10]"),
    ] = None,
    by_length: Annotated[
        bool,
        typer.Option(
            "--by-length",
            help="compare the first run cut to its lengths <= L, for each of its lengths L, with the last run "
            "(how short may the grid be?)",
        ),
    ] = False,
) -> None:
    """Spearman and Pearson correlation of the score maps (paper Fig. 6); for each pair of runs the
    overlap and Jaccard index of their top-K heads and the Pearson r of one score, with 95 % bootstrap
    intervals (do a short and a long context grid find the same heads?)."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from .. import agreement as G
    from .. import analysis as A
    from ..errors import DataError
    from ..scorefile import atomic_write_text

    if len(runs) < 2:
        raise DataError("compare needs at least two run folders or score files")
    results = A.load_results(runs)
    A.check_same_shape(results)
    if k is None:  # 10, or every head of a model with fewer
        k = min(10, results[0].shape[0] * results[0].shape[1])
    scores = list(dict.fromkeys(score or ["copy"]))
    agree = G.agreement_table(results, scores, k)  # checks --score and --k before anything is written
    cuts = G.length_prefixes(results[0])[:-1] if by_length else []  # the first run's shorter grids
    if cuts:
        extra = [G.run_agreement(c, results[-1], name, k) for name in scores for c in cuts]
        agree = pd.concat([agree, *extra], ignore_index=True)
    console = Console()
    written = []
    saved = {}
    for method in ("pearson", "spearman"):
        m = A.correlation_matrix(results, method)
        saved[method] = {
            str(k): {str(c): (None if v != v else float(v)) for c, v in row.items()}
            for k, row in m.to_dict(orient="index").items()
        }
        t = Table(
            title=f"{method.capitalize()} correlation of retrieval-score maps "
            f"({results[0].shape[0]} x {results[0].shape[1]})"
        )
        t.add_column("")
        for c in m.columns:
            t.add_column(str(c), justify="right")
        for name, row in m.iterrows():
            t.add_row(str(name), *("nan" if v != v else f"{v:.3f}" for v in row))
        console.print(t)
        atomic_write_text(out / f"correlation_{method}.csv", m.to_csv())
        written.append(out / f"correlation_{method}.csv")
        if figures:
            from ..plots import detection as P

            written += P.save_figure(P.plot_correlation(m, method), out / f"correlation_{method}")
    pairs = A.correlation_pairs(results)
    saved["pairs"] = json.loads(pairs.to_json(orient="records"))
    atomic_write_text(out / "correlation.json", json.dumps(saved, indent=1))
    written.append(out / "correlation.json")
    for name in scores:
        _print_agreement(console, agree[agree["score"] == name], name, k)
    written += _write_frame(agree, out / "agreement")
    # what each grid cost beside what it found: "is the short grid enough?" is a trade-off
    costs = [{**G.run_cost(c), "cut": True} for c in cuts] + [{**G.run_cost(r), "cut": False} for r in results]
    atomic_write_text(out / "agreement_runs.json", json.dumps(costs, indent=1))
    written.append(out / "agreement_runs.json")
    typer.echo(f"wrote {len(written)} files to {out}")
    note = G.interval_note(results)
    if note:
        typer.echo(f"note: {note}", err=True)


def _print_agreement(console, agree, score: str, k: int) -> None:
    from rich.table import Table

    def show(v: float, m: str) -> str:
        return "n/a" if v != v else (f"{v:g}" if m == "overlap" else f"{v:.3f}")

    t = Table(title=f"Do the runs find the same heads? Top-{k} heads and maps of the {score} score")
    for col in ("run A", "run B", "measure", "value", "95 % interval"):
        t.add_column(col, justify="left" if col.startswith("run") else "right")
    labels = {"overlap": f"top-{k} overlap", "jaccard": f"top-{k} Jaccard", "pearson": "Pearson r"}
    for _, r in agree.iterrows():
        m = r["metric"]
        value = f"{int(r['value'])}/{k}" if m == "overlap" else show(r["value"], m)
        span = "n/a" if r["ci_low"] != r["ci_low"] else f"[{show(r['ci_low'], m)}, {show(r['ci_high'], m)}]"
        t.add_row(str(r["a"]), str(r["b"]), labels[m], value, span)
    console.print(t)


def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders or authors'-format score files")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the HTML file to write")] = Path("report.html"),
    top: Annotated[int, typer.Option(min=1, help="top heads listed per run")] = 20,
    threshold: Threshold = RETRIEVAL_THRESHOLD,
    title: Annotated[str, typer.Option(help="page title")] = "Retrieval heads report",
    mask_eval: Annotated[
        list[Path] | None, typer.Option("--mask-eval", help="mask-eval run folder(s) to include (Fig. 7, Fig. 9)")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", hidden=True, help="old name of --out")] = None,
) -> None:
    """One self-contained HTML report (opens offline): tables, figures, interactive heatmaps."""
    from .. import analysis as A
    from ..experiments.mask_results import MaskEvalResult
    from ..report import write_report

    results = A.load_results(runs)
    masks = [MaskEvalResult.load(m) for m in mask_eval or []]
    if output is not None:  # the name before every command took --out
        typer.echo("note: --output is deprecated; use --out", err=True)
        out = output
    p = write_report(results, out, top_k=top, threshold=threshold, title=title, mask_evals=masks)
    typer.echo(f"report: {p} ({p.stat().st_size / 1e6:.1f} MB, self-contained)")
    _notes(results)
