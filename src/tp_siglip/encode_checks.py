"""The encode job's checks before the model loads: arguments, device, model, output, ``--tp`` and NaFlex.

A bad value raises `encode_corpus.UsageError` with one line naming it and the fix (the job exits 2); files
of the checkpoint are read only where they are on this machine (a folder, or the Hugging Face cache).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tp_siglip import encode_corpus, processing
from tp_siglip.encode_corpus import UsageError
from tp_siglip.formats import OPEN_CLIP_CONFIG
from tp_siglip.loader import gpu_problem
from tp_siglip.parallel import local_gpu

__all__ = ["DEFAULT_IMAGES", "DEFAULT_MAX_NUM_PATCHES", "DEFAULT_MODEL", "Checked", "check_arguments", "checkpoint_max_num_patches", "not_naflex"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "google/siglip-base-patch16-224"
#: the five bundled example photographs (CC0 / public domain, see SOURCES.md there), shipped in the wheel
DEFAULT_IMAGES = Path(__file__).resolve().parent / "images"
#: transformers' ``Siglip2ImageProcessor`` default, used when the checkpoint does not say
DEFAULT_MAX_NUM_PATCHES = 256
PREPROCESSOR_CONFIG = "preprocessor_config.json"
#: the fraction of a GPU's memory the tower's weights may take before the default --tp groups GPUs
GPU_WEIGHT_FRACTION = 0.5


@dataclass
class Checked:
    """What the checks found; ``tp`` is ``--tp`` or what :func:`_tp_for_memory` chose, ``max_num_patches`` None
    when the checkpoint's value is unusable (``patches_from`` then says why)."""

    corpus: encode_corpus.Corpus
    device: Optional[str]
    tp: int
    max_num_patches: Optional[int]
    patches_from: str


def check_arguments(args: argparse.Namespace, rank: int, world_size: int) -> Checked:
    """Every check that needs no model; raises :class:`UsageError` with a one-line message."""
    try:
        processing.require_pillow()
    except ImportError as err:
        raise UsageError(str(err)) from None
    args.inputs = args.inputs or [DEFAULT_IMAGES]
    if args.parallel is not None:
        raise UsageError(
            f"--parallel is gone: --tp N sets the ranks per group, tensor parallel inside a group; the default, --tp 1, is "
            f"data parallel (what --parallel data did); --parallel tensor on {world_size} rank(s) is --tp {world_size}"
        )
    if args.save_every is not None:
        raise UsageError(f"--save-every {args.save_every} is gone: the output is committed shard by shard, so --shard-size "
                         "ROWS sets how often")
    encode_corpus.check_output_name(args.output)
    if args.tp is not None and world_size % args.tp:
        raise UsageError(f"--tp {args.tp} does not divide the {world_size} ranks; pick a divisor of {world_size}")
    device = _check_device(args.device, world_size)
    _check_model(args.model)
    if args.revision is not None and Path(args.model).exists():
        raise UsageError(f"--revision {args.revision}: --model {args.model} is a local path, not a Hub repo id; drop --revision")
    tp = args.tp or _tp_for_memory(args, device, world_size)
    groups = 1 if encode_corpus.Target.of(args.output).file else world_size // tp  # a file: the world deals every shard
    corpus = encode_corpus.check_corpus(args, rank, groups)
    if args.max_num_patches is None:
        return Checked(corpus, device, tp, *checkpoint_max_num_patches(args.model, args.revision))
    config = _config_on_disk(args.model, args.revision)
    if config is not None and config.variant != "naflex":  # else refused once loaded
        raise not_naflex(args)
    return Checked(corpus, device, tp, args.max_num_patches, "--max-num-patches")


def _check_device(device: Optional[str], world_size: int) -> Optional[str]:
    if device is None:
        return None
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r} is not a device name (expected e.g. cpu, cuda, cuda:1)") from None
    if chosen.type == "cuda" and chosen.index is None and world_size > 1:
        chosen = torch.device("cuda", local_gpu())  # one GPU per rank
    problem = gpu_problem(chosen)
    if problem is not None:
        raise UsageError(f"--device {chosen}: {problem}; use --device cpu, or a GPU that is there")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return str(chosen)


def _config_on_disk(model: str, revision: Optional[str]) -> Any:
    """The tower config in ``config.json`` of ``--model`` when it is on this machine and readable, else None."""
    found = _file_on_disk(model, "config.json", revision)
    if found is None:
        return None
    from tp_siglip.config import SiglipVisionConfig

    try:
        return SiglipVisionConfig.from_json_file(found)
    except (OSError, ValueError, TypeError):
        return None  # the loader reports a bad config


def _tower_bytes(model: str, dtype: str, revision: Optional[str]) -> Optional[int]:
    """How many bytes the tower's weights take, from ``config.json`` when it is on disk (else None)."""
    config = _config_on_disk(model, revision)
    if config is None:
        return None
    from tp_siglip import SiglipVisionTransformer

    parameters = sum(p.numel() for p in SiglipVisionTransformer(config, device="meta").parameters())
    return parameters * (4 if dtype in ("auto", "float32") else 2)


def _tp_for_memory(args: argparse.Namespace, device: Optional[str], world_size: int) -> int:
    """The default ``--tp``: 1, unless the tower's weights take more than half of this rank's GPU; then the
    smallest divisor of the world, within one node, whose slices fit (ranks then agree on the largest)."""
    on_gpu = device.startswith("cuda") if device is not None else torch.cuda.is_available()
    weights = _tower_bytes(args.model, args.dtype, args.revision) if on_gpu else None
    if weights is None:
        return 1
    memory = torch.cuda.get_device_properties(torch.device(device or "cuda")).total_memory
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    divisors = [tp for tp in range(1, local + 1) if world_size % tp == 0]
    tp = next((tp for tp in divisors if weights / tp <= memory * GPU_WEIGHT_FRACTION), divisors[-1])
    if tp > 1:
        logger.warning("the tower's weights (~%.1f GB) need more than half of a %.1f GB GPU: --tp %d",
                       weights / 1e9, memory / 1e9, tp)
    return tp


def _check_model(model: str) -> None:
    path = Path(model)
    if path.exists():
        if path.is_file() and path.suffix == ".npz":  # a big_vision checkpoint
            return
        if not path.is_dir():
            raise UsageError(f"--model {model}: not a folder; expected a folder with config.json and *.safetensors, "
                             "or a Hub repo id")
        if not any((path / name).is_file() for name in ("config.json", OPEN_CLIP_CONFIG)) and not any(path.glob("*.npz")):
            raise UsageError(f"--model {model}: this folder has no config.json; expected a checkpoint folder "
                             "(config.json, *.safetensors)")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UsageError(f"--model {model!r}: no such folder, and not a valid Hub repo id (expected e.g. "
                         f"{DEFAULT_MODEL})") from None


def _file_on_disk(model: str, name: str, revision: Optional[str] = None) -> Optional[Path]:
    """``name`` of ``--model`` if it is on this machine: in the folder, or in the Hugging Face cache at ``revision``
    (default main; no network)."""
    path = Path(model)
    if path.exists():
        found = path / name
        return found if path.is_dir() and found.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        from tp_siglip.hub import hub_cache_dir  # the cache from_pretrained looks in (HF_HUB_CACHE read now)

        cached = try_to_load_from_cache(model, name, cache_dir=hub_cache_dir(), revision=revision)
    except Exception:  # an unusual repo id or cache: no default from it, the loader says what is wrong
        return None
    return Path(cached) if isinstance(cached, str) else None


def checkpoint_max_num_patches(model: str, revision: Optional[str] = None) -> tuple[Optional[int], str]:
    """``(max_num_patches, where it came from)`` for ``--model`` (a folder, or a repo id looked up in the cache);
    ``(None, the problem)`` for a bad config file (which only matters for a NaFlex tower, checked once loaded)."""
    found = _file_on_disk(model, PREPROCESSOR_CONFIG, revision)
    default = DEFAULT_MAX_NUM_PATCHES, "transformers' default"
    if found is None:
        return default
    try:
        data = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"cannot read {found}: {err}; fix it or pass --max-num-patches"
    value = data.get("max_num_patches") if isinstance(data, dict) else None
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return None, f"{found}: max_num_patches must be a positive integer, got {value!r}; fix it or pass --max-num-patches"
    return value, str(found)


def not_naflex(args: argparse.Namespace) -> UsageError:
    return UsageError(
        f"--max-num-patches {args.max_num_patches}: --model {args.model} is a fixed-resolution tower, not a SigLIP2 "
        "NaFlex one (its images are resized to its image_size); drop --max-num-patches"
    )
