"""The README's headline table, generated like every other table (`retrieval_heads.docs_tables`):
one row per question, each number read from the run folder (or shipped maps) that the row names,
the same snapshots the full tables of docs/ are generated from.

    <!-- table: headlines docs/runs/smollm2-135m ref:... docs/runs/mask-smollm2-135m ... -->

Each source is recognised by its kind: the detection run gives the sparsity and top-heads rows (the
authors' `ref:` maps add their range of retrieval-head shares), a mask-eval run the causal row at
K = 10, a task-eval run the downstream row, a kv-eval run the cache row at budget 0.5, a
grounding-eval run the attribution row, and the finetune-eval runs the fine-tuning row. Rows come in
that order; a kind given no source has no row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .analysis import head_label, sparsity_table
from .docs_sources import (
    SavedRun,
    detection_result,
    experiment_kind,
    fmt_number,
    provenance,
    ranked_heads,
    read_run,
    task_summary,
)
from .errors import DataError
from .reference import is_reference
from .results import RETRIEVAL_THRESHOLD, DetectionResult
from .runs import SUMMARY_FILE

MASK_K = 10  # the causal row: the top K heads masked against K random ones
KV_BUDGET = 0.5  # the cache row: the policies at half the bytes
TOP = 4  # heads named in the top-heads row
GROUNDING_SETS = ("NIAH, natural failures", "SQuAD v2")  # the attribution row: natural failures only
SCORE_SOURCE = re.compile(r"\[score: (?P<score>[^\]]+)\]$")  # how a run records a score other than copy

Row = tuple[str, str, str]  # question, answer, link


def _sparsity_rows(run: SavedRun, result: DetectionResult, refs: list[DetectionResult]) -> list[Row]:
    ours, *theirs = sparsity_table([result, *refs], RETRIEVAL_THRESHOLD).to_dict("records")
    answer = (
        f"{ours['n_retrieval_heads']} of {ours['n_heads']} heads ({100 * ours['retrieval_share']:.1f} %) "
        f"score > {RETRIEVAL_THRESHOLD:g}"
    )
    if theirs:
        shares = [100 * r["retrieval_share"] for r in theirs]
        answer += f"; {min(shares):.1f}-{max(shares):.1f} % in the authors' {len(theirs)} published maps"
    s = run.summary
    heads = ", ".join(
        f"{head_label(l, h)} {fmt_number(result.scores[l, h], 3)}"
        for l, h in ranked_heads(s.get("top"), result.scores, TOP)
    )
    return [
        ("Are retrieval heads sparse in a small model too?", answer, "[Studying the heads](docs/analysis.md)"),
        (
            "Which heads?",
            f"{heads} (top-10 stability {fmt_number(s.get('top_10_stability'), 2)})",
            "[Detection](docs/detection.md)",
        ),
    ]


def _null_clause(null: dict[str, Any] | None, pool: str) -> str:
    """ "; N of M <pool> draws as harmful (p = ...)" for a null with draws, else nothing."""
    if not null or not null.get("n_draws"):
        return ""
    return f"; {null['n_as_harmful']} of {null['n_draws']} {pool} draws as harmful (p = {null['p_value']:.3f})"


def _mask_row(run: SavedRun) -> Row:
    s = run.summary
    c = s["curves"]
    i = c["k"].index(MASK_K)
    pool = s.get("random_pool", "")
    answer = (
        f"top {MASK_K} masked: needle retrieval {c['top_score'][0]:.1f} → {c['top_score'][i]:.1f}; "
        f"{MASK_K} random {pool} heads: {c['random_score'][i]:.1f}"
    )
    null = next((t for t in s.get("null_distribution") or [] if t["k"] == MASK_K), None)
    answer += _null_clause(null, pool)
    return "Do they matter?", answer.replace("  ", " "), "[Causal test](docs/mask_eval.md)"


def _task_row(run: SavedRun) -> Row:
    t = task_summary(run, str(run.folder))
    base, top, rand = (100 * float(r[t.metric]["mean"]) for r in (t.base, t.top, t.random or {}))
    answer = (
        f"{t.task} {t.metric.upper()} {base:.1f} → {top:.1f} with the top {t.k} masked, "
        f"{rand:.1f} with {t.k} random heads"
    )
    null = (run.summary.get("null_distribution") or {}).get(t.metric)
    answer += _null_clause(null, str(run.summary.get("random_pool", "")))
    return "Beyond needles?", answer, "[Downstream tasks](docs/task_eval.md)"


def _kv_row(run: SavedRun) -> Row:
    rows = run.summary["rows"]
    task = rows[0]["task"]

    def row(policy: str, budget: float) -> dict[str, Any]:
        return next(r for r in rows if r["task"] == task and r["policy"] == policy and r["budget"] == budget)

    ours, full, window = row("retrieval", KV_BUDGET), row("full", 1.0), row("sink_window", KV_BUDGET)
    m = SCORE_SOURCE.search(str(run.config.get("scores_source", "")))
    answer = (
        f"`{m['score'] if m else 'retrieval'}` heads whole, the rest sink + window: recall "
        f"{ours['answer_recall']:.2f} at {100 * ours['kv_share']:.1f} % of the bytes (full cache "
        f"{full['answer_recall']:.2f}, sink + window {window['answer_recall']:.2f})"
    )
    return "A KV cache at half the bytes?", answer, "[KV cache](docs/kv_cache.md)"


def _grounding_row(run: SavedRun) -> Row:
    auroc = {a["score"]: a for a in run.summary["auroc"]}
    parts = [
        f"{auroc['copy'][name]['auroc']:.2f} on {name} (log-probability {auroc['logprob'][name]['auroc']:.2f})"
        for name in GROUNDING_SETS
    ]
    return "Does head support flag hallucination?", f"AUROC {'; '.join(parts)}", "[Attribution](docs/attribution.md)"


def _finetune_row(runs: list[SavedRun]) -> Row:
    steps = sorted({int(r.config["steps"]) for r in runs})
    labels = " or ".join(str(r.summary["label"]) for r in runs)
    pearson = " and ".join(fmt_number(r.summary["comparison"]["pearson"], 2) for r in runs)
    shared = " and ".join(f"{int(r.summary['comparison']['top10_overlap'])}/10" for r in runs)
    answer = f"{'/'.join(map(str, steps))} steps of {labels} fine-tuning: Pearson {pearson}, top 10 shared {shared}"
    return "Do the heads survive fine-tuning?", answer, "[Fine-tuning](docs/training.md)"


ROWS: dict[str, Callable[[SavedRun], Row]] = {
    "mask-eval": _mask_row,
    "task-eval": _task_row,
    "kv-eval": _kv_row,
    "grounding-eval": _grounding_row,
}


def headlines_table(sources: list[str], options: dict[str, str], root: Path, where: str) -> tuple[str, str]:
    """The headline table: one row per question, from the sources in the order of the module docstring."""
    detection: tuple[SavedRun, DetectionResult] | None = None
    refs: list[tuple[str, DetectionResult]] = []
    by_kind: dict[str, list[SavedRun]] = {}
    for source in sources:
        run = None if is_reference(source) else read_run(source, root, where)
        kind = experiment_kind(run.config) if run else None
        if run is None or kind is None:
            saved, result = detection_result(source, root, where)
            if saved is None:
                refs.append((source, result))
            elif detection is None:
                detection = saved, result
            else:
                raise DataError(f"{where}: headlines takes one detection run, got {detection[0].source} and {source}")
        elif kind not in ROWS and kind != "finetune-eval":
            raise DataError(f"{where}: headlines has no row for a {kind} run ({source})")
        elif kind in by_kind and kind != "finetune-eval":
            raise DataError(f"{where}: headlines takes one {kind} run, got {by_kind[kind][0].source} and {source}")
        else:
            by_kind.setdefault(kind, []).append(run)
    if detection is None:
        raise DataError(f"{where}: headlines needs the detection run the other rows are about")
    run, result = detection
    rows = _sparsity_rows(run, result, [r for _, r in refs])
    used = [run]
    for kind, build in [*ROWS.items(), ("finetune-eval", None)]:
        runs = by_kind.get(kind, [])
        if not runs:
            continue
        try:
            rows.append(_finetune_row(runs) if build is None else build(runs[0]))
        except (KeyError, TypeError, ValueError, IndexError, StopIteration) as e:
            names = ", ".join(str(r.folder / SUMMARY_FILE) for r in runs)
            raise DataError(f"{where}: {names} lacks what the headline row reads ({e!r})") from None
        used += runs
    model = run.config.get("model") or result.name
    lines = [f"| question | answer ({model} unless said) | full table |", "|---|---|---|"]
    lines += [f"| {q} | {a} | {link} |" for q, a, link in rows]
    return "\n".join(lines), provenance(used, [name for name, _ in refs])
