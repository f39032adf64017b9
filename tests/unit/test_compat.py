"""The transformers compatibility layer (issue 16): the same behaviour on every supported release.
CI runs this file on the current release and on `compat.OLDEST` (next to kvpress, `.ci/run`)."""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from retrieval_heads import compat
from retrieval_heads.decoding import cache_io
from retrieval_heads.testing import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_requirement(name: str) -> Requirement:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


def test_oldest_is_the_lower_bound_we_declare_and_ci_pins():
    spec = _pyproject_requirement("transformers").specifier
    assert [(s.operator, Version(s.version)) for s in spec] == [(">=", Version(compat.OLDEST))]
    assert not spec.contains("5.1.0")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")  # its second venv pins compat.OLDEST
    assert "src/retrieval_heads/compat.py" in ci and '"transformers==$oldest"' in ci


def test_installed_transformers_is_supported():
    assert Version(importlib.metadata.version("transformers")) >= Version(compat.OLDEST)


def test_kvpress_accepts_our_oldest_transformers():
    """The `kvpress` extra resolves: the installed kvpress accepts our oldest transformers."""
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (extra,) = (Requirement(r) for r in data["project"]["optional-dependencies"]["kvpress"])
    assert extra.name == "kvpress" and extra.specifier.contains("0.5.5")
    try:
        requires = importlib.metadata.requires("kvpress") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvpress is not installed (CI installs it in the oldest-transformers venv)")
    (tf,) = (Requirement(r) for r in requires if Requirement(r).name == "transformers" and not Requirement(r).marker)
    assert tf.specifier.contains(compat.OLDEST)  # (CI's `pip check` checks the installed pair)


class _Forward:
    def __init__(self, forward):
        self.forward = forward


def test_cache_io_follows_the_forward_signature():
    def new(input_ids=None, cache=None, use_cache=None, **kwargs): ...

    def old(input_ids=None, past_key_values=None, use_cache=None, **kwargs): ...

    assert compat.cache_io(type("New", (_Forward,), {})(new)) == ("cache", "cache")
    assert compat.cache_io(type("Old", (_Forward,), {})(old)) == ("past_key_values", "past_key_values")
    assert cache_io is compat.cache_io  # decoding re-exports it


def test_cache_io_of_a_peft_model_follows_the_model_it_wraps():
    """A peft model's forward takes **kwargs: the wrapped model's signature names the cache."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    lm = tiny_model("llama")
    peft_model = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert compat.cache_io(peft_model) == compat.cache_io(lm.model)
    ids = torch.tensor([[1, 5, 9, 13]])
    cache = DynamicCache()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = peft_model(input_ids=ids, **compat.cache_kwargs(peft_model, cache), use_cache=True)
    assert compat.output_cache(peft_model, out) is cache
    assert not [w for w in caught if "past_key_values" in str(w.message)]  # no deprecated name on the way


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cache_we_pass_is_the_cache_the_model_fills(arch):
    """Passing a cache by the wrong name would be swallowed by `**kwargs` on another release: the
    model would build its own cache and ours would stay empty."""
    lm = tiny_model(arch)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    cache = DynamicCache()
    with torch.no_grad():
        out = lm.model(input_ids=ids[:, :4], **compat.cache_kwargs(lm.model, cache), use_cache=True)
        assert compat.output_cache(lm.model, out) is cache
        assert cache.get_seq_length() == 4
        step = lm.model(input_ids=ids[:, 4:], **compat.cache_kwargs(lm.model, cache), use_cache=True)
        full = lm.model(input_ids=ids, use_cache=False)
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], atol=1e-5, rtol=1e-5)


@compat.cache_layer
class _Layer(CacheLayerMixin):
    """A cache layer written against the current interface only."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def lazy_initialization(self, key_states, value_states):
        self.keys, self.values, self.is_initialized = key_states[:, :, :0], value_states[:, :, :0], True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1


def test_cache_layer_speaks_the_installed_interface():
    cache = Cache(layers=[_Layer()])  # abstract methods left: instantiation would raise TypeError
    k = torch.zeros(1, 2, 3, 4)
    cache.update(k, k, 0)
    layer = cache.layers[0]
    if "query_length" in CacheLayerMixin.get_mask_sizes.__code__.co_varnames:  # the current interface
        assert layer.get_mask_sizes(2) == (5, 0)
        assert not hasattr(_Layer, "get_max_cache_shape")
    else:  # older: the query length is that of cache_position
        assert layer.get_mask_sizes(torch.arange(3, 5)) == (5, 0)
        assert layer.get_max_cache_shape() == -1
