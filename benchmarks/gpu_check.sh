#!/usr/bin/env bash
# The GPU check of issue 14, in one script for a machine with a CUDA device:
#   bash benchmarks/gpu_check.sh            # from the repository root; OUT=dir keeps the outputs
# It prints the versions, runs the CUDA-marked tests (tests/test_devices.py, marker `cuda`), then
# the benchmark's gpu group (loads onto the GPU side by side with safetensors and torch.load), then
# the load_raw group on the machine's CPUs (parallel reads).
# Needs python3 with torch (CUDA build), safetensors, msgpack, numpy, pytest; nothing is installed.
# About 8 minutes at most: each step has its own timeout. SIZE (default 1GB: the model's bytes,
# so the full state is ~3 GB) and REPEAT (default 2) can be set; WORKDIR holds the state files
# (about 5x SIZE on disk; default $TMPDIR/safeckpt-gpu-bench).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d -t safeckpt-gpu-check.XXXX)}"
SIZE="${SIZE:-1GB}"
REPEAT="${REPEAT:-2}"
WORKDIR="${WORKDIR:-${TMPDIR:-/tmp}/safeckpt-gpu-bench}"
mkdir -p "$OUT"
echo "outputs: $OUT"

echo "== versions"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv \
    || echo "nvidia-smi: not available"
  "$PY" - <<'PYEOF'
import importlib, os, sys
print("python", sys.version.split()[0], "cpus", os.cpu_count())
for name in ("torch", "safetensors", "msgpack", "numpy", "psutil", "pytest", "hypothesis", "lightning", "huggingface_hub"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # a missing module only skips what needs it
        print(name, "MISSING:", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
} 2>&1 | tee "$OUT/versions.txt"

echo "== CUDA tests (pytest -m cuda)"
TEST_ARGS=(-p no:cacheprovider -q -m cuda tests/test_devices.py)
"$PY" -c "import pytest_timeout" 2>/dev/null || TEST_ARGS+=(-o "timeout=0")  # ini's timeout needs the plugin
timeout 120 "$PY" -m pytest "${TEST_ARGS[@]}" 2>&1 | tee "$OUT/cuda-tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark: gpu group at --size $SIZE"
timeout 240 "$PY" benchmarks/bench.py --size "$SIZE" --only gpu --repeat "$REPEAT" --warmup 1 \
  --workdir "$WORKDIR" --results-dir "$OUT/results" 2>"$OUT/bench-stderr.txt" | tee "$OUT/bench-gpu.md"
bench_rc=${PIPESTATUS[0]}
tail -5 "$OUT/bench-stderr.txt"

echo "== benchmark: load_raw group on this machine's CPUs (issue 19: reads on several threads where >= 4 cores)"
timeout 150 "$PY" benchmarks/bench.py --size "$SIZE" --only load_raw --repeat 3 --warmup 1 \
  --workdir "$WORKDIR" --results-dir "$OUT/results" 2>>"$OUT/bench-stderr.txt" | tee "$OUT/bench-load_raw.md"

echo "== done: tests exit $tests_rc, benchmark exit $bench_rc (outputs in $OUT)"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
