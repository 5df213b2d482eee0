"""What machine a benchmark ran on: CPU model and flags, cores, memory, load, library versions, GPU.

`machine_info` gathers it (from ``/proc`` where present, ``platform`` otherwise) and `header` renders
the lines printed above the table. The load average is read at start and again at the end (the CPU
may be shared with other processes: a load above the core count means the timings were disturbed).
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from benchmarks.options import Options

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def _cpu_info() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    cores = set(re.findall(r"^physical id\s*:\s*(\d+)\s*$.*?^core id\s*:\s*(\d+)\s*$", cpuinfo, re.M | re.S))
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        memory_gb = round(int(mem.group(1)) / 1024**2, 1) if mem else None
    except OSError:
        memory_gb = None
    return {
        "cpu": names[0].strip() if names else platform.processor() or platform.machine(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "physical_cores": len(cores) or None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gb": memory_gb,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info(opts: Options) -> dict[str, Any]:
    info = _cpu_info()
    info["load_average"] = load_average()
    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    import tp_siglip

    info["tp_siglip"] = getattr(tp_siglip, "__version__", "?")
    info["threads"] = opts.threads
    info["device"] = str(opts.device)
    if opts.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def header(info: dict[str, Any], opts: Options) -> str:
    lines = [
        "# tp-siglip benchmark",
        "",
        f"- CPU: {info['cpu']} ({info['physical_cores'] or '?'} cores, {info['logical_cpus']} logical, "
        f"{info['usable_cpus']} usable; {', '.join(info['isa']) or 'no AVX flags'}), {info['memory_gb']} GB RAM, "
        f"load average {info['load_average'][0]} at start",
        f"- torch {info['torch']}, transformers {info['transformers']}, tp-siglip {info['tp_siglip']}, "
        f"Python {info['python']}; intra-op threads {info['threads']}; device {info['device']}",
    ]
    if "gpu" in info:
        lines.append(f"- GPU: {info['gpu']} x {info['gpus']}, CUDA {info['cuda']}")
    quick = "; QUICK smoke run: timings are not meaningful" if opts.quick else ""
    lines.append(f"- sections: {', '.join(opts.sections)}{quick}")
    return "\n".join(lines)
