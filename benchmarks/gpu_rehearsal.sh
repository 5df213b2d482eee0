#!/usr/bin/env bash
# The GPU check's CPU rehearsal: benchmarks/gpu.sh as the lent GPU machine would run it, but on this CPU.
#
#   bash benchmarks/gpu_rehearsal.sh          # needs the package registry once (the wheelhouse); ~1 min on 2 cores
#
# What it proves: gpu.sh needs no network and no pydantic besides the wheelhouse, builds nothing, installs
# neither torch nor transformers, and gets through its versions, parity and throughput steps to printed figures.
# How it stands in for that machine:
#   - the wheelhouse is made by gpu_wheels.sh for this Python's version (the device gets CPython 3.12's);
#   - a venv made with --system-site-packages --without-pip sees this machine's torch and transformers (as the
#     device has its own), but a meta-path finder that a .pth file installs in the venv hides the system's
#     pydantic, pydantic_core, annotated_types and typing_inspection: they import only from elsewhere on
#     sys.path, i.e. from the wheelhouse's target folder. The script first checks that `import pydantic` fails;
#   - gpu.sh runs under `env -i` with PIP_NO_INDEX=1, PIP_CONFIG_FILE=/dev/null (no find-links or extra index),
#     HF_HUB_OFFLINE=1, proxies pointing at a closed local port and a fresh HOME;
#   - the device is the CPU (TP_SIGLIP_GPU_DEVICE=cpu) at quick sizes (TP_SIGLIP_GPU_QUICK=1: 1 layer, batch 1/2,
#     no torch.compile, CUDA graph rows say "not run"), every step gpu.sh has (pipeline only once
#     benchmarks/pipeline.py exists; TP_SIGLIP_GPU_PIPELINE_ARGS can shrink it).
# Then it checks summary.md: pydantic came from the wheelhouse, tp_siglip from this tree, parity.json says ok,
# throughput rows were printed and fused.json written. Exit status 0 only if all of that holds.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)
start=$SECONDS
PY="${PYTHON:-python}"
work=$(cd "$(mktemp -d "${TMPDIR:-/tmp}/tp-siglip-rehearsal.XXXXXX")" && pwd -P)
trap 'rm -rf "$work"' EXIT
version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTHON="$PY" TP_SIGLIP_WHEEL_PYTHON=$version TP_SIGLIP_WHEEL_DIR="$work/wheels" bash benchmarks/gpu_wheels.sh 2>&1 | grep -v '^WARNING: Location'

"$PY" -m venv --system-site-packages --without-pip "$work/venv"
venv_site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
hidden_dirs=$("$work/venv/bin/python" - <<'PY'
import importlib.util, os
found = set()
for name in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection"):
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin:
        found.add(os.path.realpath(os.path.dirname(os.path.dirname(spec.origin))))
print(repr(sorted(found)))
PY
)
cat > "$venv_site/_tp_siglip_hide.py" <<PY
"""GPU-check rehearsal only: the system's pydantic (and its helpers) cannot be imported from ${hidden_dirs}."""
import importlib.machinery
import os
import sys

HIDDEN = {"pydantic", "pydantic_core", "annotated_types", "typing_inspection"}
SYSTEM = set(${hidden_dirs})


class HideSystemPydantic:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if path is not None or name not in HIDDEN:
            return None
        allowed = [p for p in sys.path if os.path.realpath(p or ".") not in SYSTEM]
        spec = importlib.machinery.PathFinder.find_spec(name, allowed)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (the rehearsal hides the system's)", name=name)
        return spec


sys.meta_path.insert(0, HideSystemPydantic)
PY
echo "import _tp_siglip_hide" > "$venv_site/_tp_siglip_hide.pth"

offline=(env -i "PATH=$work/venv/bin:/usr/local/bin:/usr/bin:/bin" "HOME=$work/home" "TMPDIR=$work"
         PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
         http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9
         HTTPS_PROXY=http://127.0.0.1:9 ALL_PROXY=http://127.0.0.1:9 "OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}")
if "${offline[@]}" python3 -c "import pydantic" 2> /dev/null; then
    echo "rehearsal: pydantic is importable in the venv; the hiding failed" >&2
    exit 1
fi
echo "rehearsal: pydantic hidden in the venv ($hidden_dirs); running gpu.sh offline on the CPU"
rc=0
"${offline[@]}" OUT="$work/out" TP_SIGLIP_GPU_DEVICE=cpu TP_SIGLIP_GPU_QUICK=1 \
    TP_SIGLIP_WHEELS="$work/wheels" TP_SIGLIP_SITE="$work/site" bash benchmarks/gpu.sh || rc=$?

summary="$work/out/summary.md"
problems=()
grep -q "^pydantic: 2.* ($work/site)" "$summary" || problems+=("pydantic did not come from the wheelhouse")
grep -q "^tp_siglip: .* ($repo/src)" "$summary" || problems+=("tp_siglip did not come from $repo/src")
grep -q '"ours_fp32_max_diff"' "$summary" || problems+=("no parity figures printed")
grep -q '"ok": true' "$work/out/parity.json" 2> /dev/null || problems+=("parity.json missing or not ok")
grep -q '| ours | [0-9]' "$summary" || problems+=("no throughput rows printed")
grep -q '| 2 | split | 1\.[0-9]* | 1\.[0-9]* | 0 | 1 | 0 |' "$summary" || problems+=("no schedule rows (syncs step) printed")
[ -s "$work/out/fused.json" ] || problems+=("no fused.json")
(( rc == 0 )) || problems+=("gpu.sh exited with $rc")
if (( ${#problems[@]} )); then
    printf 'rehearsal FAILED: %s\n' "${problems[@]}" >&2
    exit 1
fi
echo "rehearsal passed in $(( SECONDS - start )) s: gpu.sh ran offline with the wheelhouse's pydantic"
