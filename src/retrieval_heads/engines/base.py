"""The engine interface shared by every detection engine."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..decoding import StopFn
from ..needles import Sample


@dataclass
class EngineOutput:
    """Greedy generation of one sample and, per generated token, each head's attention argmax.

    argmax: int64 `[n_steps, n_layers, n_heads]`, absolute prompt/cache position of the key with
    the largest attention weight in the row of the query position that produced token t.
    Ties go to the lowest position (torch.argmax returns the first maximal index).
    """

    generated_ids: list[int]
    argmax: np.ndarray


class Engine(Protocol):
    name: str

    def run(self, sample: Sample, *, max_new_tokens: int, stop: StopFn) -> EngineOutput: ...

    def run_many(
        self, samples: Iterable[Sample], *, max_new_tokens: int, stop: StopFn
    ) -> Iterator[tuple[Sample, EngineOutput]]: ...
