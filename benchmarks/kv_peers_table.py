"""The tables and the plot of a `benchmarks/kv_peers.py` run folder, from its results alone.

Per mode (question-agnostic, question-aware) and per task (and all tasks pooled, paired per
sample): every method's mean score at every ratio with its 95 % bootstrap interval (no row left
out); per ratio, our best method against the best kvpress press: the paired difference over the
samples both answered, its 95 % bootstrap interval and whether ours wins (interval above 0), loses
(below 0) or ties (spans 0); then memory and speed per method. `plot`: score vs ratio per method,
ours highlighted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CACHE_BASELINES = ("cache:full", "cache:sink_window", "cache:snapkv")
OUR_PRESSES = ("press:retrieval_heads", "press:headkv")
MODES = {"agnostic": "question-agnostic", "aware": "question-aware"}


def is_ours(method: str) -> bool:
    """Our head rankings: in our cache (`cache:<score>`, `cache:headkv*`) or inside kvpress."""
    return (method.startswith("cache:") and method not in CACHE_BASELINES) or method in OUR_PRESSES


def is_peer(method: str) -> bool:
    return method.startswith("press:") and method not in OUR_PRESSES


def sample_score(rec: dict[str, Any]) -> float:
    return float(rec["score"] if "score" in rec else rec["answer_recall"])  # older runs: answer recall only


def scores_of(result: dict[str, Any], task: str) -> dict[str, float]:
    """Per sample id: the score of each answered (not failed) sample of `task` ("pooled": all)."""
    return {
        r["sample_id"]: sample_score(r)
        for r in result.get("records", [])
        if "failed" not in r and (task == "pooled" or r.get("task", "niah") == task)
    }


def verdict(d: dict[str, float]) -> str:
    if not d["n"] or d["low"] != d["low"]:
        return "-"
    return "ours wins" if d["low"] > 0 else "ours loses" if d["high"] < 0 else "tie"


def best(results: Sequence[dict[str, Any]], task: str, pick: Any) -> tuple[str, dict[str, float]] | None:
    """The method with the highest mean score on `task` among those `pick` accepts (ties: by name)."""
    import numpy as np

    found = [(r["method"], scores_of(r, task)) for r in results if pick(r["method"])]
    found = [(m, s) for m, s in found if s]
    if not found:
        return None
    return max(found, key=lambda ms: (float(np.mean(list(ms[1].values()))), ms[0]))


def comparison(results: Sequence[dict[str, Any]], task: str) -> dict[str, Any] | None:
    """Our best method against the best kvpress press on `task` at one ratio and mode: their means
    and the paired difference (ours - peer) with its 95 % bootstrap interval and the verdict."""
    import numpy as np

    from retrieval_heads.experiments.stats import paired_difference

    ours, peer = best(results, task, is_ours), best(results, task, is_peer)
    if ours is None or peer is None:
        return None
    d = paired_difference(ours[1], peer[1])
    return {
        "ours": ours[0],
        "ours_mean": float(np.mean(list(ours[1].values()))),
        "peer": peer[0],
        "peer_mean": float(np.mean(list(peer[1].values()))),
        **d,
        "verdict": verdict(d),
    }


def cell(scores: dict[str, float]) -> str:
    from retrieval_heads.experiments.stats import bootstrap_ci

    if not scores:
        return "-"
    m, lo, hi = bootstrap_ci(list(scores.values()))
    return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def method_order(method: str) -> tuple[int, str]:
    return (0 if is_ours(method) else 1 if is_peer(method) else 2, method)


def load(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise SystemExit(f"{out}: not a kv_peers run folder (no meta.json)")
    res = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    if not res:
        raise SystemExit(f"{out}: no results yet")
    return json.loads(meta_path.read_text()), res


def score_section(rows: list[dict[str, Any]], task: str, ratios: list[float]) -> list[str]:
    full = next((r for r in rows if r["method"] == "cache:full"), None)
    methods = sorted({r["method"] for r in rows if r["method"] != "cache:full"}, key=method_order)
    by = {(r["method"], r["ratio"]): r for r in rows}
    lines = []
    if full is not None:
        lines += [f"Full cache (no compression): {cell(scores_of(full, task))}.", ""]
    lines += [
        "| method | kind | " + " | ".join(f"ratio {r:g}" for r in ratios) + " |",
        "|---|---|" + "---:|" * len(ratios),
    ]
    for m in methods:
        cells = []
        for ratio in ratios:
            r = by.get((m, ratio))
            cells.append("-" if r is None else "failed" if r.get("failed") else cell(scores_of(r, task)))
        kind = "ours" if is_ours(m) else "kvpress" if is_peer(m) else "baseline (our cache)"
        lines.append(f"| {m} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | our best | mean | best kvpress press | mean | ours - press, paired [95% CI] | n | |"]
    lines.append("|---:|---|---:|---|---:|---:|---:|---|")
    from retrieval_heads.experiments.stats import fmt_interval

    for ratio in ratios:
        c = comparison([r for r in rows if r["ratio"] == ratio and r["method"] != "cache:full"], task)
        if c is None:
            lines.append(f"| {ratio:g} | - | - | - | - | - | 0 | no comparison |")
            continue
        lines.append(
            f"| {ratio:g} | {c['ours']} | {c['ours_mean']:.2f} | {c['peer']} | {c['peer_mean']:.2f} | "
            f"{fmt_interval(c, digits=2)} | {c['n']} | {c['verdict']} |"
        )
    return lines


def cost_section(out: Path, rows: list[dict[str, Any]]) -> list[str]:
    from kv_peers_child import result_path

    lines = [
        "| method | ratio | KV MiB held | % of full bytes | achieved (own accounting) | prefill s | "
        "decode ms/token | peak RSS MiB (own process, 1 sample) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(v: Any, fmt: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(scale * v, fmt)

    for r in sorted(rows, key=lambda r: (method_order(r["method"]), r["ratio"])):
        probe = result_path(out, r["method"], r["ratio"], r["mode"], probe=True)
        peak = json.loads(probe.read_text())["peak_rss_mib"] if probe.exists() else r.get("peak_rss_mib")
        ratio = "0" if r["method"] == "cache:full" else f"{r['ratio']:g}"
        lines.append(
            f"| {r['method']} | {ratio} | {num(r.get('kv_mib'), '.1f')} | {num(r.get('kv_share'), '.1f', 100)} | "
            f"{num(r.get('compression_achieved'), '.2f')} | {num(r.get('prefill_s'), '.2f')} | "
            f"{num(r.get('decode_s_per_token'), '.1f', 1000)} | {num(peak, '.0f')} |"
        )
    return lines


def table(out: Path) -> str:
    """table.md of the run folder (written atomically) and plot.png / plot.svg beside it."""
    meta, res = load(out)
    lines = [f"Model {meta['model']}, {meta['length']} tokens.", ""]
    for mode, title in MODES.items():
        rows = [r for r in res if r["mode"] == mode]
        if not rows:
            continue
        ratios = sorted({r["ratio"] for r in rows if r["method"] != "cache:full"})
        tasks = sorted({rec.get("task", "niah") for r in rows for rec in r.get("records", [])})
        for task in [*tasks, *(["pooled"] if len(tasks) > 1 else [])]:
            n = len({s for r in rows for s in scores_of(r, task)})
            name = "all tasks pooled" if task == "pooled" else task
            lines += [f"**{title}, {name}** ({n} samples)", "", *score_section(rows, task, ratios), ""]
        lines += [f"**{title}: memory and speed**", "", *cost_section(out, rows), ""]
        failed = [r for r in rows if r.get("failed")]
        for r in sorted(failed, key=lambda r: (r["method"], r["ratio"])):
            lines.append(f"- {r['method']} at ratio {r['ratio']:g} failed: {r['failed']}")
        lines.append("")
    lines.append(
        f"Generated by `python benchmarks/kv_peers.py table --out {out}` (run started {meta['created']}, "
        f"{meta['machine']}, model {meta['model']})."
    )
    text = "\n".join(lines) + "\n"
    tmp = out / f".table.md.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "table.md")
    plot(res, out / "plot", f"{meta['model']}, {meta['length']} tokens")
    return text


def plot(res: list[dict[str, Any]], stem: Path, title: str) -> list[Path]:
    """Score (all tasks pooled) vs compression ratio, one line per method, one panel per mode;
    ours in colour and bold, kvpress's presses grey, our cache's baselines dashed."""
    import matplotlib.pyplot as plt
    import numpy as np

    from retrieval_heads.plots.common import save_figure

    modes = [m for m in MODES if any(r["mode"] == m for r in res)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.4 * len(modes), 4.4), squeeze=False)
    colours = iter(plt.get_cmap("tab10").colors)
    ours_colour: dict[str, Any] = {}
    for ax, mode in zip(axes[0], modes, strict=True):
        rows = [r for r in res if r["mode"] == mode and not r.get("failed")]
        for m in sorted({r["method"] for r in rows}, key=method_order):
            scored = [(r["ratio"], scores_of(r, "pooled")) for r in rows if r["method"] == m]
            pts = sorted((x, float(np.mean(list(v.values())))) for x, v in scored if v)
            if not pts:
                continue
            if m == "cache:full":
                ax.axhline(pts[0][1], color="black", lw=1, ls=":", label="cache:full")
            elif is_ours(m):
                colour = ours_colour.setdefault(m, next(colours))
                ax.plot(*zip(*pts, strict=True), "o-", lw=2.2, color=colour, label=m)
            elif is_peer(m):
                ax.plot(*zip(*pts, strict=True), ".-", lw=0.8, color="0.6", alpha=0.8)
                ax.annotate(
                    m.removeprefix("press:"),
                    pts[-1],
                    fontsize=5,
                    color="0.4",
                    xytext=(3, 0),
                    textcoords="offset points",
                )
            else:
                ax.plot(*zip(*pts, strict=True), "s--", lw=1, color="0.3", label=m)
        ax.plot([], [], ".-", lw=0.8, color="0.6", label="kvpress presses")
        ax.set_xlabel("compression ratio (share of the KV cache removed)")
        ax.set_ylabel("score (all tasks pooled)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        ax.set_title(f"{title}: {MODES[mode]}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)
