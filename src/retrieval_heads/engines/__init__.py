"""Detection engines: each runs one sample greedily and returns each head's argmax per step.

`reference` is the paper-faithful oracle (eager attention, weights read at each decode step);
faster engines must be proven equal to it by tests.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Engine, EngineOutput, StopRule
from .fast import FastEngine
from .reference import ReferenceEngine

ENGINES: dict[str, type] = {"reference": ReferenceEngine, "fast": FastEngine}


def make_engine(name: str, lm: Any) -> Engine:
    try:
        cls = ENGINES[name]
    except KeyError:
        raise ConfigError(f"unknown engine {name!r}; choose from {', '.join(sorted(ENGINES))}") from None
    return cls(lm)


__all__ = ["ENGINES", "Engine", "EngineOutput", "FastEngine", "ReferenceEngine", "StopRule", "make_engine"]
