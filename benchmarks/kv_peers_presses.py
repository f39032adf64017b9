"""kvpress's presses for `benchmarks/kv_peers.py`: which presses, how each is built, and how every
press answers a sample from one shared prefill (`press_answers`), timed (`ForwardTimer`)."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

# every kvpress press that compresses at prefill without hub downloads; a failure on a model is
# recorded, not raised. Not here: qfilter, kvzap, fastkvzip, restorekv, expected_attention_stats
# (weights or statistics from the hub), finch (needs a delimiter token inside the prompt),
# simlayerkv (no compression ratio), the decoding-time presses and the generic wrappers.
PRESSES = (
    "streaming_llm",
    "snapkv",
    "knorm",
    "expected_attention",
    "adakv_snapkv",
    "adakv_expected_attention",
    "duo_attention",
    "pyramidkv",
    "tova",
    "keydiff",
    "lagkv",
    "observed_attention",
    "random",
    "criticalkv_snapkv",
    "criticaladakv_snapkv",
    "chunkkv_snapkv",
    "leverage",
    "cur",
    "compactor",
    "cap",
    "non_causal",
    "think",
    "kvzip",
    "kvcompose",
    "retrieval_heads",
    "headkv",
)
OUR_PRESSES = ("retrieval_heads", "headkv")  # our rankings inside kvpress


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------------- presses
def make_press(name: str, ratio: float, args: argparse.Namespace, lm: Any) -> Any:
    import kvpress as kp

    simple = {
        "streaming_llm": kp.StreamingLLMPress,
        "snapkv": kp.SnapKVPress,
        "knorm": kp.KnormPress,
        "expected_attention": kp.ExpectedAttentionPress,
        "pyramidkv": kp.PyramidKVPress,
        "tova": kp.TOVAPress,
        "keydiff": kp.KeyDiffPress,
        "lagkv": kp.LagKVPress,
        "observed_attention": kp.ObservedAttentionPress,
        "leverage": kp.LeverageScorePress,
        "cur": kp.CURPress,
        "compactor": kp.CompactorPress,
        "cap": kp.CapPress,
        "non_causal": kp.NonCausalAttnPress,
        "kvzip": kp.KVzipPress,
        "kvcompose": kp.KVComposePress,
    }
    if name in simple:
        return simple[name](compression_ratio=ratio)
    if name == "random":
        return kp.RandomPress(compression_ratio=ratio, seed=0)
    if name == "think":  # compresses key channels, not tokens: the ratio is the channels' share
        return kp.ThinKPress(key_channel_compression_ratio=ratio)
    if name.startswith("adakv_"):
        return kp.AdaKVPress(make_press(name.removeprefix("adakv_"), ratio, args, lm))
    if name == "criticalkv_snapkv":
        return kp.CriticalKVPress(kp.SnapKVPress(compression_ratio=ratio))
    if name == "criticaladakv_snapkv":
        return kp.CriticalAdaKVPress(kp.SnapKVPress(compression_ratio=ratio))
    if name == "chunkkv_snapkv":
        return kp.ChunkKVPress(kp.SnapKVPress(compression_ratio=ratio))
    if name == "duo_attention":
        duo_scores_offline(lm, args)
        return kp.DuoAttentionPress(head_compression_ratio=ratio, on_the_fly_scoring=True)  # set per sample
    if name == "retrieval_heads":
        from retrieval_heads.integrations.kvpress import RetrievalHeadsPress

        return RetrievalHeadsPress(
            scores=args.scores, score=args.press_score, kv_compression_ratio=ratio, sink_size=4, recent_size=60
        )
    if name == "headkv":
        from retrieval_heads.integrations.kvpress import HeadKVPress

        return HeadKVPress(scores=args.scores, score=args.press_score, compression_ratio=ratio, sink_size=4)
    raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")


def duo_scores_offline(lm: Any, args: argparse.Namespace) -> None:
    """Run kvpress's `duo_attention_on_the_fly` on local text (no hub access here) and put the
    result where `DuoAttentionPress(on_the_fly_scoring=True)` looks it up (its LRU cache)."""
    import pandas as pd
    from kvpress.presses import duo_attention_press as duo

    from retrieval_heads.needles import load_haystack

    text = load_haystack(None)
    words = text.split()
    size = 1500  # words per chunk (about 2,000 tokens), BookSum chapters are longer
    chunks = [" ".join(words[i : i + size]) for i in range(0, len(words) - size, size)][: args.duo_samples]

    class _Data:
        def to_pandas(self) -> Any:
            return pd.DataFrame({"chapter": chunks})

    class _Tok:
        @staticmethod
        def from_pretrained(*_: Any, **__: Any) -> Any:
            return lm.tokenizer

    duo.load_dataset, duo.AutoTokenizer = (lambda *a, **k: _Data()), _Tok
    scores = duo.duo_attention_on_the_fly(lm.model, num_samples=len(chunks))
    duo.cache[(lm.model.config.name_or_path, 50, 500)] = scores  # the key the press asks for


def cache_bytes(cache: Any) -> int:
    n = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                n += t.numel() * t.element_size()
    return n


class ForwardTimer:
    """Wall seconds of each forward of `module`: the answer loops call the model once for the
    question, then once per generated token."""

    def __init__(self, module: Any) -> None:
        self.module, self.times, self._t = module, list[float](), 0.0

    def __enter__(self) -> ForwardTimer:
        pre = self.module.register_forward_pre_hook(lambda *_: setattr(self, "_t", time.perf_counter()))
        post = self.module.register_forward_hook(lambda *_: self.times.append(time.perf_counter() - self._t))
        self.hooks = [pre, post]
        return self

    def __exit__(self, *_: Any) -> None:
        for h in self.hooks:
            h.remove()

    def take(self) -> dict[str, Any]:
        """{question_s, decode_s_per_token, new_tokens} of the forwards since the last take."""
        t, self.times = self.times, []
        decode = t[1:]
        return {
            "question_s": round(t[0], 4) if t else None,
            "decode_s_per_token": round(sum(decode) / len(decode), 5) if decode else None,
            "decode_steps": len(decode),
        }


def own_hook(press: Any) -> bool:
    """Whether a press changes kvpress's prefill hook (it must run its own prefill)."""
    from kvpress import BasePress

    return type(press).forward_hook is not BasePress.forward_hook or type(press).__call__ is not BasePress.__call__


def press_answers(
    lm: Any,
    presses: dict[str, Any],
    ids: list[int],
    c: int,
    max_new_tokens: int,
    timing: dict[str, dict[str, Any]] | None = None,
    failures: dict[str, str] | None = None,
) -> dict[str, tuple[str, int, float]]:
    """Per press: (text, bytes after compression, its compression ratio). kvpress's pipeline does
    prefill-with-press then greedy answer per press; a press only rewrites each layer's cache after
    that layer's attention, never its output, so one prefill serves every press: record each
    attention layer's hook arguments once, then apply each press's own `compress` to a fresh cache
    and answer with kvpress's own `generate_answer`. A press with its own prefill hook (KVzip,
    KVCompose) runs its own prefill under `press(model)`, as the pipeline does. With `timing`:
    each press's seconds; with `failures`: a press that raises is recorded there, not raised."""
    import torch
    from kvpress import KVPressTextGenerationPipeline
    from transformers import DynamicCache

    from retrieval_heads.compat import cache_kwargs

    base = lm.model.model
    layers = [layer.self_attn for layer in base.layers]
    saved: dict[int, tuple[Any, Any, dict[str, Any]]] = {}

    def record(module: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        rest = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}
        saved[module.layer_idx] = (kwargs["hidden_states"], output[1], rest)

    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer, device=lm.model.device)
    dense = DynamicCache()
    context = torch.tensor([ids[:c]])
    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in layers]
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            base(input_ids=context, **cache_kwargs(base, dense))
    finally:
        for h in hooks:
            h.remove()
    shared = time.perf_counter() - t0
    out = {}
    for name, press in presses.items():
        t0 = time.perf_counter()
        try:
            cache = DynamicCache()
            with torch.inference_mode():
                if own_hook(press):
                    with press(lm.model):
                        base(input_ids=context, **cache_kwargs(base, cache))
                    prefill = time.perf_counter() - t0
                else:
                    press.post_init_from_model(lm.model)  # what `press(model)` does before hooking
                    for m in layers:
                        m.rotary_emb = base.rotary_emb  # as BasePress.__call__ (ExpectedAttention uses it)
                        m.masked_key_indices = None
                        hidden, attentions, kwargs = saved[m.layer_idx]
                        layer = dense.layers[m.layer_idx]
                        keys, values = press.compress(m, hidden, layer.keys, layer.values, attentions, kwargs)
                        cache.update(keys, values, m.layer_idx)
                    prefill = shared + time.perf_counter() - t0
                kv_bytes = cache_bytes(cache)
                with ForwardTimer(lm.model) as timer:
                    text = pipe.generate_answer(torch.tensor([ids[c:]]), cache, c, max_new_tokens)
            out[name] = (text, kv_bytes, float(getattr(press, "compression_ratio", math.nan)))
            if timing is not None:
                timing[name] = {"prefill_s": round(prefill, 4), **timer.take()}
        except Exception as e:
            if failures is None:
                raise
            failures[name] = error_line(e)
        finally:
            for m in layers:
                m.masked_key_indices = None
    return out
