"""The engine interface shared by every detection engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

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


def cache_io(model: Any) -> tuple[str, str]:
    """(forward kwarg, output attribute) of the KV cache: transformers >= 5.2x renamed
    `past_key_values` to `cache`; older releases only know the old name."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


class StopRule:
    """Greedy decoding stops at EOS, or at a newline once the answer has some text (ALGORITHM.md)."""

    def __init__(self, tokenizer: Any, extra_eos: tuple[int, ...] = ()) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.eos_ids = frozenset(i for i in ids | set(extra_eos) if i is not None)

    def __call__(self, generated: list[int]) -> bool:
        last = generated[-1]
        if last in self.eos_ids:
            return True
        piece = self.tokenizer.decode([last])
        if "\n" not in piece:
            return False
        before = self.tokenizer.decode(generated[:-1]) + piece.split("\n")[0]
        return bool(before.strip())


class Engine(Protocol):
    name: str

    def run(self, sample: Sample, *, max_new_tokens: int, stop: StopRule) -> EngineOutput: ...
