"""Differences between the supported transformers releases, in one place (issue 16).

We support transformers from `OLDEST` (the newest release kvpress 0.5.5 accepts is 5.2.x) to the
current one. The rest of the package is written against the current API; this module bridges
what older releases name or call differently:

- the KV cache forward argument and output attribute: `cache` today, `past_key_values` before
  (`cache_io`, `cache_kwargs`);
- the cache-layer interface a custom `CacheLayerMixin` implements: today
  `get_mask_sizes(query_length)` and `get_max_length()`, before `get_mask_sizes(cache_position)`
  and `get_max_cache_shape()` (`cache_layer`).

Everything else we use (`AttentionInterface`, `AttentionMaskInterface`, `DynamicCache(config=)`
with `.layers`, `set_attn_implementation`, GGUF loading) is the same on both ends; CI runs the
unit tests on `OLDEST` (see `.ci/run`). transformers is imported lazily, like everywhere else.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, TypeVar

OLDEST = "5.2.0"  # the lower bound in pyproject.toml; CI's second venv pins it

_T = TypeVar("_T", bound=type)
_CACHE_IO: dict[type, tuple[str, str]] = {}


def cache_io(model: Any) -> tuple[str, str]:
    """(forward keyword, output attribute) of the KV cache for `model`: ("cache", "cache") on
    releases that renamed `past_key_values` to `cache`, else ("past_key_values", "past_key_values").
    Read from the forward signature once per model class (decode loops call this every step); a
    peft model's forward takes `**kwargs` and hands them to the model it wraps, so that model's
    signature decides."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    cls = type(base)
    if cls not in _CACHE_IO:
        params = inspect.signature(base.forward).parameters
        _CACHE_IO[cls] = ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")
    return _CACHE_IO[cls]


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """`cache` as the forward keyword `model` takes: `model(ids, **cache_kwargs(model, cache))`.
    An older release would silently drop an unknown `cache=` into its `**kwargs`."""
    return {cache_io(model)[0]: cache}


def output_cache(model: Any, out: Any) -> Any:
    """The KV cache a forward of `model` returned in `out`."""
    return getattr(out, cache_io(model)[1])


def cache_layer(cls: _T) -> _T:
    """Class decorator for a `transformers.cache_utils.CacheLayerMixin` written against the current
    layer interface; on releases that call the older one it adds `get_mask_sizes(cache_position)`
    (the query length is the length of `cache_position`) and `get_max_cache_shape()`, delegating
    to the class's own `get_mask_sizes(query_length)` and `get_max_length()`."""
    from transformers.cache_utils import CacheLayerMixin

    if "get_max_cache_shape" not in getattr(CacheLayerMixin, "__abstractmethods__", ()):
        return cls  # the current interface
    layer: Any = cls  # mypy: a class we add methods to
    sizes = layer.get_mask_sizes

    def get_mask_sizes(self: Any, cache_position: Any, *args: Any, **kwargs: Any) -> tuple[int, int]:
        query_length = cache_position if isinstance(cache_position, int) else int(cache_position.shape[0])
        out: tuple[int, int] = sizes(self, query_length)
        return out

    def get_max_cache_shape(self: Any) -> int:
        out: int = self.get_max_length()
        return out

    layer.get_mask_sizes = get_mask_sizes
    layer.get_max_cache_shape = get_max_cache_shape
    abc.update_abstractmethods(cls)
    return cls
