#!/usr/bin/env bash
# The device check: GPU parity vs transformers, the GPU benchmark, then fused vs three q/k/v GEMMs; results under
# $OUT (or ./gpu-results).
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
# fused q/k/v vs three GEMMs (so400m-384, 27 layers, batch 64, bf16; 1 GPU, and 2 GPUs when present): seconds
python benchmarks/fused_qkv.py --device cuda --json "$OUT/fused.json" > "$OUT/fused.md" 2> "$OUT/fused.log"
cat "$OUT/fused.md"
