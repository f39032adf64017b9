"""What every figure module shares: the Agg backend (figures are only ever written to files, no
display needed), `save_figure`, which writes one figure as PNG and SVG, atomically and with the
same bytes for the same figure, and `plain`, which keeps names out of matplotlib's math mode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..scorefile import atomic_write

# SVG element ids are random unless salted: a fixed salt makes the same figure the same bytes.
matplotlib.rcParams["svg.hashsalt"] = "retrieval-heads"


def plain(text: Any) -> str:
    """`text` shown as written: a name holding `$...$` (a file name, a model) is not mathtext."""
    return str(text).replace("$", r"\$")


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 120) -> list[Path]:
    """Write `stem.<fmt>` for each format (each via a temp file and a rename: a reader never sees
    half a figure) and close the figure; returns the paths."""
    stem = Path(stem)
    out = []
    try:
        for fmt in formats:
            p = stem.parent / f"{stem.name}.{fmt}"  # not with_suffix: names hold dots (v0.2)
            # no date in the SVG: the same figure gives the same bytes
            meta = {"Date": None} if fmt == "svg" else None

            def write(f: Any, fmt: str = fmt, meta: Any = meta) -> None:
                fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight", metadata=meta)

            out.append(atomic_write(p, write))
    finally:
        plt.close(fig)
    return out
