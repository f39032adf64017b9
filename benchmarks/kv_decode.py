"""Decode speed on long caches: the full cache vs our head-sparse caches (and kvpress's presses).

    python benchmarks/kv_decode.py                                   # 16K/32K/64K tokens, 2 layers, bf16
    python benchmarks/kv_decode.py --lengths 512 --layers 1 --steps 2  # a quick check

A synthetic model with a 7-8B model's attention geometry (Llama: hidden 4096, 32 query heads,
8 KV heads, head_dim 128; few layers, a small MLP and vocabulary, random weights). There is no
prefill: each cache is filled directly with random keys and values for L tokens per layer (our
caches then compress them as after a prefill, from random observation queries), and the model
decodes `--steps` tokens on it after `--warmup` steps. Per contender and length: the median
milliseconds per decoded token, the KV bytes the cache holds before decoding (keys + values, and
our caches' int32 positions), and the decode time over the full cache's in the same run.

Contenders: `full` (transformers' DynamicCache); our `HeadSparseCache` at 25 % and 50 % of the full
cache's bytes, as `heads` (the best-ranked KV heads whole, sink 4 + window 60 for the others) and
`headkv` (a token count per KV head in proportion to its score, SnapKV inside); both ranked by one
seeded random score per KV head. With kvpress importable: its `SnapKVPress` (drops tokens),
`AdaKVPress(SnapKVPress)`, our `HeadKVPress` and `RetrievalHeadsPress` (these three mask the evicted
keys, so their bytes stay those of the full cache). kvpress patches transformers' attention
functions when imported (a check per call where nothing is masked); it is then imported first, so
every contender runs with the patch.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 32, 8, 128
SHARES = (0.25, 0.5)
SINK, WINDOW, OBS = 4, 60, 32


def build_model(layers: int, dtype: torch.dtype, device: str) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_hidden_layers=layers,
        intermediate_size=1024,
        vocab_size=1024,
        max_position_embeddings=1 << 20,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def random_kv(n: int, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, KV_HEADS, n, HEAD_DIM)
    keys = torch.randn(shape, generator=g, device=device, dtype=dtype)
    return keys, torch.randn(shape, generator=g, device=device, dtype=dtype)


def full_cache(model: Any, n: int) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    p = next(model.parameters())
    for i in range(model.config.num_hidden_layers):
        cache.update(*random_kv(n, p.dtype, str(p.device), i), i)
    return cache


def head_sparse_cache(model: Any, policy: Any, spec: Any, n: int) -> Any:
    """`policy`'s cache, filled as if after a dense prefill of `n` random tokens and compressed."""
    cache = policy.make_cache(spec)
    p = next(model.parameters())
    g = torch.Generator(device=p.device).manual_seed(1234)
    for i, layer in enumerate(cache.layers):
        layer.update(*random_kv(n, p.dtype, str(p.device), i))
        layer.pending = None  # no attention step follows: the cache is filled directly
        obs = torch.randn(1, HEADS, min(OBS, n), HEAD_DIM, generator=g, device=p.device, dtype=p.dtype)
        layer.evict(obs, after_prefill=True)
    return cache


def pressed_cache(model: Any, press: Any, n: int) -> Any:
    """A full cache of `n` random tokens compressed by a kvpress press, as its prefill hook would."""
    cache = full_cache(model, n)
    p = next(model.parameters())
    w = min(OBS, n - 1) + 1
    hidden = torch.randn(1, w, HIDDEN, device=p.device, dtype=p.dtype)
    pos = torch.arange(n - w, n, device=p.device)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, pos)}
    clear_masks(model)
    press.post_init_from_model(model)
    for i, block in enumerate(model.model.layers):
        layer = cache.layers[i]
        layer.keys, layer.values = press.compress(block.self_attn, hidden, layer.keys, layer.values, None, kwargs)
    return cache


def clear_masks(model: Any) -> None:
    """Forget the keys a kvpress press masked (kept on the attention modules)."""
    for block in model.model.layers:
        block.self_attn.masked_key_indices = None


def kv_bytes(cache: Any) -> int:
    from retrieval_heads.kvcache import HeadSparseCache

    if isinstance(cache, HeadSparseCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def decode_ms(model: Any, cache: Any, steps: int, warmup: int, attach: Callable[[], Any] | None) -> list[float]:
    """Milliseconds of each decode step (one token) after `warmup` steps."""
    import contextlib

    from retrieval_heads.compat import cache_kwargs

    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    tok = torch.tensor([[1]], device=next(model.parameters()).device)
    times = []
    with attach() if attach else contextlib.nullcontext(), torch.inference_mode():
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=tok, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            sync()
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - t0))
    return times


def contenders(model: Any, spec: Any, n: int) -> list[tuple[str, Callable[[], tuple[Any, Any]], str]]:
    """(name, build -> (cache, attach or None), note): our caches first, kvpress's last."""
    from retrieval_heads.heads import random_kv_scores
    from retrieval_heads.kvcache import HeadKVPolicy, HeadPolicy

    ranking = random_kv_scores(spec, 0)
    out: list[tuple[str, Callable[[], tuple[Any, Any]], str]] = [("full", lambda: (full_cache(model, n), None), "")]
    for share in SHARES:
        for name, cls in (("heads", HeadPolicy), ("headkv", HeadKVPolicy)):
            policy = cls.for_budget(spec, share, n, sink=SINK, window=WINDOW, ranking=ranking)

            def build(policy: Any = policy) -> tuple[Any, Any]:
                cache = head_sparse_cache(model, policy, spec, n)
                return cache, lambda: cache.attached(model, spec)

            out.append((f"{name} {share:.0%}", build, "frees"))
    try:
        import kvpress

        from retrieval_heads.integrations.kvpress import HeadKVPress, RetrievalHeadsPress
    except ImportError:
        return out
    for share in SHARES:
        presses = {
            "kvpress snapkv": (kvpress.SnapKVPress(compression_ratio=1 - share, window_size=OBS), "frees"),
            "kvpress adakv": (kvpress.AdaKVPress(kvpress.SnapKVPress(1 - share, window_size=OBS)), "masks"),
            "press headkv": (HeadKVPress(scores=ranking, compression_ratio=1 - share), "masks"),
            "press heads": (RetrievalHeadsPress(scores=ranking, kv_compression_ratio=1 - share), "masks"),
        }
        for name, (press, note) in presses.items():
            out.append((f"{name} {share:.0%}", lambda press=press: (pressed_cache(model, press, n), None), note))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="16000,32000,64000", help="cached tokens, comma list")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="decode steps timed (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    from retrieval_heads.models import spec_from_config

    try:
        import kvpress  # noqa: F401  (its attention patch, before any contender)
    except ImportError:
        pass
    model = build_model(args.layers, getattr(torch, args.dtype), args.device)
    spec = spec_from_config(model.config, "LlamaForCausalLM")
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"# kv_decode {time.strftime('%Y-%m-%d %H:%M')} {where}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {args.layers} layers, {args.dtype}, {args.steps} steps after {args.warmup}\n"
    )
    print("| cache | tokens | ms / token (median) | KV MiB | of full bytes | time / full | storage |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.lengths.split(",")):
        full_ms = full_bytes = None
        for name, build, note in contenders(model, spec, n):
            clear_masks(model)
            try:
                cache, attach = build()
                nbytes = kv_bytes(cache)  # as filled, before decoding
                ms = statistics.median(decode_ms(model, cache, args.steps, args.warmup, attach))
            except Exception as e:  # a press that does not run here: say so, go on
                print(f"| {name} | {n} | failed: {type(e).__name__}: {str(e)[:80]} | | | | |", flush=True)
                continue
            full_ms, full_bytes = (ms, nbytes) if name == "full" else (full_ms, full_bytes)
            row = {
                "cache": name,
                "tokens": n,
                "ms_per_token": round(ms, 3),
                "kv_bytes": nbytes,
                "bytes_vs_full": round(nbytes / full_bytes, 4) if full_bytes else None,
                "time_vs_full": round(ms / full_ms, 3) if full_ms else None,
                "storage": note or "-",
            }
            rows.append(row)
            print(
                f"| {name} | {n} | {ms:.2f} | {nbytes / 2**20:.1f} | {row['bytes_vs_full'] or 1:.2f} | "
                f"{row['time_vs_full'] or 1:.2f} | {row['storage']} |",
                flush=True,
            )
            del cache
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print("\nstorage: frees = the evicted tokens leave memory; masks = kvpress hides them, the bytes stay.")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
