"""Prefix reuse across a grid: compute the KV cache of a shared prompt prefix once.

Samples built on one haystack share the text before the needle; their prompts then share a run of
identical token ids. Reuse is exact by construction: a sample reuses the cached keys/values of
`prompt_ids[:r]` only when its own first `r` token ids are identical to the cached ones (longest
common token prefix, never text), and always prefills at least its last prompt token itself.

The store holds prefix caches with full keys for every layer (sliding-window layers too, so a
sample can crop it at any length); a sample gets a fresh cache of the model's own layout filled
with the first `r` positions, exactly what prefilling those tokens would have stored. When a
sample needs a longer prefix than the store holds, the store is extended from the longest common
part, so over a grid each haystack token is prefilled about once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from ..compat import cache_kwargs

logger = logging.getLogger(__name__)


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token id sequences."""
    a, b = np.asarray(a), np.asarray(b)
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


def reuse_targets(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Per prompt, the longest prefix it shares with any other prompt, capped at len - 1.

    Uses the lexicographic order: the best partner of a prompt is one of its sorted neighbours.
    """
    n = len(prompts)
    order = sorted(range(n), key=lambda i: tuple(prompts[i]))
    best = [0] * n
    for a, b in pairwise(order):
        lcp = common_prefix(prompts[a], prompts[b])
        best[a], best[b] = max(best[a], lcp), max(best[b], lcp)
    return [min(best[i], len(prompts[i]) - 1) for i in range(n)]


@dataclass(eq=False)
class _Slot:
    ids: np.ndarray  # token ids of the cached prefix
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) `[1, kv_head, pos, dim]`
    used: int = 0


class PrefixStore:
    """A few cached prefixes (token ids + full-layer KV); hands out sample caches cropped from them.

    Grids have a few prefix families (the haystack-first prompts; the depth-0 prompts of each
    needle, which start with the needle), hence `max_slots` prefixes, least recently used evicted.
    Each slot holds full-layer keys and values up to a prompt's length, so the slots bound the
    store's memory: in grid order (needle by needle) two slots, the haystack family and the
    current needle's, reuse as much as four while holding fewer keys; an interleaved order
    (`detect --until-stable`) visits the needles in turn and gains from four.
    """

    def __init__(
        self,
        model: Any,
        new_cache: Callable[[bool], Any],
        prompts: Sequence[Sequence[int]],
        *,
        min_reuse: int = 64,
        max_slots: int = 2,
    ) -> None:
        """`new_cache(full)`: an empty cache of the model's own layout (`full`: every layer keeps
        all keys), as the engine that decodes the samples makes them."""
        self.model = model
        self.new_cache = new_cache
        self.prompts = [np.asarray(p, dtype=np.int64) for p in prompts]
        self.targets = reuse_targets(prompts)
        self.min_reuse = min_reuse
        self.max_slots = max_slots
        self.slots: list[_Slot] = []
        self.prefilled = 0  # tokens prefilled into the store, for logging and benchmarks
        self._clock = 0

    def clear(self) -> None:
        self.slots = []

    @torch.no_grad()
    def _prefill(self, prompt: np.ndarray, base: _Slot | None, keep: int, length: int) -> _Slot:
        """A slot holding prompt[:length], reusing the first `keep` positions of `base`."""
        from transformers import DynamicCache

        cache = DynamicCache()  # no config: every layer keeps full keys, sliding layers included
        if base is not None:
            for i, (k, v) in enumerate(base.layers):
                cache.update(k[:, :, :keep], v[:, :, :keep], i)
        ids = torch.tensor(prompt[keep:length][None], device=next(self.model.parameters()).device)
        self.model(input_ids=ids, **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1)  # grows in place
        self.prefilled += length - keep
        logger.debug("prefix store: %d tokens (%d new)", length, length - keep)
        return _Slot(prompt[:length].copy(), [(layer.keys, layer.values) for layer in cache.layers])

    def cache_for(self, index: int, full: bool = False) -> tuple[Any, int]:
        """(cache holding prompt[:start], start) for sample `index`; (None, 0) when not worth it.
        `full`: a cache keeping every layer's keys (for merging into a batch), else the model's own.

        Policy: a prompt that shares fewer than `min_reuse` tokens with every slot starts a new slot
        (a new prefix family). Otherwise the closest slot is used: when the sample needs a longer
        prefix than the slot holds, the slot is replaced by the longer one (prefilling only the
        difference); when the sample diverges inside the slot, it starts from the common part.
        """
        prompt, target = self.prompts[index], self.targets[index]
        if target < self.min_reuse:
            return None, 0
        have, best = max(((common_prefix(s.ids, prompt), i) for i, s in enumerate(self.slots)), default=(0, -1))
        if have < self.min_reuse:
            if len(self.slots) >= self.max_slots:
                del self.slots[min(range(len(self.slots)), key=lambda i: self.slots[i].used)]
            slot = self._prefill(prompt, None, 0, target)
            self.slots.append(slot)
        elif have < target and target >= len(self.slots[best].ids):
            slot = self.slots[best] = self._prefill(prompt, self.slots[best], have, target)
        else:
            slot, target = self.slots[best], min(have, target)
        self._clock += 1
        slot.used = self._clock
        cache = self.new_cache(full)
        for i, (k, v) in enumerate(slot.layers):
            cache.update(k[:, :, :target], v[:, :, :target], i)
        return cache, target
