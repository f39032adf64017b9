"""Detection speed: plain generation (the floor) vs the paper-faithful and the fast engine.

    python benchmarks/detect_speed.py --phases lengths --lengths 1000,2000,4000,8000      # SmolLM2
    python benchmarks/detect_speed.py --phases lengths --model gemma3-270m \
        --lengths 1000,2000,4000,8000,16000 --reference-max 2000
    python benchmarks/detect_speed.py --phases grid,batch                                 # reuse, batching

Lengths phase: per length, plain `model.generate` (SDPA + KV cache, greedy, exactly N new tokens),
the fast engine (no prefix reuse) and, up to `--reference-max`, the paper-faithful reference engine
(eager, weights at every step), each in a fresh process (best time of `--reps` runs; peak RSS
above the loaded model measured from a reset VmHWM), interleaved by length; then the fitted
log-log slope of time and memory against prompt tokens. Grid phase: plain generate of every
sample of a grid vs the fast engine with prefix reuse. Every contender generates exactly
`--new-tokens` tokens (no stop rule), so the work is the same. Each line is printed against its
target.
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
from pathlib import Path
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


CONTENDERS = ("plain", "fast", "reference")
# glibc's dynamic mmap threshold lets freed large tensors stay in the heap, so the peak RSS of two
# identical runs differed by up to 250 MiB (SmolLM2, 8K tokens); with a fixed threshold a peak is
# the memory in use, for every contender alike.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}


def lengths_child(args: argparse.Namespace) -> None:
    """Fresh process, one contender at one length: its best time of `--reps` runs and its peak RSS.

    A fresh process per (contender, length) keeps one run's freed but retained memory out of the
    next one's peak; the peak (VmHWM) is reset after the model is loaded and warmed up
    (/proc/self/clear_refs), so it is this length's own peak on top of the loaded model."""
    import torch

    from retrieval_heads.engines import FastEngine, ReferenceEngine
    from retrieval_heads.models import load_model
    from retrieval_heads.needles import DETECTION_NEEDLES, load_haystack, make_sample

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, attn_implementation="sdpa")
    hay = load_haystack()
    which = args.lengths_child
    n = args.new_tokens

    def run(s: Any) -> list[int]:
        if which == "plain":
            return plain_generate(lm, s, n)
        if which == "fast":
            return FastEngine(lm, prefix_reuse=False).run(s, max_new_tokens=n, stop=NEVER).generated_ids
        return ReferenceEngine(lm).run(s, max_new_tokens=n, stop=NEVER).generated_ids

    run(make_sample(lm.tokenizer, hay, DETECTION_NEEDLES[0], 200, 50.0))  # warm-up: every weight paged in
    L = int(args.lengths)
    s = make_sample(lm.tokenizer, hay, DETECTION_NEEDLES[0], L, 50.0)
    before = PeakRSS.now()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        ids = run(s)
        times.append(time.perf_counter() - t0)
    out = {"length": L, "tokens": len(s.prompt_ids), "seconds": min(times), "times": times, "peak": vm_hwm_mib()}
    print(json.dumps({**out, "before": before, "ids": ids, "eos": lm.tokenizer.eos_token_id}))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x: 1 = linear growth, 2 = quadratic."""
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(xs) >= 2 else float("nan")


def lengths_phase(args: argparse.Namespace, lengths: list[int]) -> list[dict[str, Any]]:
    """Plain generate, fast engine and reference engine per length, each contender in its own process."""
    out: dict[str, dict[int, dict[str, Any]]] = {c: {} for c in CONTENDERS}
    for L in lengths:  # interleaved, so a slow spell of the machine does not fall on one contender only
        for which in CONTENDERS:
            if which == "reference" and L > args.reference_max:
                continue
            cmd = [sys.executable, __file__, "--lengths-child", which, "--model", args.model, "--threads",
                   str(args.threads), "--lengths", str(L), "--new-tokens", str(args.new_tokens),
                   "--reps", str(1 if which == "reference" else args.reps)]  # fmt: skip
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=CHILD_ENV)
            out[which][L] = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    rows = []
    print(
        "\n| length | prompt tokens | plain generate s | reference s | fast s | fast / plain | fast / reference "
        "| peak RSS MiB plain / ref / fast | fast / plain RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for L in lengths:
        p, f, r = out["plain"][L], out["fast"][L], out["reference"].get(L)
        # generate's min_new_tokens bans EOS, so compare with it only up to the engines' first EOS
        cut = next((i for i, t in enumerate(f["ids"]) if t == f["eos"]), len(f["ids"]))
        same = p["ids"][:cut] == f["ids"][:cut] and (r is None or r["ids"] == f["ids"])
        row = {"length": L, "tokens": p["tokens"], "plain_s": p["seconds"], "fast_s": f["seconds"],
               "reference_s": r["seconds"] if r else None, "plain_rss": p["peak"], "fast_rss": f["peak"],
               "reference_rss": r["peak"] if r else None,
               "plain_rss_extra": p["peak"] - p["before"],
               "fast_rss_extra": f["peak"] - f["before"], "same_tokens": same}  # fmt: skip
        rows.append(row)
        ref_s = f"{r['seconds']:.1f}" if r else "-"
        ref_ratio = f"{f['seconds'] / r['seconds']:.2f}" if r else "-"
        ref_rss = f"{r['peak']:.0f}" if r else "-"
        print(
            f"| {L} | {p['tokens']} | {p['seconds']:.1f} | {ref_s} | {f['seconds']:.1f} | "
            f"{f['seconds'] / p['seconds']:.2f} | {ref_ratio} | {p['peak']:.0f} / {ref_rss} / {f['peak']:.0f} | "
            f"{f['peak'] / p['peak']:.2f} |" + ("" if same else " (generations differ!)")
        )
    toks = [float(r["tokens"]) for r in rows]
    fits = {
        "plain s": slope(toks, [r["plain_s"] for r in rows]),
        "fast s": slope(toks, [r["fast_s"] for r in rows]),
        "plain RSS above the loaded model": slope(toks, [r["plain_rss_extra"] for r in rows]),
        "fast RSS above the loaded model": slope(toks, [r["fast_rss_extra"] for r in rows]),
    }
    ref_rows = [r for r in rows if r["reference_s"]]
    fits["reference s"] = slope([float(r["tokens"]) for r in ref_rows], [r["reference_s"] for r in ref_rows])
    print("\nlog-log slope against prompt tokens: " + ", ".join(f"{k} {v:.2f}" for k, v in fits.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows, "slopes": fits}, indent=1))
    return rows


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
    p.add_argument("--reference-max", type=int, default=4000, help="lengths phase: reference engine up to here")
    p.add_argument("--reps", type=int, default=2, help="lengths phase: runs per contender and length (best kept)")
    p.add_argument("--json", default="", help="lengths phase: also write the rows and slopes to this JSON file")
    p.add_argument("--lengths-child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lengths_child:
        return lengths_child(args)

    import torch

    from retrieval_heads.engines import FastEngine
    from retrieval_heads.models import load_model
    from retrieval_heads.needles import DETECTION_NEEDLES, load_haystack, make_sample

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.grid_depths.split(",")]
    n = args.new_tokens
    rss = PeakRSS()
    print(
        f"# detect_speed  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
        f"{platform.processor() or platform.machine()}"
        f"  cpus={os.cpu_count()} threads={torch.get_num_threads()}  model={args.model}  new_tokens={n}"
    )
    rows: list[dict[str, Any]] = []
    phases = set(args.phases.split(","))
    if "lengths" in phases:  # its contenders load the model in their own processes
        rows = lengths_phase(args, lengths)
    if phases & {"grid", "batch"}:
        lm = load_model(args.model, attn_implementation="sdpa")
        hay = load_haystack()
        sample = lambda L, d=50.0, k=0: make_sample(lm.tokenizer, hay, DETECTION_NEEDLES[k], L, d)  # noqa: E731
        warm = sample(200)
        plain_generate(lm, warm, 2), FastEngine(lm, prefix_reuse=False).run(warm, max_new_tokens=2, stop=NEVER)

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
        for r in rows:
            print(f"  fast / plain generate at {r['length']}:         {verdict(r['fast_s'] / r['plain_s'], 1.15)}")
        ref = [r for r in rows if r.get("reference_s")]
        if ref:
            big = ref[-1]
            print(
                f"  fast / paper-faithful at {big['length']}:       {verdict(big['fast_s'] / big['reference_s'], 0.35)}"
            )
        last = rows[-1]
        print(
            f"  peak RSS fast / plain at {last['length']}:        {verdict(last['fast_rss'] / last['plain_rss'], 1.1)}"
        )
    if tg_plain:
        print(
            f"  grid with reuse / plain generate grid: {verdict(tg_fast / tg_plain, 0.7)} "
            f"(reuse alone can reach >= {bound:.2f})"
        )
        print(f"  grid with reuse + batched decode / plain generate grid: {verdict(tg_fastb / tg_plain, 0.7)}")
    print(f"\n  process peak RSS (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
