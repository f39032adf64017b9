"""Derive the compact reference score maps shipped in `retrieval_heads/data/reference/` from the
raw published score files.

    python scripts/derive_reference.py RAW_DIR [RAW_DIR ...] --out src/retrieval_heads/data/reference

Raw files: the authors' `head_score/*.json` (github nightdessert/Retrieval_Head, commit
7ea1f00a85825f0b3619a233f924c698b9d03a9f) and HeadKV's `*.json` (github FYYFU/HeadKV, published
with arXiv 2410.19258). Each raw file is `{"<layer>-<head>": [score of each kept sample]}`; the
compact map keeps, per head, the mean (the retrieval score), the share of kept samples with a
non-zero score (activation frequency) and the number of kept samples, plus the raw file's SHA-256
so the derivation can be checked against a fresh download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

SOURCES = {
    "official_head_scores": {
        "source": "authors",
        "repository": "nightdessert/Retrieval_Head",
        "folder": "head_score",
        "commit": "7ea1f00a85825f0b3619a233f924c698b9d03a9f",
    },
    "headkv_head_scores": {"source": "HeadKV", "repository": "FYYFU/HeadKV", "folder": "", "commit": None},
}
# The score files name layers and query heads only; the KV-head count (grouped-query attention) comes
# from each model's published config.json (num_key_value_heads) and is what KV-cache exports need.
KV_HEADS = {
    "llama-2-7b-80k": (32, "config.json of meta-llama/Llama-2-7b-hf (the 80K model continues its pretraining)"),
    "llama-2-13b-64k": (40, "config.json of meta-llama/Llama-2-13b-hf (the 64K model continues its pretraining)"),
    "Mistral-7B-v0.2-hf": (8, "config.json of mistral-community/Mistral-7B-v0.2"),
    "Mixtral-8x7B-v0.1": (8, "config.json of mistralai/Mixtral-8x7B-v0.1"),
    "Yi-6B-200K": (4, "config.json of 01-ai/Yi-6B-200K"),
    "Qwen1.5-14B": (40, "config.json of Qwen/Qwen1.5-14B"),
    "Qwen1.5-14B-Chat": (40, "config.json of Qwen/Qwen1.5-14B-Chat"),
    "Mistral-7B-Instruct-v0.2": (8, "config.json of mistralai/Mistral-7B-Instruct-v0.2"),
    "Meta-Llama-3-8B-Instruct": (8, "config.json of meta-llama/Meta-Llama-3-8B-Instruct"),
}


def derive(path: Path) -> dict:
    raw = path.read_bytes()
    obj = json.loads(raw)
    heads = {tuple(int(x) for x in k.split("-")): v for k, v in obj.items()}
    n_layers = max(layer for layer, _ in heads) + 1
    n_heads = max(head for _, head in heads) + 1
    mean = np.full((n_layers, n_heads), np.nan)
    freq = np.full((n_layers, n_heads), np.nan)
    counts = set()
    for (layer, head), vals in heads.items():
        a = np.asarray(vals, dtype=float)
        mean[layer, head] = a.mean()
        freq[layer, head] = (a > 0).mean()
        counts.add(a.size)
    if len(counts) != 1:
        raise SystemExit(f"{path}: heads have different sample counts {sorted(counts)}")
    src = SOURCES.get(
        path.parent.name, {"source": path.parent.name, "repository": None, "folder": None, "commit": None}
    )
    kind = "retrieval_reasoning" if path.stem.endswith("_retrieval_reasoning") else "copy_paste"
    n_kv_heads, shape_source = KV_HEADS[path.stem.removesuffix("_retrieval_reasoning")]
    return {
        "format": "retrieval-heads reference map v1",
        "name": path.stem,
        "score": kind,
        "source": src["source"],
        "repository": src["repository"],
        "path": f"{src['folder']}/{path.name}" if src["folder"] else path.name,
        "commit": src["commit"],
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "shape_source": shape_source,
        "n_kept": counts.pop(),
        "retrieval_score": [[float(x) for x in row] for row in mean],
        "activation_frequency": [[float(x) for x in row] for row in freq],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", nargs="+", type=Path, help="folders of raw score files")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in args.raw:
        for f in sorted(folder.glob("*.json")):
            d = derive(f)
            (args.out / f"{f.stem}.json").write_text(json.dumps(d, separators=(",", ":")) + "\n")
            print(f"{f.stem}: {d['n_layers']}x{d['n_heads']} ({d['n_kv_heads']} KV heads), {d['n_kept']} kept samples")


if __name__ == "__main__":
    main()
