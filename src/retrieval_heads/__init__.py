"""retrieval-heads: find, study and use the retrieval heads of transformer language models.

Public API (no side effects at import; torch and transformers load lazily, on first use of a name):

    from retrieval_heads import load_model, detect, Grid, DetectionResult

    lm = load_model("smollm2-135m")            # device and dtype "auto"
    result = detect(lm, Grid(lengths=(1000, 2000), depths=(0.0, 50.0, 100.0)))
    result.top(10)

Study and use the heads: `mask_eval`, `task_eval` (masking experiments), `kv_eval` and
`HeadSparseCache` (head-level KV cache), `attribute` (which passage an answer copies from),
`HeadKVPolicy` (per-KV-head budgets from the scores), `RetrievalHeadsPress` and `HeadKVPress`
(kvpress presses; need the `kvpress` package).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("retrieval-heads")  # the installed distribution's (pyproject.toml)
except PackageNotFoundError:  # a source checkout on sys.path, never installed
    __version__ = "0+unknown"

# public name -> the module (under retrieval_heads) that defines it; imported on first use
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
    "mask_eval": "experiments.task_eval",
    "task_eval": "experiments.task_eval",
    "TaskEvalConfig": "experiments.task_eval",
    "kv_eval": "experiments.kv_eval",
    "KVEvalConfig": "experiments.kv_eval",
    "HeadSparseCache": "kvcache",
    "HeadKVPolicy": "kvcache",
    "attribute": "attribution",
    "RetrievalHeadsPress": "integrations.kvpress",  # optional: needs kvpress
    "HeadKVPress": "integrations.kvpress",  # optional: needs kvpress
    "RetrievalHeadsError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        # Importing a submodule sets it as an attribute of this package; bind the public name
        # after the import so that, e.g., `retrieval_heads.detect` stays the function.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'retrieval_heads' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


_OPTIONAL = {"RetrievalHeadsPress", "HeadKVPress"}  # needs an extra: left out of `import *`
__all__ = sorted(set(_LAZY) - _OPTIONAL)
