#!/usr/bin/env bash
# The GPU check, in one device call: `bash benchmarks/gpu.sh` with `.whl` carried (docs/gpu-check.md).
#
# The lent GPU machine reaches no network and lacks pydantic. So this script installs nothing from an index:
# it unpacks the wheelhouse that benchmarks/gpu_wheels.sh prepared (.whl/) into a target folder with
# `pip install --no-index --no-deps --target`, puts that folder and src/ on PYTHONPATH (no install of
# tp-siglip, so no build, isolated or not), and uses the machine's own torch and transformers.
# Steps, most important first, each under `timeout` and within one overall deadline, so that a hang or a
# cut-off keeps what came before:
#   versions    python, torch, CUDA, GPU, transformers, huggingface_hub, tp_siglip, pydantic (and where from)
#   syncs       the forward, plain and with its batch split by rows, under torch.cuda.set_sync_debug_mode("error")
#               on min(2, GPUs) NCCL ranks; host-sync ops and device-group bytes per forward (collectives.py)
#   collectives the collectives and bytes per forward counted on 2 and 3 ranks of the torch.distributed path
#               (gloo on the CPU: one lent GPU cannot hold two NCCL ranks; on 2+ GPUs the syncs step counts NCCL's)
#   parity      fp32/bf16 vs transformers                        (gpu_parity.py)       -> parity.json
#   throughput  so400m-384, base-224, bf16, batch 1/32/128: eager, CUDA graph, torch.compile, transformers;
#               img/s, MFU vs the measured bf16 GEMM peak, peak memory per cell (gpu_throughput.py) -> throughput.json
#   pipeline    the corpus job vs model-only img/s, 8 and 14 decode workers (pipeline.py, only if present)
#   memory      peak-memory table of the throughput cells
#   fused       fused q/k/v vs three GEMMs (fused_qkv.py)                              -> fused.json
# Files under $OUT (default ./gpu-results): summary.md (every step's stdout: tables), log.txt (progress, stderr),
# versions.txt and the JSON files above; 7 files at most, flat.
# A failing step does not stop the later ones; the exit status is 1 when any step failed.
#
# Rehearsal knobs (the CPU rehearsal, benchmarks/gpu_rehearsal.sh, sets them): TP_SIGLIP_GPU_DEVICE (cuda),
# TP_SIGLIP_GPU_QUICK=1 (tiny sizes), TP_SIGLIP_GPU_STEPS (comma list of the steps above),
# TP_SIGLIP_GPU_BUDGET_S (450: the overall deadline), TP_SIGLIP_GPU_PIPELINE_ARGS (replaces pipeline.py's
# --images/--workers), TP_SIGLIP_WHEELS (.whl), TP_SIGLIP_SITE (/tmp/site), PYTHON.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE="${TP_SIGLIP_GPU_DEVICE:-cuda}"
QUICK="${TP_SIGLIP_GPU_QUICK:-0}"
STEPS="${TP_SIGLIP_GPU_STEPS:-syncs,collectives,parity,throughput,pipeline,memory,fused}"
DEADLINE=$(( SECONDS + ${TP_SIGLIP_GPU_BUDGET_S:-450} ))
WHEELS="${TP_SIGLIP_WHEELS:-.whl}"
SITE="${TP_SIGLIP_SITE:-/tmp/site}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
SUMMARY="$OUT/summary.md"
LOG="$OUT/log.txt"
STATUS=()

# step NAME SECONDS CMD...: run CMD under timeout (capped by the deadline), stdout to summary.md, stderr to log.txt
step() {
    local name=$1 limit=$2 left rc start
    shift 2
    case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
    left=$(( DEADLINE - SECONDS ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then
        STATUS+=("$name: skipped, past the deadline")
        return 0
    fi
    printf '\n## %s\n\n' "$name" | tee -a "$SUMMARY"
    start=$SECONDS
    timeout -k 5 "$limit" "$@" > >(tee -a "$SUMMARY") 2> >(tee -a "$LOG" >&2)
    rc=$?
    sleep 0.2  # let the tee processes flush before the next heading
    STATUS+=("$name: rc $rc in $(( SECONDS - start )) s (limit $limit s)$( (( rc == 124 || rc == 137 )) && echo ', TIMED OUT')")
}

echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE$( [ "$QUICK" = 1 ] && echo ', quick sizes')" | tee "$SUMMARY"
: > "$LOG"

# 1. the wheelhouse: no index, no dependencies, no build
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        2>&1 | tee -a "$LOG"; then  # no usable pip: a wheel is a zip archive, unpacking it is enough to import from it
        echo "pip install --target failed; unpacking the wheels into $SITE instead" | tee -a "$SUMMARY"
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' "$SITE" "$WHEELS"/*.whl
    fi
    export PYTHONPATH="$SITE:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in $WHEELS (bash benchmarks/gpu_wheels.sh prepares them); using what is installed" | tee -a "$SUMMARY"
    export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. versions first: they say what every later number ran on
"$PY" benchmarks/gpu_versions.py 2>&1 | tee "$OUT/versions.txt" | tee -a "$SUMMARY"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    2>&1 | tee -a "$OUT/versions.txt" | tee -a "$SUMMARY"
if ! "$PY" -c "import tp_siglip" 2>> "$LOG"; then
    echo "import tp_siglip failed (log.txt): is the wheelhouse there, for this Python? Stopping." | tee -a "$SUMMARY"
    exit 2
fi

if [ "$QUICK" = 1 ]; then
    parity_args=(--layers 1 --batch 1)
    throughput_args=(--quick --no-compile)
    pipeline_args=(--images 8 --workers 1,2 --repeats 1 --quick)  # on the CPU: its smoke run (~25 s; 75 s allowed)
    fused_args=(--quick)
    schedule_args=(--quick --worlds 2)
else
    parity_args=()
    throughput_args=(--budget-s 135)
    pipeline_args=(--images 512 --workers 8,14)
    fused_args=()
    schedule_args=()
fi
if [ -n "${TP_SIGLIP_GPU_PIPELINE_ARGS:-}" ]; then  # e.g. another image count; word-split on purpose
    read -r -a pipeline_args <<< "$TP_SIGLIP_GPU_PIPELINE_ARGS"
fi
step syncs 45 "$PY" benchmarks/collectives.py --device "$DEVICE" "${schedule_args[@]}"
if [ "$DEVICE" != cpu ]; then  # on the CPU the syncs step has counted them already
    step collectives 25 "$PY" benchmarks/collectives.py --device cpu
fi
step parity 80 "$PY" benchmarks/gpu_parity.py --device "$DEVICE" --json "$OUT/parity.json" "${parity_args[@]}"
step throughput 150 "$PY" benchmarks/gpu_throughput.py --device "$DEVICE" --json "$OUT/throughput.json" "${throughput_args[@]}"
if [ -f benchmarks/pipeline.py ]; then
    step pipeline 75 "$PY" benchmarks/pipeline.py --device "$DEVICE" --geometry so400m-384 --dtype bfloat16 \
        --json "$OUT/pipeline.json" "${pipeline_args[@]}"
else
    STATUS+=("pipeline: skipped, no benchmarks/pipeline.py in this tree")
fi
[ -f "$OUT/throughput.json" ] && step memory 15 "$PY" benchmarks/gpu_throughput.py --report "$OUT/throughput.json"
step fused 60 "$PY" benchmarks/fused_qkv.py --device "$DEVICE" --json "$OUT/fused.json" "${fused_args[@]}"

printf '\n## steps\n\n' | tee -a "$SUMMARY"
failed=0
for line in "${STATUS[@]}"; do
    echo "- $line" | tee -a "$SUMMARY"
    case "$line" in *": rc 0 "*|*skipped*) ;; *) failed=1 ;; esac
done
echo "- total: $SECONDS s" | tee -a "$SUMMARY"
exit "$failed"
