"""Model runs on head-sparse caches: one dense prefill shared by many policies, answers on a
compressed cache, measured KV-head rankings (needle attention, gain) and a peak-memory probe.

    dense = dense_prefill(lm, ids[:c])                      # the context, full attention, once
    cache = policy.make_cache(lm.spec).load_prefill(dense)  # compressed as after its own prefill
    answer = answer_on(lm, cache, ids[c:], 24, StopRule(lm.tokenizer))
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..decoding import StopFn, attention_rows, cache_io, greedy
from ..errors import ConfigError
from ..heads import kv_head_scores
from ..models import LoadedModel
from ..needles import QUESTION_TEMPLATE, Needle, Sample
from .cache import HeadSparseCache
from .evictions import SinkWindowEviction
from .policies import KVPolicy


def split_at(tokenizer: Any, prompt: str, marker: str) -> tuple[tuple[int, ...], int]:
    """(token ids of `prompt`, index of the first token of its last `marker`): the prompt's context
    is the tokens before that index, the question the rest."""
    c = prompt.rfind(marker)
    if c < 0:
        raise ConfigError(f"cannot split the prompt into context and question (no {marker.strip()!r})")
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return tuple(enc["input_ids"]), next(i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= c)


def split_prompt(lm: LoadedModel, sample: Sample) -> int:
    """Token index where the question part of a needle sample starts (before it: the context)."""
    ids, split = split_at(lm.tokenizer, sample.prompt, QUESTION_TEMPLATE.format(question=sample.needle.question))
    if list(ids) != list(sample.prompt_ids):
        raise ConfigError("cannot split the prompt into context and question")
    return split


def answer_ids(lm: LoadedModel, needle: Needle) -> list[int]:
    """The needle's answer as the tokens that follow the question (leading space)."""
    return list(lm.tokenizer(" " + needle.answer, add_special_tokens=False)["input_ids"])


def _ids(lm: LoadedModel, ids: Sequence[int]) -> Any:
    import torch

    return torch.tensor([list(ids)], device=lm.model.device)


def dense_prefill(lm: LoadedModel, ids: Sequence[int], record_obs: int = 32) -> HeadSparseCache:
    """An all-whole cache after one dense forward over `ids` (observation queries recorded)."""
    import torch

    whole = np.ones((lm.spec.n_layers, lm.spec.n_kv_heads), bool)
    cache = HeadSparseCache(whole, record_obs=record_obs, windows=lm.spec.sliding_window)
    kw, _ = cache_io(lm.model)
    with cache.attached(lm.model, lm.spec), torch.no_grad():
        lm.model(input_ids=_ids(lm, ids), **{kw: cache}, use_cache=True, logits_to_keep=1)
    return cache


def answer_on(
    lm: LoadedModel, cache: HeadSparseCache, question_ids: Sequence[int], max_new_tokens: int, stop: StopFn
) -> list[int]:
    """Greedy answer: feed the question on the (compressed) cache, then decode."""
    import torch

    with cache.attached(lm.model, lm.spec), torch.no_grad():
        gen, _ = greedy(lm.model, _ids(lm, question_ids), cache=cache, max_new_tokens=max_new_tokens, stop=stop)
        if gen and len(gen) == max_new_tokens and not stop(gen):
            # An answer cut by the token limit is cached whole (kv-eval's recorded end bytes count it).
            kw, _ = cache_io(lm.model)
            lm.model(input_ids=_ids(lm, gen[-1:]), **{kw: cache}, use_cache=True, logits_to_keep=1)
    return gen


def answers_on(
    lm: LoadedModel,
    policies: Sequence[KVPolicy],
    prompt_ids: Sequence[int],
    context_len: int,
    max_new_tokens: int,
    stop: StopFn,
) -> Iterator[tuple[list[int], int, int]]:
    """Per policy, lazily: the greedy answer to the question `prompt_ids[context_len:]` on the
    policy's cache compressed from one shared dense prefill of the context, with the cache's bytes
    after compression and at the end."""
    if not policies:
        return
    dense = dense_prefill(lm, prompt_ids[:context_len], record_obs=32)
    for policy in policies:
        cache = policy.make_cache(lm.spec).load_prefill(dense)
        kv_bytes = cache.nbytes()
        gen = answer_on(lm, cache, prompt_ids[context_len:], max_new_tokens, stop)
        yield gen, kv_bytes, cache.nbytes()


def answer_logprob(
    lm: LoadedModel, cache: HeadSparseCache, question_ids: Sequence[int], answer: Sequence[int]
) -> float:
    """Mean log-probability of the answer tokens (teacher forced) after the question, on `cache`."""
    import torch

    kw, _ = cache_io(lm.model)
    with cache.attached(lm.model, lm.spec), torch.no_grad():
        logits = lm.model(input_ids=_ids(lm, list(question_ids) + list(answer)), **{kw: cache}, use_cache=True).logits[
            0
        ]
    n = len(answer)
    lp = logits[-n - 1 : -1].log_softmax(-1)
    return float(lp[torch.arange(n), torch.tensor(list(answer))].mean())


def needle_attention_scores(lm: LoadedModel, samples: Sequence[Sample]) -> np.ndarray:
    """`[n_layers, n_heads]`: mean attention mass on the needle span of the rows that produce the
    answer tokens (teacher forced after the question), per query head (HeadKV-like)."""
    import torch

    total = np.zeros(lm.spec.shape)
    for s in samples:
        ans = answer_ids(lm, s.needle)
        ids = _ids(lm, list(s.prompt_ids) + ans[:-1])
        n = len(s.prompt_ids)
        with torch.no_grad():  # the prefill keeps the model's attention, only the answer rows are eager
            rows = attention_rows(lm.model, ids, n - 1, ids.shape[1])
        mass = []
        for l, a in enumerate(rows.layers):  # [1, heads, answer rows, K_l]: the last K_l keys
            f = rows.first_key(l)  # a sliding-window layer's keys start after 0
            mass.append(a[0, :, :, max(s.needle_start - f, 0) : max(s.needle_end - f, 0)].sum(-1).mean(-1))
        total += torch.stack(mass).float().cpu().numpy()
    return total / max(len(samples), 1)


def gain_scores(lm: LoadedModel, samples: Sequence[Sample], sink: int, window: int) -> np.ndarray:
    """`[n_layers, n_kv_heads]`: answer log-prob with only that KV head whole minus with none whole,
    averaged over held-out samples (measured importance of each KV head, one at a time)."""
    spec = lm.spec
    cut = SinkWindowEviction(sink, window)
    out = np.zeros((spec.n_layers, spec.n_kv_heads))
    for s in samples:
        c = split_prompt(lm, s)
        dense = dense_prefill(lm, s.prompt_ids[:c], record_obs=0)
        q, ans = s.prompt_ids[c:], answer_ids(lm, s.needle)
        none = np.zeros((spec.n_layers, spec.n_kv_heads), bool)
        win = spec.sliding_window
        base = answer_logprob(lm, HeadSparseCache(none, cut, windows=win).load_prefill(dense), q, ans)
        for l in (l for l in range(spec.n_layers) if win[l] is None):  # sliding layers are never cut
            for k in range(spec.n_kv_heads):
                one = none.copy()
                one[l, k] = True
                cache = HeadSparseCache(one, cut, windows=win).load_prefill(dense)
                out[l, k] += answer_logprob(lm, cache, q, ans) - base
    return out / max(len(samples), 1)


MEASURED_RANKINGS = ("needle_attention", "gain")


def measure_ranking(lm: LoadedModel, name: str, samples: Sequence[Sample], *, sink: int, window: int) -> dict[str, Any]:
    """A measured KV-head ranking on held-out samples: {"ranking", "kv_scores" `[n_layers, n_kv_heads]`,
    "query_scores" (needle_attention: per query head, else None), "seconds"} as lists."""
    t0 = time.perf_counter()
    if name == "needle_attention":
        q = needle_attention_scores(lm, samples)
        kv = kv_head_scores(q, lm.spec)
    elif name == "gain":
        q, kv = None, gain_scores(lm, samples, sink, window)
    else:
        raise ConfigError(f"unknown measured ranking {name!r}; choose from {', '.join(MEASURED_RANKINGS)}")
    return {
        "ranking": name,
        "kv_scores": kv.tolist(),
        "query_scores": None if q is None else q.tolist(),
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ----------------------------------------------------------------------------------- memory
def _vm(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        return None
    return None


def memory_probe(lm: LoadedModel, policy: KVPolicy, ids: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
    """Run `model.generate` once from scratch with the policy's cache; peak RSS of the process
    during it (VmHWM after resetting it), and the cache's measured bytes (peak and final)."""
    import torch

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (Linux)
        rss_ok = True
    except OSError:
        rss_ok = False
    cache = policy.make_cache(lm.spec)
    kw, _ = cache_io(lm.model)
    t0 = time.perf_counter()
    with cache.attached(lm.model, lm.spec), torch.no_grad():
        lm.model.generate(
            _ids(lm, ids),
            **{kw: cache},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            min_new_tokens=max_new_tokens,
            pad_token_id=lm.tokenizer.eos_token_id,
        )
    return {
        "peak_rss_mib": _vm("VmHWM") if rss_ok else None,
        "peak_cache_mib": cache.peak_nbytes() / 2**20,
        "final_cache_mib": cache.nbytes() / 2**20,
        "seconds": round(time.perf_counter() - t0, 2),
    }
