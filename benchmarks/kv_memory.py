"""Peak memory of the head-level KV cache: does process peak RSS shrink, not only cache bytes?

    python benchmarks/kv_memory.py --kv-run runs/kv-4k --budget 0.5 --length 4096 --chunk 256

With one dense prefill of the whole prompt, the peak is the prefill's (full cache + attention
activations), the same for every policy (see docs/kv_cache.md). Here each policy streams the
prompt in chunks through its own compressed cache (`dense_prefill=False`: cut heads never hold
more than sink + window + one chunk), then decodes a few tokens; each runs in a fresh process,
VmHWM reset after the model is loaded. Prints peak RSS, its rise over the loaded model, and the
cache bytes (measured from the tensors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from retrieval_heads.heads import kv_head_scores
    from retrieval_heads.kvcache import FullPolicy, HeadPolicy, SinkWindowPolicy
    from retrieval_heads.models import load_model
    from retrieval_heads.needles import EVALUATION_NEEDLES, load_haystack, make_sample
    from retrieval_heads.results import DetectionResult
    from retrieval_heads.runs import read_records

    torch.set_num_threads(args.threads)
    lm = load_model(args.model, attn_implementation="sdpa")
    ids = make_sample(lm.tokenizer, load_haystack(), EVALUATION_NEEDLES[0], args.length, 10.0).prompt_ids
    n_ctx = len(ids)
    if args.child == "full":
        policy = FullPolicy(dense_prefill=False)
    elif args.child == "sink_window":
        policy = SinkWindowPolicy.for_budget(lm.spec, args.budget, n_ctx, dense_prefill=False)
    else:
        if args.child == "retrieval":
            kv = kv_head_scores(DetectionResult.load(args.scores).scores, lm.spec)
        else:
            recs = read_records(Path(args.kv_run) / "records.jsonl")
            kv = np.asarray(next(r["kv_scores"] for r in recs if r.get("ranking") == args.child), dtype=float)
        policy = HeadPolicy.for_budget(lm.spec, args.budget, n_ctx, ranking=kv, name=args.child, dense_prefill=False)
    cache = policy.make_cache(lm.spec)
    base = vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: measure from here
    t0 = time.perf_counter()
    with cache.attached(lm.model), torch.no_grad():
        out = None
        for i in range(0, n_ctx, args.chunk):
            out = lm.model(
                input_ids=torch.tensor([ids[i : i + args.chunk]]), cache=cache, use_cache=True, logits_to_keep=1
            )
        for _ in range(args.new_tokens):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            out = lm.model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
    print(
        json.dumps(
            {
                "policy": args.child,
                "tokens": n_ctx,
                "n_whole": getattr(policy, "n_whole", None),
                "rss_before_mib": base,
                "peak_rss_mib": vm("VmHWM"),
                "cache_mib": cache.nbytes() / 2**20,
                "peak_cache_mib": cache.peak_nbytes() / 2**20,
                "seconds": time.perf_counter() - t0,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scores", default="runs/smollm2-135m", help="detection run (retrieval ranking)")
    p.add_argument("--kv-run", default="runs/kv-4k", help="kv-eval run holding the needle_attention ranking")
    p.add_argument("--policies", default="full,sink_window,retrieval,needle_attention")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    print(
        f"# kv_memory {time.strftime('%Y-%m-%d %H:%M')} model={args.model} length={args.length} "
        f"budget={args.budget} chunk={args.chunk} (streamed prefill, fresh process per policy)\n"
    )
    print("| policy | whole KV heads | cache MiB (measured) | peak RSS MiB | peak rise over loaded model MiB |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for pol in args.policies.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", pol]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"| {pol} | {r['n_whole'] if r['n_whole'] is not None else '-'} | {r['cache_mib']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} |",
            flush=True,
        )
    full = next((r for r in rows if r["policy"] == "full"), None)
    if full:
        for r in rows:
            print(
                f"  {r['policy']}: peak RSS {r['peak_rss_mib'] / full['peak_rss_mib']:.2f} x full, "
                f"cache bytes {r['cache_mib'] / full['cache_mib']:.2f} x full"
            )


if __name__ == "__main__":
    main()
