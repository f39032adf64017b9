"""One self-contained HTML report: summary tables, every figure, interactive heatmaps.

Everything is inlined — the plotly.js bundle once, the styles, and the matplotlib figures as
base64 PNG data URIs — so the file opens offline and makes no network request.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from . import analysis as A
from .results import RETRIEVAL_THRESHOLD, DetectionResult
from .scorefile import atomic_write_text

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1.5em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em} .meta{color:#666;font-size:.9em}
table.data{border-collapse:collapse;font-size:.85em;margin:.6em 0}
table.data th,table.data td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
table.data th{background:#f3f3f3} table.data td:first-child,table.data th:first-child{text-align:left}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.85em} .plot{width:100%;max-width:900px}
nav a{margin-right:1em} .note{background:#fffbe6;border:1px solid #f0e0a0;padding:.4em .8em}
"""


def _img(fig, alt: str) -> str:
    """A matplotlib figure as an inline PNG `<img>` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
    )


def _table(df: pd.DataFrame, pct: Sequence[str] = (), digits: int = 3) -> str:
    fmt: dict[str, Callable[[Any], str]] = {}
    for c in df.columns:
        if c in pct:
            fmt[c] = lambda v: "" if pd.isna(v) else f"{100 * v:.2f} %"
        elif pd.api.types.is_float_dtype(df[c]):
            fmt[c] = lambda v: "" if pd.isna(v) else f"{v:.{digits}f}"
    return df.to_html(classes="data", index=False, border=0, formatters=fmt, escape=True, na_rep="")


def _matrix_table(m: pd.DataFrame) -> str:
    return m.to_html(classes="data", border=0, float_format=lambda v: f"{v:.3f}", escape=True, na_rep="nan")


def _nulls(a: np.ndarray) -> list[Any]:
    """NaN -> None (a gap in the heatmap), as nested lists."""
    out = a.astype(object)
    out[np.isnan(a)] = None
    nested: list[Any] = out.tolist()
    return nested


def interactive_heatmap(result: DetectionResult, div_id: str) -> str:
    """A plotly layer x head heatmap `<div>`; hover shows layer, head, score, activation frequency.
    Needs plotly.js loaded earlier in the page."""
    import plotly.graph_objects as go
    import plotly.io as pio

    s, f = result.scores, result.activation_frequency  # [L, H]
    n_layers, n_heads = s.shape
    z, cd = _nulls(np.round(s, 5)), _nulls(np.round(f, 4))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            customdata=cd,
            colorscale="Viridis",
            zmin=0,
            colorbar={"title": {"text": "retrieval score"}},
            hovertemplate=(
                "layer %{y}<br>head %{x}<br>score %{z:.3f}<br>activation frequency %{customdata:.2f}<extra></extra>"
            ),
        )
    )
    fig.update_layout(
        title={"text": f"{result.name}: retrieval score per head (hover for details)"},
        xaxis={"title": {"text": "head"}, "constrain": "domain"},
        yaxis={"title": {"text": "layer"}, "autorange": "reversed"},
        height=max(360, min(900, 120 + 14 * n_layers)),
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
    )
    return pio.to_html(
        fig,
        include_plotlyjs=False,
        full_html=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True, "showSendToCloud": False},
    )


def _run_section(i: int, r: DetectionResult, top_k: int, threshold: float) -> str:
    from .plots import detection as P

    n_layers, n_heads = r.shape
    n_samples = len(r.records) if r.records else r.n_kept
    parts = [
        f'<h2 id="run-{i}">{html.escape(r.name)}</h2>',
        f'<p class="meta">{n_layers} layers x {n_heads} heads; {r.n_kept} kept of {n_samples} samples; '
        f"{A.n_retrieval_heads(r.scores, threshold)} retrieval heads (score &gt; {threshold:g})</p>",
    ]
    if r.n_kept == 0:
        parts.append('<p class="note">No kept sample: the model retrieved no needle, so there are no scores.</p>')
        return "\n".join(parts)
    note = A.skipped_note(r)
    if note:  # a summary or shipped map: say what is left out instead of failing
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append(f'<div class="plot">{interactive_heatmap(r, f"heatmap-{i}")}</div>')
    parts.append(f"<h3>Top {top_k} heads</h3>")
    parts.append(_table(A.top_heads(r, top_k).drop(columns=["model"])))
    if r.has_per_sample and r.n_kept > 1:
        parts.append(
            f'<p class="meta">ci_low / ci_high: 95 % percentile bootstrap over the {r.n_kept} kept samples; '
            f"top-10 stability (mean Jaccard of the top 10 over 1000 resamples): {r.top_k_stability(10):.2f}</p>"
        )
    if len(r.score_names()) > 1:
        parts.append("<h3>How the scores of this run agree</h3>")
        parts.append(_table(A.score_agreement(r).drop(columns=["model"])))
    parts.append(_img(P.plot_heatmap(r), f"{r.name}: layer x head retrieval scores (Fig. 5)"))
    parts.append(
        _img(P.plot_score_vs_frequency(r, top_k), f"{r.name}: retrieval score vs activation frequency (Fig. 4)")
    )
    if r.has_per_sample:  # reference maps hold aggregates only
        parts.append(
            _img(
                P.plot_rank_stability(A.rank_stability(r, min(10, top_k)), r.name),
                f"{r.name}: rank of the top heads as samples accumulate (Fig. 13)",
            )
        )
    if A.has_records(r):
        grid = A.niah_grid(r)
        parts.append("<h3>Needle retrieval (mean answer recall) over depth x length</h3>")
        parts.append(_img(P.plot_niah(grid, r.name), f"{r.name}: needle-in-a-haystack success"))
    return "\n".join(parts)


def _mask_eval_section(m: Any) -> str:
    """Causal test (paper Fig. 7 and 9): score vs K, error kinds and attention, a few examples."""
    import tempfile

    from .plots.mask import plot_mask_eval

    cv = m.curves()
    curves = pd.DataFrame(
        {
            k: cv[k]
            for k in (
                "k",
                "top_score",
                "top_exact",
                "random_score",
                "random_score_min",
                "random_score_max",
                "random_exact",
            )
        }
    )
    errors = pd.DataFrame(
        [
            {
                **{k: e[k] for k in ("condition", "n", "retrieved", "incomplete", "hallucination", "wrong_extraction")},
                **{f"failed attn {k}": v for k, v in e["attention_failed"].items()},
            }
            for e in m.errors()
        ]
    )
    examples = pd.DataFrame(
        [{k: x[k] for k in ("condition", "error_kind", "answer", "generated_text")} for x in m.examples()]
    )
    with tempfile.TemporaryDirectory() as d:
        png = plot_mask_eval(m, Path(d) / "mask_eval")[0]
        data = base64.b64encode(png.read_bytes()).decode("ascii")
    cfg = m.config
    return "\n".join(
        [
            f"<h2>Masking retrieval vs random heads: {html.escape(m.name)}</h2>",
            f"<p>method {html.escape(str(cfg.get('method')))}, phase {html.escape(str(cfg.get('phase')))}; "
            "NIAH score = ROUGE-1 recall x 100 of the answer; random heads drawn (seeded) outside the top-K set.</p>",
            _table(curves, pct=("top_exact", "random_exact"), digits=1),
            f'<figure><img alt="score vs K" src="data:image/png;base64,{data}">'
            "<figcaption>NIAH score vs K (Fig. 7)</figcaption></figure>",
            "<h3>Error kinds and where the watched retrieval heads attended (failed samples, Fig. 9)</h3>",
            _table(errors, pct=tuple(c for c in errors.columns if c.startswith("failed attn"))),
            "<h3>Examples</h3>",
            _table(examples),
        ]
    )


def build_report(
    results: Sequence[DetectionResult],
    *,
    top_k: int = 20,
    threshold: float = RETRIEVAL_THRESHOLD,
    title: str = "Retrieval heads report",
    mask_evals: Sequence[Any] = (),
) -> str:
    """The whole report as one HTML string (several MB: the plotly.js bundle is inlined)."""
    import plotly.offline

    from .plots import detection as P

    table = A.sparsity_table(results, threshold)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">retrieval-heads {__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; '
        f"{len(results)} run(s). A head is a retrieval head when its score &gt; {threshold:g} (Wu et al. 2024).</p>",
        "<nav>" + "".join(f'<a href="#run-{i}">{html.escape(r.name)}</a>' for i, r in enumerate(results)) + "</nav>",
        "<h2>Sparsity (share of heads per score bin)</h2>",
        _table(table, pct=(*A.SPARSITY_BINS, "retrieval_share")),
        _img(P.plot_sparsity(table), "Share of heads per retrieval-score bin (Fig. 3)"),
    ]
    groups: dict[tuple[int, int], list[DetectionResult]] = {}
    for r in results:
        if r.n_kept:
            groups.setdefault(r.shape, []).append(r)
    comparable = [g for g in groups.values() if len(g) >= 2]
    if comparable:
        body.append("<h2>Correlation of score maps (Fig. 6)</h2>")
        for g in comparable:
            body.append(f"<h3>{g[0].shape[0]} x {g[0].shape[1]} models</h3>")
            for method in ("pearson", "spearman"):
                m = A.correlation_matrix(g, method)
                body.append(f"<p>{method.capitalize()}</p>" + _matrix_table(m))
                body.append(_img(P.plot_correlation(m, method), f"{method.capitalize()} correlation of score maps"))
    for i, r in enumerate(results):
        body.append(_run_section(i, r, top_k, threshold))
    for m in mask_evals:
        body.append(_mask_eval_section(m))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script>{plotly.offline.get_plotlyjs()}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(results: Sequence[DetectionResult], path: str | Path, **kwargs) -> Path:
    """Build the report and write it atomically to `path`."""
    p = Path(path)
    atomic_write_text(p, build_report(results, **kwargs))
    log.info("report written to %s", p)
    return p
