"""retrieval-heads: find, study and use the retrieval heads of transformer language models.

Public API (no side effects at import; torch and transformers load lazily):

    from retrieval_heads import load_model, detect, Grid, DetectionResult
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("retrieval-heads")  # the installed distribution's (pyproject.toml)
except PackageNotFoundError:  # a source checkout on sys.path, never installed
    __version__ = "0+unknown"

_LAZY = {
    "load_model": "models",
    "ModelSpec": "models",
    "LoadedModel": "models",
    "detect": "detection",
    "Grid": "detection",
    "DetectConfig": "detection",
    "default_grid": "detection",
    "DetectionResult": "results",
    "HeadScore": "results",
    "Needle": "needles",
    "make_sample": "needles",
    "RetrievalHeadsError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval_heads' has no attribute {name!r}")


__all__ = sorted(_LAZY)
