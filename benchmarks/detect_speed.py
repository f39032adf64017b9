"""Detection speed: plain generation (the floor) vs the paper-faithful and the fast engine.

One process, one run, the same prompts for every contender:

    python benchmarks/detect_speed.py                        # SmolLM2, 1K/2K/4K, 30 tokens, 2 threads
    python benchmarks/detect_speed.py --lengths 1000,2000,4000,8000 --rss-length 8000

Per length: plain `model.generate` (SDPA + KV cache, greedy, exactly N new tokens), the reference
engine (eager, weights at every step), the fast engine (no prefix reuse). Then a grid (lengths x
depths x needles): plain generate of every sample vs the fast engine with prefix reuse. Every
contender generates exactly `--new-tokens` tokens (no stop rule), so the work is the same.
Peak RSS: per phase, sampled from /proc; with `--rss-length`, a fresh child process per contender
(plain prefill = `generate(max_new_tokens=1)`, fast engine) so the peaks are not masked by
earlier phases. Each line is printed against its target from the issue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

NEVER = lambda generated: False  # noqa: E731


class PeakRSS:
    """Peak resident set size of this process during a block, sampled every 5 ms (MiB)."""

    def __init__(self) -> None:
        self.peak = 0.0

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    @contextmanager
    def track(self) -> Iterator[PeakRSS]:
        self.peak = self.now()
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(0.005):
                self.peak = max(self.peak, self.now())

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()
            self.peak = max(self.peak, self.now())


def plain_generate(lm: Any, sample: Any, n: int) -> list[int]:
    import torch

    ids = torch.tensor([sample.prompt_ids])
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=lm.tokenizer.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def timed(fn: Any, rss: PeakRSS) -> tuple[float, float, Any]:
    with rss.track():
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
    return dt, rss.peak, result


def verdict(value: float, target: float) -> str:
    return f"{value:5.2f} (target <= {target}: {'met' if value <= target else 'NOT met'})"


def vm_hwm_mib() -> float:
    """This process's peak RSS (VmHWM). Unlike ru_maxrss, which Linux carries over fork and exec
    from the parent, VmHWM belongs to the process's own address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """Fresh process: one contender at one length; prints its peak RSS (VmHWM, MiB) as JSON."""
    import torch

    from retrieval_heads.engines import FastEngine
    from retrieval_heads.models import load_model
    from retrieval_heads.needles import DETECTION_NEEDLES, load_haystack, make_sample

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, attn_implementation="sdpa")
    s = make_sample(lm.tokenizer, load_haystack(), DETECTION_NEEDLES[0], args.rss_length, 50.0)
    base = vm_hwm_mib()
    t0 = time.perf_counter()
    if args.child == "plain":
        plain_generate(lm, s, 1)
    else:
        FastEngine(lm).run(s, max_new_tokens=args.rss_new_tokens, stop=NEVER)
    print(
        json.dumps(
            {"before": base, "peak": vm_hwm_mib(), "seconds": time.perf_counter() - t0, "tokens": len(s.prompt_ids)}
        )
    )


def run_child(args: argparse.Namespace, which: str) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--rss-length",
        str(args.rss_length),
        "--rss-new-tokens",
        str(args.rss_new_tokens),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="1000,2000,4000")
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid-depths", default="0,50,100")
    p.add_argument("--grid-needles", type=int, default=2)
    p.add_argument("--phases", default="lengths,grid,batch", help="which parts to run: lengths, grid, batch")
    p.add_argument("--batch-size", type=int, default=4, help="batch phase: samples per batch")
    p.add_argument("--rss-length", type=int, default=0, help="also measure peak RSS at this length in child processes")
    p.add_argument("--rss-new-tokens", type=int, default=5)
    p.add_argument("--child", choices=["plain", "fast"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    from retrieval_heads.engines import FastEngine, ReferenceEngine
    from retrieval_heads.models import load_model
    from retrieval_heads.needles import DETECTION_NEEDLES, load_haystack, make_sample

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.grid_depths.split(",")]
    n = args.new_tokens
    rss = PeakRSS()
    lm = load_model(args.model, attn_implementation="sdpa")
    hay = load_haystack()
    print(
        f"# detect_speed  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
        f"{platform.processor() or platform.machine()}"
        f"  cpus={os.cpu_count()} threads={torch.get_num_threads()}  model={args.model}  new_tokens={n}"
    )
    sample = lambda L, d=50.0, k=0: make_sample(lm.tokenizer, hay, DETECTION_NEEDLES[k], L, d)  # noqa: E731
    fast = FastEngine(lm, prefix_reuse=False)
    warm = sample(200)
    plain_generate(lm, warm, 2), fast.run(warm, max_new_tokens=2, stop=NEVER)

    rows = []
    phases = set(args.phases.split(","))
    print(
        "\n| length | prompt tokens | plain generate s | reference s | fast s | fast/plain | fast/reference "
        "| peak RSS MiB plain / ref / fast |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for L in lengths if "lengths" in phases else []:
        s = sample(L)
        lm.model.set_attn_implementation("sdpa")
        tp, mp, gen_plain = timed(lambda s=s: plain_generate(lm, s, n), rss)
        ref = ReferenceEngine(lm)  # switches the model to eager
        tr, mr, out_ref = timed(lambda s=s, ref=ref: ref.run(s, max_new_tokens=n, stop=NEVER), rss)
        fast = FastEngine(lm, prefix_reuse=False)  # back to SDPA
        tf, mf, out_fast = timed(lambda s=s, fast=fast: fast.run(s, max_new_tokens=n, stop=NEVER), rss)
        # generate's min_new_tokens bans EOS, so compare with it only up to the engines' first EOS
        eos = lm.tokenizer.eos_token_id
        cut = out_fast.generated_ids.index(eos) if eos in out_fast.generated_ids else n
        same = out_fast.generated_ids == out_ref.generated_ids and gen_plain[:cut] == out_fast.generated_ids[:cut]
        rows.append((L, tp, tr, tf))
        print(
            f"| {L} | {len(s.prompt_ids)} | {tp:.1f} | {tr:.1f} | {tf:.1f} | {tf / tp:.2f} | {tf / tr:.2f} | "
            f"{mp:.0f} / {mr:.0f} / {mf:.0f} |" + ("" if same else " (generations differ!)")
        )

    # The grid: plain generate of every sample vs fast engine with prefix reuse, same samples.
    tg_plain = tg_fast = 0.0
    if "grid" in phases:
        grid = [
            make_sample(lm.tokenizer, hay, needle, L, d)
            for needle in DETECTION_NEEDLES[: args.grid_needles]
            for L in lengths
            for d in depths
        ]
        tg_plain, mg_plain, _ = timed(lambda: [plain_generate(lm, s, n) for s in grid], rss)
        tg_prefill, _, _ = timed(lambda: [plain_generate(lm, s, 1) for s in grid], rss)  # prefill + 1 token
        fast = FastEngine(lm, prefix_reuse=True, batch_size=1)
        tg_fast, mg_fast, outs_1 = timed(lambda: list(fast.run_many(grid, max_new_tokens=n, stop=NEVER)), rss)
        fastb = FastEngine(lm, prefix_reuse=True, batch_size=args.batch_size)
        tg_fastb, mg_fastb, outs_b = timed(lambda: list(fastb.run_many(grid, max_new_tokens=n, stop=NEVER)), rss)
        tokens = sum(len(s.prompt_ids) for s in grid)
        share = fast.prefill_stats["prefilled"] / tokens
        # Prefix reuse can only remove prefill work; decoding every sample stays. Bound, with prefill
        # time taken as proportional to the tokens prefilled:
        bound = (tg_plain - tg_prefill + tg_prefill * share) / tg_plain

        print(
            f"\nGrid: {len(grid)} samples ({args.grid_needles} needles x lengths {lengths} x depths {depths}), "
            f"{tokens} prompt tokens"
        )
        print(
            f"  plain generate of every sample: {tg_plain:.1f} s (peak RSS {mg_plain:.0f} MiB); "
            f"of which prefill ~{tg_prefill:.1f} s (generate with 1 new token), decode ~{tg_plain - tg_prefill:.1f} s"
        )
        print(
            f"  fast engine with prefix reuse:  {tg_fast:.1f} s (peak RSS {mg_fast:.0f} MiB); "
            f"prefilled {fast.prefill_stats['prefilled']} of {tokens} prompt tokens ({share:.1%})"
        )
        print(
            f"  best ratio prefix reuse can reach on this grid (decode unchanged, prefill x {share:.2f}): {bound:.2f}"
        )
        print(
            f"  fast engine with prefix reuse + decode batched by {args.batch_size}: {tg_fastb:.1f} s "
            f"(peak RSS {mg_fastb:.0f} MiB); ratio to plain {tg_fastb / tg_plain:.2f}; outputs "
            + (
                "identical to batch 1"
                if all(
                    a.generated_ids == b.generated_ids and (a.argmax == b.argmax).all()
                    for (_, a), (_, b) in zip(outs_1, outs_b, strict=True)
                )
                else "DIFFERENT from batch 1"
            )
        )

    if "batch" in phases:  # batched prefill + decode of several samples, no reuse (the GPU path)
        bs = args.batch_size
        batch = [
            sample(lengths[0], d, k % len(DETECTION_NEEDLES))
            for k, d in zip(range(bs), (10.0, 40.0, 70.0, 90.0) * bs, strict=False)
        ]
        one = FastEngine(lm, prefix_reuse=False, batch_size=1)
        t1, _, o1 = timed(lambda: [one.run(s, max_new_tokens=n, stop=NEVER) for s in batch], rss)
        tb, _, ob = timed(lambda: FastEngine(lm, batch_size=bs).run_batch(batch, max_new_tokens=n, stop=NEVER), rss)
        same = all(
            a.generated_ids == b.generated_ids and (a.argmax == b.argmax).all() for a, b in zip(o1, ob, strict=True)
        )
        print(
            f"\nBatching on {lm.model.device}: {bs} samples of ~{lengths[0]} tokens: one at a time {t1:.1f} s, "
            f"one batch {tb:.1f} s (ratio {tb / t1:.2f}; {'identical' if same else 'DIFFERENT'} outputs)"
        )

    print("\nTargets")
    if rows:
        tot_p, tot_f = sum(r[1] for r in rows), sum(r[3] for r in rows)
        print(f"  fast / plain generate (all lengths):   {verdict(tot_f / tot_p, 1.1)}")
        for L, tp, _tr, tf in rows:
            print(f"  fast / plain generate at {L}:         {verdict(tf / tp, 1.1)}")
        big = max(rows)
        print(f"  fast / paper-faithful at {big[0]}:       {verdict(big[3] / big[2], 0.35)}")
    if tg_plain:
        print(
            f"  grid with reuse / plain generate grid: {verdict(tg_fast / tg_plain, 0.7)} "
            f"(reuse alone can reach >= {bound:.2f})"
        )
        print(f"  grid with reuse + batched decode / plain generate grid: {verdict(tg_fastb / tg_plain, 0.7)}")
    if args.rss_length:
        plain = run_child(args, "plain")
        fastc = run_child(args, "fast")
        print(
            f"  peak RSS at {plain['tokens']} tokens: plain SDPA prefill {plain['peak']:.0f} MiB, "
            f"fast engine ({args.rss_new_tokens} tokens) {fastc['peak']:.0f} MiB; "
            f"ratio {verdict(fastc['peak'] / plain['peak'], 1.2)}"
        )
    print(f"\n  process peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
