"""Random-weight checkpoints for the benchmarks, and loading them into ours and transformers' model.

Every benchmarked model comes from a checkpoint that transformers itself writes (``SiglipVisionModel``
+ ``save_pretrained``), so ours and transformers read the very same file. The weights are seeded random
numbers with sane scales; the checkpoints live in one temporary directory per run (`Checkpoints`),
written once per geometry and deleted by the caller at the end.

Choices: the transformers model is built on the meta device and filled once (its own init of 400M
parameters costs half a minute on two cores and would be overwritten anyway); transformers runs with
``attn_implementation="sdpa"`` (its default) and its logging is silenced.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Geometry, gb, log


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights with sane scales: matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.1),
    other vectors N(0, 0.02). No tensor is constant, so a mixed-up load cannot agree by luck."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.dim() >= 2:
            param.normal_(0.0, param[0].numel() ** -0.5, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            param.normal_(1.0, 0.1, generator=gen)
        else:
            param.normal_(0.0, 0.02, generator=gen)


def write_checkpoint(geometry: Geometry, directory: Path, seed: int = 0) -> Path:
    """Build transformers' SiglipVisionModel for ``geometry`` with random weights; save_pretrained it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    quiet_transformers()
    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig(**geometry.hf_config()))
    model.to_empty(device="cpu")
    fill_random_(model, seed)
    model.save_pretrained(directory)
    del model
    gc.collect()
    return directory


class Checkpoints:
    """Checkpoints written once per geometry into one temporary directory (the caller removes it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[Geometry, Path] = {}

    def get(self, geometry: Geometry) -> Path:
        if geometry not in self.paths:
            directory = self.root / f"ckpt-{geometry.name}-{geometry.layers}L"
            start = time.perf_counter()
            write_checkpoint(geometry, directory)
            size = sum(f.stat().st_size for f in directory.iterdir())
            log(f"wrote {geometry.label} checkpoint ({gb(size)}) in {time.perf_counter() - start:.1f}s")
            self.paths[geometry] = directory
        return self.paths[geometry]


def load_ours(path: Path, dtype: torch.dtype, device: torch.device, **kwargs: Any) -> torch.nn.Module:
    """Our ``from_pretrained``; ``parallel="data"`` gives a `tp_siglip.DataParallelEncoder`."""
    from tp_siglip import SiglipVisionTransformer

    return SiglipVisionTransformer.from_pretrained(str(path), dtype=dtype, device=device, **kwargs)


def load_theirs(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import SiglipVisionModel

    quiet_transformers()
    model = SiglipVisionModel.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()
