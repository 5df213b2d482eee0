"""The facts a bug report needs, as printed by ``tp-siglip env``.

:func:`environment` collects them in a fixed order (versions, platform, CPU, GPU, caches, settings) and
:func:`format_environment` lays them out as a Markdown list to paste into an issue.

Choices made: package versions come from ``importlib.metadata`` (no import of optional packages such as
transformers, which is slow and may print); torch is imported because its CUDA and NCCL facts need it.
Tokens are never printed, only whether one is set. The Hugging Face cache is the folder tp-siglip's
loader uses: ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else
huggingface_hub's default; tp-siglip's vision-tower cache lives in its ``tp-siglip`` sub-folder.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["ALWAYS_SHOWN", "ENV_VARS", "environment", "format_environment"]

PACKAGES = ("torch", "huggingface_hub", "safetensors", "pydantic", "numpy", "pillow", "tqdm", "transformers")
#: printed always: where models come from
ALWAYS_SHOWN = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
#: printed when set: settings that change downloads, how ranks start, or how many threads run
ENV_VARS = (
    *ALWAYS_SHOWN,
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "HF_HUB_DISABLE_XET",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "TP_SIGLIP_PG_TIMEOUT_S",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _hub_cache() -> str:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    try:
        from huggingface_hub import constants
    except ImportError:
        return "unknown (huggingface_hub is not installed)"
    return str(constants.HF_HUB_CACHE)


def _torch_facts() -> dict[str, str]:
    import torch

    facts = {"torch": torch.__version__, "torch threads": str(torch.get_num_threads())}
    facts["CUDA build"] = torch.version.cuda or "none (CPU-only torch)"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        facts["GPUs"] = f"{len(names)}: " + ", ".join(names)
        try:
            facts["NCCL"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as err:  # NCCL missing from the build, or no driver
            facts["NCCL"] = f"unavailable ({type(err).__name__})"
    else:
        facts["GPUs"] = "none visible"
    distributed = torch.distributed.is_available()
    facts["torch.distributed"] = "available" if distributed else "not available"
    if distributed:
        backends = [b for b in ("gloo", "nccl", "mpi") if getattr(torch.distributed, f"is_{b}_available")()]
        facts["process-group backends"] = ", ".join(backends) or "none"
    return facts


def _cpu_facts() -> dict[str, str]:
    from tp_siglip import hardware

    info = hardware.cpu_info()
    yes_no = {True: "yes", False: "no (emulated: use float32)"}
    return {
        "CPU": f"{info.model} ({os.cpu_count()} logical cores)",
        "native bf16 on CPU": yes_no[hardware.cpu_has_native_bf16()],
        "native fp16 on CPU": yes_no[hardware.cpu_has_native_fp16()],
    }


def environment() -> dict[str, str]:
    """Everything ``tp-siglip env`` prints, in order (keys are labels, values are one-line strings)."""
    from tp_siglip import __version__

    facts = {
        "tp-siglip": f"{__version__} ({Path(__file__).resolve().parent})",
        "Python": f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        "Platform": platform.platform(),
    }
    facts.update(_cpu_facts())
    facts.update(_torch_facts())
    for package in PACKAGES[1:]:
        facts[package] = _version(package)
    cache = _hub_cache()
    facts["Hugging Face cache"] = cache
    facts["tp-siglip tower cache"] = os.path.join(cache, "tp-siglip")
    for name in ENV_VARS:
        if name in ALWAYS_SHOWN or name in os.environ:
            facts[name] = os.environ.get(name, "unset")
    for name in SECRET_VARS:
        if os.environ.get(name):
            facts[name] = "set (not shown)"
    return facts


def format_environment(facts: dict[str, str]) -> str:
    """A Markdown list, one ``- label: value`` line per fact, ready to paste into a bug report."""
    return "\n".join(f"- {label}: {value}" for label, value in facts.items())
