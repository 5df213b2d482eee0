#!/usr/bin/env bash
# Prepare the wheelhouse the GPU check needs, on a machine that reaches the package registry.
#
# The lent GPU machine reaches no network. Its Python 3.12 already has torch, transformers, huggingface_hub,
# safetensors, numpy, filelock, tqdm, pillow and pyarrow, but no pydantic, which `import tp_siglip` needs. This
# downloads, without dependencies and as binary wheels only, the few packages it lacks, pinned to versions that
# work together (pydantic 2.13.4 requires exactly pydantic-core 2.46.4 and typing-extensions >= 4.14.1; the
# machine's typing-extensions is of unknown version, so a recent one comes along: it is backward compatible).
# benchmarks/gpu.sh installs them there with `pip install --no-index --no-deps --target`.
#
#   bash benchmarks/gpu_wheels.sh                 # CPython 3.12, manylinux x86-64, into .whl/ (what the device needs)
#   TP_SIGLIP_WHEEL_PYTHON=3.11 TP_SIGLIP_WHEEL_DIR=/tmp/w bash benchmarks/gpu_wheels.sh   # the CPU rehearsal's
#
# Choices: only pydantic-core is compiled (one cp3XX wheel per Python), the others are py3-none-any; any wheel
# of another version of these packages already in the folder is removed first, since two versions of one
# package stop the whole install there. Prints the folder's wheels and their size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${TP_SIGLIP_WHEEL_PYTHON:-3.12}"
dir="${TP_SIGLIP_WHEEL_DIR:-.whl}"
pins=(
    "pydantic==2.13.4"
    "pydantic-core==2.46.4"
    "annotated-types==0.7.0"
    "typing-inspection==0.4.2"
    "typing-extensions==4.15.0"
)
mkdir -p "$dir"
for pin in "${pins[@]}"; do  # drop other versions of the same packages (and other Pythons' builds)
    name="${pin%%==*}"
    version="${pin##*==}"
    for old in "$dir/${name//-/_}"-*.whl; do
        [ -e "$old" ] || continue
        case "$(basename "$old")" in
            *-cp3*-cp3*) [[ "$(basename "$old")" == "${name//-/_}-$version-cp${py//./}-"* ]] || rm -f "$old" ;;
            "${name//-/_}-$version-"*) ;;
            *) rm -f "$old" ;;
        esac
    done
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${platforms[@]}" -d "$dir" "${pins[@]}"
count=$(find "$dir" -maxdepth 1 -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#pins[@]}" ]; then
    echo "gpu_wheels.sh: expected ${#pins[@]} wheels in $dir, found $count" >&2
    exit 1
fi
ls -1 "$dir"/*.whl
echo "wheelhouse $dir for CPython $py: $count wheels, $(du -sh "$dir" | cut -f1)"
