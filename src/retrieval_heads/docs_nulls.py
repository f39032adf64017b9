"""The `null` and `nulls` tables of the docs. `null`: one mask-eval or task-eval run's null table.
`nulls`: which masking effects lie beyond the null of random draws? One
row per (run, K, metric) over several mask-eval and task-eval runs, each read from the run's
summary (`null_distribution`, as in its own `null` table), so the claims of the paper can be read
across models and tasks at once:

    <!-- table: nulls docs/runs/null-qa-smollm2 docs/runs/null-qa-gemma3 -->

Columns: model, task (prompt style), samples, how heads were masked (method, phase), the random
pool, K, metric, the unmasked metric, the top-K effect, the draws' effects (mean [min, max]), the
number of draws, how many were at least as harmful, the p-value and the verdict. The verdict is
"yes" when p <= 0.05: with N draws that needs the top-K effect more harmful than all but
0.05 (N + 1) - 1 draws (with 20 draws, more harmful than every one: beyond the null's 95th
percentile); "no" otherwise; "-" without a p-value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .docs_sources import SavedRun, experiment_kind, provenance, read_run
from .errors import DataError
from .experiments.conditions import random_pool_line
from .experiments.null import UNITS, null_cells, null_lines, null_rows
from .runs import SUMMARY_FILE

ALPHA = 0.05  # the verdict's level (a p-value of 1 / (1 + 20) = 0.048 passes)


def _samples(run: SavedRun, kind: str) -> int:
    """The samples each condition answered: the run's documents (task-eval) or records per condition."""
    if kind == "task-eval" and run.config.get("doc_ids"):
        return len(run.config["doc_ids"])
    return int(run.summary["n_records"]) // max(1, len(run.config["conditions"]))


def _task(run: SavedRun, kind: str) -> str:
    if kind == "mask-eval":
        return "needle retrieval (NIAH)"
    return f"{run.config['task']['name']} ({run.config.get('style', 'answer-only')})"


def _base(run: SavedRun, kind: str, metric: str) -> float:
    """The unmasked metric in the null's unit (NaN for a sweep without K = 0)."""
    s = run.summary
    if kind == "mask-eval":
        c = s["curves"]
        return float(c["top_score"][c["k"].index(0)]) if 0 in c["k"] else float("nan")
    base = next((r for r in s["rows"] if r["kind"] == "base"), None)
    return float("nan") if base is None else 100 * float(base[metric]["mean"])


def _rows(run: SavedRun, kind: str) -> list[str]:
    unit, scale, _ = UNITS[kind]
    null = run.summary.get("null_distribution") or []
    c = run.config
    mask = f"{c.get('method', 'uniform')}, {c.get('phase', 'all')}"
    pool = c.get("random_pool", "outside-top")
    out = []
    for label, t in null_rows(null):
        if not t["n_draws"]:
            continue
        k, _, metric = label.partition(", ")
        base = _base(run, kind, metric)
        cell = null_cells(t, scale)
        p = t["p_value"]
        # a sweep without K = 0 compares the masked metrics themselves (null.EFFECTS)
        as_metric = " (metric, no K = 0)" if t.get("effect") == "metric" else ""
        verdict = "-" if np.isnan(p) else "yes" if p <= ALPHA else "no"
        cells = [
            str(c.get("model", "?")),
            _task(run, kind),
            str(_samples(run, kind)),
            mask,
            pool,
            k,
            metric or unit,
            "-" if np.isnan(base) else f"{base:.1f}",
            cell["top"] + as_metric,
            cell["spread"],
            str(t["n_draws"]),
            str(t["n_as_harmful"]),
            cell["p"],
            verdict,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _masking_run(source: str, root: Path, where: str) -> tuple[SavedRun, str]:
    """The run `source` and its kind, which must be one with a null (mask-eval or task-eval)."""
    run = read_run(source, root, where)
    kind = experiment_kind(run.config) or "detection"
    if kind not in UNITS:
        raise DataError(f"{where}: {source} is a {kind} run, not a {' or '.join(UNITS)} run")
    return run, kind


def null_distribution_table(sources: list[str], options: dict[str, str], root: Path, where: str) -> tuple[str, str]:
    """The `null` table: one run's null table (as under its table.md), under the line that names
    the pool its random heads came from."""
    run, kind = _masking_run(sources[0], root, where)
    try:
        lines = null_lines(kind, run.summary.get("null_distribution") or [])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: {run.folder / SUMMARY_FILE}: malformed null_distribution ({e})") from None
    if not lines:
        raise DataError(
            f"{where}: {sources[0]} has no null distribution with a random draw (a run without random draws, "
            "or one saved before the null existed)"
        )
    return "\n".join([random_pool_line(run.config), "", *lines]), provenance([run], [])


def nulls_table(sources: list[str], options: dict[str, str], root: Path, where: str) -> tuple[str, str]:
    """The rows of every source's null distribution under one header (see the module docstring)."""
    runs, lines = [], []
    for source in sources:
        run, kind = _masking_run(source, root, where)
        try:
            rows = _rows(run, kind)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise DataError(
                f"{where}: {run.folder / SUMMARY_FILE}: malformed summary for the nulls table ({e!r})"
            ) from None
        if not rows:
            raise DataError(f"{where}: {source} has no null distribution with a random draw")
        runs.append(run)
        lines += rows
    head = [
        "effects in points of the metric (NIAH: its score, 0-100): masked minus no mask, negative = harmful; "
        f"beyond the null = p-value <= {ALPHA} (p = (1 + draws at least as harmful) / (1 + draws))",
        "",
        "| model | task | samples | masking | random pool | K | metric | no mask | top-K effect | "
        "draws' effects: mean [min, max] | draws | as harmful | p-value | beyond the null |",
        "|---|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    return "\n".join(head + lines), provenance(runs, [])
