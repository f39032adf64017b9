#!/usr/bin/env bash
# One prepared GPU check (issue 15), under 8 minutes on one GPU: fast vs reference equality in
# float32 and bfloat16, batched vs batch 1, detection throughput vs plain generate, kv-eval bytes
# on CUDA, printed as ratios. Without a GPU it prints one skip line and exits 0.
# The work is in gpu_check.py; arguments are passed on (e.g. --budget-s 300).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec timeout 470 "$PY" benchmarks/gpu_check.py "$@"
