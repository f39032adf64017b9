"""benchmarks/gpu_check.sh: one skip line and exit 0 without a GPU; its code runs on a tiny model."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_without_cuda_it_prints_one_skip_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # no GPU, even on a GPU machine
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: SKIPPED") and "no CUDA GPU" in lines[0]


def test_every_part_runs_on_a_tiny_model_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--device", "cpu", "--tiny", "--dtypes", "float32", "--new-tokens", "2", "--grid-depths", "50"]
    assert mod.main(args) == 0
    out = capsys.readouterr().out
    for part in ("fast vs reference", "batch 8 vs batch 1", "detection throughput", "kv-eval bytes", "done in"):
        assert part in out, part
    assert "generations 6/6 equal (1.00)" in out and "skipped" not in out
