#!/usr/bin/env bash
# The device check: GPU parity vs transformers, then the GPU benchmark; results under $OUT (or ./gpu-results).
# Meant for the lent GPU machine: `bash benchmarks/gpu.sh` (it installs the package without touching torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -c "import transformers" 2>/dev/null || python -m pip install -q "transformers>=4.47" 2>&1 | tail -2
python -m pip install -q --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python benchmarks/gpu_parity.py --device cuda --json "$OUT/parity.json" 2>&1 | tee "$OUT/parity.log"
python benchmarks/bench.py --device cuda --json "$OUT/bench.json" > "$OUT/bench.md" 2> "$OUT/bench.log"
cat "$OUT/bench.md"
