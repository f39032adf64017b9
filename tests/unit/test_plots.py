"""Figures (`plots/`): deterministic bytes, the user's umask, atomic writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest


def _figure():
    from retrieval_heads.plots.detection import plot_heatmap
    from retrieval_heads.results import DetectionResult

    return plot_heatmap(DetectionResult("m$x$", np.random.default_rng(0).random((3, 2, 4))))


def test_svg_and_png_are_the_same_bytes_each_time(tmp_path):
    from retrieval_heads.plots.common import save_figure

    a = save_figure(_figure(), tmp_path / "a")
    b = save_figure(_figure(), tmp_path / "b")
    for p, q in zip(a, b, strict=True):
        assert p.read_bytes() == q.read_bytes(), p.name
    old = os.umask(0o022)
    try:
        c = save_figure(_figure(), tmp_path / "c")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in c} == {0o644}


def test_figures_are_written_atomically(tmp_path):
    from retrieval_heads.plots.common import save_figure

    good = save_figure(_figure(), tmp_path / "fig")
    before = {p.name: p.read_bytes() for p in good}
    fig = _figure()

    def broken(target, *a, **k):
        if hasattr(target, "write"):
            target.write(b"half a figure")
        else:
            Path(target).write_bytes(b"half a figure")
        raise RuntimeError("disk full")

    fig.savefig = broken
    with pytest.raises(RuntimeError):
        save_figure(fig, tmp_path / "fig")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old figures, no temp files


@pytest.mark.parametrize(
    "summary",
    [
        {"kind": "finetune-eval"},
        {"kind": "finetune-eval", "comparison": [], "scores_before": 3, "scores_after": []},
        {"kind": "finetune-eval", "comparison": {}, "scores_before": [["x"]], "scores_after": [[1]]},
    ],
)
def test_finetune_plot_of_a_malformed_summary_is_one_line(tmp_path, cli, summary):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary))
    code, _out, err = cli("finetune-plot", run, "--out", tmp_path / "fig")
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0 and "malformed" in err, err
    assert not list(tmp_path.glob("fig*"))
