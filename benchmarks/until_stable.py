"""How many samples `detect --until-stable K` needs, and what it saves against the full grid.

    python benchmarks/until_stable.py runs/smollm2-135m runs/smollm2-135m-stable [--k 10]

Reads two finished run folders of the same model and grid (the full grid, and `--until-stable K`)
and prints: samples run, samples kept, the overlap of the two top-K head sets, and the generation
time, as the sum of the per-sample `seconds` each run recorded (engine time per sample, measured
in each run; wall time of set-up and model loading excluded) and as a ratio. Both runs should have
run on an idle machine for the time ratio to mean anything; the sample counts and the overlap do
not depend on it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retrieval_heads.heads import top_heads
from retrieval_heads.results import DetectionResult


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("full", type=Path)
    ap.add_argument("stable", type=Path)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    full, stable = DetectionResult.load(args.full), DetectionResult.load(args.stable)
    cfg = json.loads((args.stable / "config.json").read_text())
    if "until_stable" not in cfg:
        raise SystemExit(f"{args.stable} is not an --until-stable run")
    a, b = set(top_heads(full.scores, args.k)), set(top_heads(stable.scores, args.k))
    t_full = sum(r["seconds"] for r in full.records)
    t_stable = sum(r["seconds"] for r in stable.records)
    us = cfg["until_stable"]
    print(f"model: {full.name}; --until-stable {us['k']} (Jaccard >= {us['jaccard']})")
    print(f"| run | samples | kept | top-{args.k} overlap with the full grid | generation s (sum of per-sample) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| full grid | {len(full.records)} | {full.n_kept} | {args.k}/{args.k} | {t_full:.0f} |")
    print(f"| until stable | {len(stable.records)} | {stable.n_kept} | {len(a & b)}/{args.k} | {t_stable:.0f} |")
    share = len(stable.records) / len(full.records)
    print(f"samples: {share:.2f} of the grid; time: {t_stable / t_full:.2f} of the full grid")


if __name__ == "__main__":
    main()
