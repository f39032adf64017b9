"""The `agreement` table of the docs: do two detection grids of one model find the same heads, and
what did each grid cost? Read from the folder `retrieval-heads compare --out DIR` writes
(`agreement.json`, `agreement_runs.json`), or its committed copy under docs/runs/.

    <!-- table: agreement docs/runs/window-smollm2 -->

One row per grid compared with the reference grid (the last run of the comparison; with
`compare --by-length`, also the first run cut to each of its lengths), one column per score: top-K
overlap and Pearson r of the maps, each with its 95 % bootstrap interval; the detection seconds
summed over each grid's samples, and their ratio to the reference grid's. Under it, one line per
grid with its lengths, depths, needles, samples and prompt tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .docs_sources import COMMAND, fmt_number, when, where_ran
from .errors import DataError
from .scorefile import read_json
from .userfiles import MAX_SUMMARY

AGREEMENT_FILE = "agreement.json"
RUNS_FILE = "agreement_runs.json"
LABELS = {"copy": "copy (retrieval score)"}


def _read(folder: Path, name: str, where: str) -> Any:
    path = folder / name
    if not path.is_file():
        raise DataError(f"{where}: {path} not found (write it with `retrieval-heads compare A B --out {folder}`)")
    try:
        return read_json(path, MAX_SUMMARY)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


def _interval(row: dict[str, Any], digits: int) -> str:
    lo, hi = fmt_number(row.get("ci_low"), digits), fmt_number(row.get("ci_high"), digits)
    return "" if "n/a" in (lo, hi) else f" [{lo}, {hi}]"


def _grid(run: dict[str, Any]) -> str:
    depths, needles = run.get("depths") or [], run.get("n_needles") or "?"
    parts = [f"{_span(run)} tokens: {run.get('name')}", f"{len(depths)} depths", f"{needles} needles"]
    if run.get("n_samples") is not None:
        parts.append(f"{run['n_samples']} samples ({run.get('n_kept')} kept)")
    if run.get("prompt_tokens") is not None:
        parts.append(f"{run['prompt_tokens']:,} prompt tokens")
    if run.get("seconds") is not None:
        parts.append(f"{run['seconds'] / 60:.1f} min")
    return ", ".join(parts)


def _cell(m: dict[str, dict[str, Any]], k: int) -> str:
    ov, pr = m.get("overlap", {}), m.get("pearson", {})
    return (
        f"{fmt_number(ov.get('value'), 0)}/{k}{_interval(ov, 0)}; r {fmt_number(pr.get('value'), 3)}{_interval(pr, 3)}"
    )


def _span(run: dict[str, Any]) -> str:
    lengths = run.get("lengths") or []
    return f"{min(lengths):,}-{max(lengths):,}" if len(lengths) > 1 else f"{lengths[0]:,}" if lengths else "?"


def agreement_rows(sources: list[str], options: dict[str, str], root: Path, where: str) -> tuple[str, str]:
    """The table and its provenance line, from one compare folder: every run (or shorter grid of a
    run, `compare --by-length`) against the last run, one column per score."""
    folder = root / sources[0]
    rows = _read(folder, AGREEMENT_FILE, where)
    runs = _read(folder, RUNS_FILE, where)
    if not isinstance(rows, list) or not rows or not isinstance(runs, list) or len(runs) < 2:
        raise DataError(f"{where}: {folder} must hold a comparison of two or more runs")
    ref = runs[-1]
    try:
        k = int(rows[0]["k"])
        cells: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}  # run A -> score -> metric -> row
        for r in rows:
            if r["b"] == ref["name"]:
                cells.setdefault(str(r["a"]), {}).setdefault(str(r["score"]), {})[str(r["metric"])] = r
        scores = list(dict.fromkeys(str(r["score"]) for r in rows))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: {folder / AGREEMENT_FILE} is not a compare table ({e})") from None
    heads = " | ".join(f"{LABELS.get(s, s)}: top-{k} overlap; Pearson r" for s in scores)
    lines = [
        f"| detection grid (lengths, tokens) | samples (kept) | prompt tokens vs reference | detection time vs "
        f"reference | {heads} |",
        "|---|---:|---:|---:|" + "---|" * len(scores),
    ]
    for run in [*(r for r in runs[:-1] if r.get("name") in cells), ref]:
        mine = cells.get(str(run.get("name")), {})
        cost = {
            key: f"{run[key] / ref[key]:.2f}" if run.get(key) is not None and ref.get(key) else "n/a"
            for key in ("prompt_tokens", "seconds")
        }
        label = f"{_span(run)}{' (reference)' if run is ref else ''}"
        row = " | ".join(_cell(mine[s], k) if s in mine else "-" for s in scores)
        lines.append(
            f"| {label} | {run.get('n_samples')} ({run.get('n_kept')}) | {cost['prompt_tokens']} | {cost['seconds']} "
            f"| {row} |"
        )
    lines += ["", *(f"- {_grid(r)}" for r in runs if r.get("name") in cells or r is ref)]
    full = [r for r in runs if not r.get("cut")]  # a shorter grid of a run ran when its run did
    parts = "; ".join(f"{r.get('name')} ({when(r)}, {where_ran(r)})" for r in full)
    return "\n".join(lines), f"Generated by `{COMMAND}` from {sources[0]}: `retrieval-heads compare` of {parts}."
