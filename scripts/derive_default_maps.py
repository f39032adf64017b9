"""Ship the copy-score maps of our own default detection runs (SmolLM2-135M-Instruct, Gemma3-270M)
as reference maps, so that `retrieval-heads attribute` works without a detection run:

    python scripts/derive_default_maps.py docs/runs/smollm2-135m docs/runs/gemma3-270m \
        --out src/retrieval_heads/data/reference

Reads each run folder's `summary.json` (copy score and activation frequency per head, kept-sample
count) and `config.json` (model, date, machine, grid) and writes `<model>.json` in the format of
`retrieval_heads.reference` ("retrieval-heads reference map v1"), with the provenance: the run
folder, the repository commit at derivation time, the SHA-256 of the summary it was derived from,
and the run's date and grid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

FORMAT = "retrieval-heads reference map v1"


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def derive(run: Path) -> dict:
    raw = (run / "summary.json").read_bytes()
    summary = json.loads(raw)
    config = json.loads((run / "config.json").read_text())
    if summary.get("score") != "copy":
        raise SystemExit(f"{run}: the summary's score is {summary.get('score')!r}, not the copy score")
    scores, freq = summary["scores"], summary["activation_frequency"]
    if any(x is None for row in scores for x in row):
        raise SystemExit(f"{run}: some heads are not scored (no kept sample?)")
    n_layers, n_heads = summary["shape"]
    return {
        "format": FORMAT,
        "name": config["model"],
        "score": "copy_paste",
        "source": "retrieval-heads default detection run",
        "repository": None,
        "path": f"{run.as_posix()}/summary.json",
        "commit": commit(),
        "raw_sha256": hashlib.sha256(raw).hexdigest(),
        "run_created": config.get("created"),
        "run_grid": config.get("grid"),
        "run_machine": config.get("machine"),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": config["model_spec"]["n_kv_heads"],
        "shape_source": f"model_spec in {run.as_posix()}/config.json (the detection run's model config)",
        "n_kept": summary["n_kept"],
        "retrieval_score": [[float(x) for x in row] for row in scores],
        "activation_frequency": [[float(x) for x in row] for row in freq],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="detection run folders (or their docs/runs snapshots)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        d = derive(run)
        path = args.out / f"{d['name']}.json"
        path.write_text(json.dumps(d, separators=(",", ":")) + "\n")
        print(f"{run} -> {path}")


if __name__ == "__main__":
    main()
