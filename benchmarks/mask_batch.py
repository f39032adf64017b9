"""Masking experiments: the conditions of a prompt decoded one after the other vs as one batch.

    python benchmarks/mask_batch.py                                  # SmolLM2, extractive QA, 4 documents
    python benchmarks/mask_batch.py --model gemma3-270m --scores docs/runs/gemma3-270m --pool non-retrieval

One task-eval run per contender, in this process, on the same model: `--mask-phase decode`, the top
K retrieval heads, `--draws` random draws and no mask (K + draws + 1 conditions per document).
`--batch-size 1` decodes the conditions one after the other from the shared prefill; the default
decodes them as the rows of one batch. Printed per contender: the seconds of the whole run (model
loaded once before both; prefill included), the ratio to one-at-a-time, and whether every record
(tokens, answer, scores) equals the one-at-a-time run's. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scores", default="docs/runs/smollm2-135m", help="detection run folder or score file")
    ap.add_argument("--task", default="extractive-qa")
    ap.add_argument("--limit", type=int, default=4, help="documents")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--pool", default="layer-matched")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    from retrieval_heads import load_model
    from retrieval_heads.experiments.task_eval import TaskEvalConfig, task_eval
    from retrieval_heads.results import DetectionResult

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    scores = DetectionResult.load(args.scores)
    base = {
        "task": args.task,
        "ks": (0, args.k),
        "random_seeds": tuple(range(args.draws)),
        "random_pool": args.pool,
        "phase": "decode",
        "limit": args.limit,
    }
    rows = {}
    for label, batch in (("one at a time", 1), ("one batch", None)):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            cfg = TaskEvalConfig(**base, batch_size=batch)
            res = task_eval(lm, scores, cfg, out=Path(d) / "run", show_progress=False)
            seconds = time.perf_counter() - t0
        records = [{k: v for k, v in r.items() if k != "seconds"} for r in res.records]
        rows[label] = {"seconds": round(seconds, 1), "records": records, "batch_size": res.config.get("batch_size")}
    one = rows["one at a time"]
    n_cond = args.draws + 2
    print(f"{args.model}, {args.task}, {args.limit} documents x {n_cond} conditions, K = {args.k}, decode phase")
    print("| conditions decoded | batch size | seconds | over one at a time | records equal |")
    print("|---|---:|---:|---:|---|")
    for label, r in rows.items():
        same = r["records"] == one["records"]
        print(f"| {label} | {r['batch_size']} | {r['seconds']} | {r['seconds'] / one['seconds']:.2f} | {same} |")
    print(f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.json:
        summary = {k: {"seconds": v["seconds"], "batch_size": v["batch_size"]} for k, v in rows.items()}
        args.json.write_text(json.dumps({**vars(args), "json": str(args.json), "results": summary}, indent=1))


if __name__ == "__main__":
    main()
