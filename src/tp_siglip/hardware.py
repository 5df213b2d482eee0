"""What the CPU does natively, and one warning when half precision would run emulated on it.

bfloat16 or float16 on a CPU without instructions for them makes PyTorch convert every element to float32 and
back around each operation, several times slower than float32 (measured: docs/benchmarks.md).
:func:`warn_if_emulated_half` logs that once per process.

Choices made:

* **Where the facts come from.** On Linux, the ``flags`` (x86) or ``Features`` (Arm) line of
  ``/proc/cpuinfo``: bf16 is native with ``avx512_bf16`` or ``amx_bf16`` (x86) or ``bf16`` (Arm); fp16 with
  ``avx512_fp16`` or ``amx_fp16`` (x86) or ``asimdhp``/``fphp`` (Arm). Elsewhere (macOS, Windows) PyTorch's
  own probes (``torch.cpu._is_avx512_bf16_supported`` and friends, built on the cpuinfo library) when this
  torch has them, and on macOS the ``hw.optional.arm.FEAT_BF16`` / ``FEAT_FP16`` sysctls. When nothing
  answers, the CPU counts as not native: the warning then says "could not tell" and costs one log line.
* **Read once.** The CPU does not change while the process runs, so :func:`cpu_info` caches its answer
  (tests clear it with ``cpu_info.cache_clear()``).
* **Once per process.** The first emulated-half case logs one ``WARNING`` through ``logging``; later calls
  return ``False`` silently, so a library call and a command-line call never repeat it.
"""

from __future__ import annotations

import functools
import logging
import platform
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["CpuInfo", "cpu_has_native_bf16", "cpu_has_native_fp16", "cpu_info", "warn_if_emulated_half"]

logger = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp", "fphp"})
#: measured figures quoted by the warning (AVX2-only AMD EPYC, SigLIP tower, images/s)
MEASURED_HALF, MEASURED_FP32 = 0.49, 3.3

_warned = False
_lock = threading.Lock()


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's name and instruction-set flags (``flags`` is ``None`` when the platform does not list them)."""

    model: str
    flags: Optional[frozenset[str]]
    source: str


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """The CPU's model name and flags, from ``/proc/cpuinfo`` when it exists (cached)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuInfo(_fallback_model_name(), None, "platform")
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model", "processor") and not model and not value.strip().isdigit():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(model or _fallback_model_name(), frozenset(flags) if flags else None, str(CPUINFO))


def _fallback_model_name() -> str:
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic instructions (``avx512_bf16``/``amx_bf16`` on x86, ``bf16`` on Arm)."""
    info = cpu_info()
    if info.flags is not None:
        return bool(info.flags & BF16_FLAGS)
    return _torch_probe("_is_avx512_bf16_supported") or _sysctl_flag("hw.optional.arm.FEAT_BF16")


def cpu_has_native_fp16() -> bool:
    """Whether the CPU has float16 arithmetic instructions (``avx512_fp16``/``amx_fp16`` on x86, ``asimdhp`` on Arm)."""
    info = cpu_info()
    if info.flags is not None:
        return bool(info.flags & FP16_FLAGS)
    return _torch_probe("_is_amx_fp16_supported") or _sysctl_flag("hw.optional.arm.FEAT_FP16")


def _torch_probe(name: str) -> bool:
    """Ask one of torch.cpu's private cpuinfo probes; ``False`` when this torch does not have it."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if callable(probe) else False
    except Exception:  # a private helper: any failure means "cannot tell"
        return False


def _sysctl_flag(name: str) -> bool:
    """``sysctl -n name`` == 1 on macOS; ``False`` anywhere else or on any failure."""
    if platform.system() != "Darwin":
        return False
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


def warn_if_emulated_half(device: Union[torch.device, str], dtype: torch.dtype) -> bool:
    """Log one warning (once per process) when ``dtype`` on ``device`` would run emulated on this CPU.

    Only bfloat16 and float16 on a CPU device are concerned. Returns whether this call logged the warning.
    """
    device = torch.device(device)
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    native = cpu_has_native_bf16() if dtype == torch.bfloat16 else cpu_has_native_fp16()
    if native:
        return False
    global _warned
    with _lock:
        if _warned:
            return False
        _warned = True
    info = cpu_info()
    name = str(dtype).removeprefix("torch.")
    wanted = "avx512_bf16/amx_bf16 (x86) or bf16 (Arm)" if dtype == torch.bfloat16 else "avx512_fp16/amx_fp16 (x86) or asimdhp (Arm)"
    known = "lacks" if info.flags is not None else "could not tell whether it has"
    logger.warning(
        "%s on this CPU (%s) runs emulated: the CPU %s %s instructions, so expect the model to run about %.0fx "
        "slower than in float32 (measured %.2f vs %.1f images/s on an AVX2-only CPU). Use float32 instead: "
        "dtype=torch.float32 in from_pretrained, --dtype float32 for tp-siglip encode.",
        name,
        info.model,
        known,
        wanted,
        MEASURED_FP32 / MEASURED_HALF,
        MEASURED_HALF,
        MEASURED_FP32,
    )
    return True
