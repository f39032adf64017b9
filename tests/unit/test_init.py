"""The top-level API (`retrieval_heads/__init__.py`): the names a notebook user imports, lazily."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import retrieval_heads
from retrieval_heads.needles import Needle
from retrieval_heads.testing import tiny_model

NEEDLES = (
    Needle("the secret ingredient is smoked tamarind .", "what is the secret ingredient ?", "smoked tamarind", "stew"),
)


def test_import_does_not_load_torch():
    code = "import sys, retrieval_heads; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert res.returncode == 0, res.stderr


def test_top_level_detect_is_the_function(haystack_file):
    import retrieval_heads.detection  # importing the module must not rebind the name
    from retrieval_heads import DetectConfig, DetectionResult, Grid, detect

    assert callable(detect) and retrieval_heads.detect is detect
    lm = tiny_model("llama")
    cfg = DetectConfig(
        engine="reference", max_new_tokens=4, recall_threshold=-1.0, chat=False, haystack=str(haystack_file)
    )
    result = detect(lm, Grid((80,), (50.0,), NEEDLES), cfg, show_progress=False)
    assert isinstance(result, DetectionResult)
    assert result.shape == (lm.spec.n_layers, lm.spec.n_heads) and np.isfinite(result.scores).all()


@pytest.mark.parametrize("name", ["load_model", "mask_eval", "task_eval", "kv_eval", "attribute"])
def test_public_functions(name):
    assert callable(getattr(retrieval_heads, name))


def test_every_public_name_resolves():
    from retrieval_heads import HeadSparseCache
    from retrieval_heads.kvcache import HeadSparseCache as from_kvcache

    assert HeadSparseCache is from_kvcache
    for name in retrieval_heads.__all__:  # the optional press is not in __all__: `import *` works without it
        assert getattr(retrieval_heads, name) is not None, name
    assert "RetrievalHeadsPress" not in retrieval_heads.__all__ and "RetrievalHeadsPress" in dir(retrieval_heads)
    assert set(retrieval_heads.__all__) <= set(dir(retrieval_heads))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = retrieval_heads.nope


def test_press_without_kvpress_names_the_extra():
    try:
        import kvpress  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="kvpress"):
            _ = retrieval_heads.RetrievalHeadsPress
    else:
        assert retrieval_heads.RetrievalHeadsPress.__name__ == "RetrievalHeadsPress"
