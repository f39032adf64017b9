"""What every figure module shares: the Agg backend (figures are only ever written to files, no
display needed) and `save_figure`, which writes one figure as PNG and SVG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def save_figure(fig: Figure, stem: str | Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 120) -> list[Path]:
    """Write `stem.<fmt>` for each format and close the figure; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        p = stem.parent / f"{stem.name}.{fmt}"  # not with_suffix: names hold dots (v0.2)
        # no date in the SVG: the same figure gives the same bytes
        fig.savefig(p, dpi=dpi, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None)
        out.append(p)
    plt.close(fig)
    return out
