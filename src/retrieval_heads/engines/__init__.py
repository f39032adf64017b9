"""Detection engines: each runs one sample greedily and returns each head's argmax per step.

`reference` is the paper-faithful oracle (eager attention, weights read at each decode step);
faster engines must be proven equal to it by tests.
"""

from __future__ import annotations

from typing import Any

from ..decoding import StopRule
from ..errors import ConfigError, check_choice
from .base import Engine, EngineOutput
from .fast import FastEngine
from .reference import ReferenceEngine

ENGINES: dict[str, type] = {"reference": ReferenceEngine, "fast": FastEngine}


SPANS = ("answer", "needle")


def make_engine(name: str, lm: Any, batch_size: int | None = None, span: str = "answer") -> Engine:
    """`batch_size`: samples per forward (fast engine only; None = 1 on a CPU, 8 on a GPU).
    `span`: the token span the attention scores measure (the answer's, or the whole needle's)."""
    check_choice("span", span, SPANS)
    check_choice("engine", name, sorted(ENGINES))
    cls = ENGINES[name]
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    engine: Engine  # ENGINES holds classes of differing signatures
    if name == "fast":
        engine = cls(lm, batch_size=batch_size, span=span)
        return engine
    if batch_size not in (None, 1):
        raise ConfigError(f"engine {name!r} runs one sample at a time; use --engine fast for --batch-size {batch_size}")
    engine = cls(lm, span=span)
    return engine


__all__ = ["ENGINES", "SPANS", "Engine", "EngineOutput", "FastEngine", "ReferenceEngine", "StopRule", "make_engine"]
