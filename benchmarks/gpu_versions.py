"""What the GPU check runs on, printed first by benchmarks/gpu.sh: one ``name: value`` line each.

Python, torch (and its CUDA build), the GPU (name, memory, multiprocessors) or "none", transformers,
huggingface_hub, safetensors, numpy, tp_siglip and pydantic, each package with the folder it was imported
from, so that the summary shows pydantic came from the wheelhouse and tp_siglip from this tree's src/.
Choices: every package is imported (not read from metadata: tp_siglip runs from src/ uninstalled); a
package that fails to import prints its error instead of stopping the report.
"""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path

PACKAGES = ("torch", "transformers", "huggingface_hub", "safetensors", "numpy", "tp_siglip", "pydantic")


def package_line(name: str) -> str:
    """``name: version (folder)`` or ``name: not importable (error)``."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # the report goes on; gpu.sh stops after it if tp_siglip is missing
        return f"{name}: not importable ({type(error).__name__}: {error})"
    where = Path(getattr(module, "__file__", None) or "?").resolve().parent.parent
    return f"{name}: {getattr(module, '__version__', '?')} ({where})"


def gpu_lines() -> list[str]:
    import torch

    lines = [f"torch CUDA build: {torch.version.cuda}", f"cuda available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"gpu: {props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, "
                     f"capability {props.major}.{props.minor}, {torch.cuda.device_count()} device(s)")
    else:
        lines.append("gpu: none")
    return lines


def main() -> int:
    print(f"python: {platform.python_version()} ({sys.executable}), {platform.machine()}")
    lines = [package_line(name) for name in PACKAGES]
    print(*lines, sep="\n")
    if not lines[0].startswith("torch: not"):
        print(*gpu_lines(), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
