"""Random-weight checkpoints made with transformers, in the layouts real Hub repos use.

Every layout stores the same vision tower (same seed -> same weights), so one transformers reference
serves them all, with transformers 4.x (which nests a SiglipVisionModel's tensors under ``vision_model.``)
as with 5.x: each layout comes out with the key names the README documents for it, whichever is installed.
Weights are perturbed after init so that no tensor is a constant (layer norms are not
all ones, biases not all zeros): a loader that mixes up two tensors cannot pass by luck.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TINY = dict(
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=3,
    num_attention_heads=6,
    image_size=32,
    patch_size=8,
)
SO400M_2L = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=2,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)
GEMMA = dict(
    model_type="gemma",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=300,
)

LAYOUTS = ("v5_vision", "v4_vision", "sharded", "full_siglip", "paligemma_hub", "paligemma_v5")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter so none is constant."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)


def vision_model(config: dict[str, Any], seed: int = 0):
    """A transformers SiglipVisionModel with seeded, perturbed random weights, eager attention, eval."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(SiglipVisionConfig(**config)).eval()
    perturb(model, seed + 1)
    model.config._attn_implementation = "eager"
    if hasattr(model, "set_attn_implementation"):  # transformers < 4.56 reads the config's choice at forward time
        model.set_attn_implementation("eager")
    return model


def tower_state(model) -> dict[str, torch.Tensor]:
    """A SiglipVisionModel's tensors without prefix (transformers 4.x names them ``vision_model.*``, 5.x does not)."""
    return {k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}


def _load_tower(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load unprefixed tower tensors into a SiglipVisionModel of the installed transformers."""
    nested = next(iter(module.state_dict())).startswith("vision_model.")
    module.load_state_dict({("vision_model." if nested else "") + k: v for k, v in state.items()})


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def save_layout(reference, layout: str, directory: Path) -> Path:
    """Save ``reference`` (a SiglipVisionModel) as a checkpoint in ``layout``; returns the directory."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipConfig, SiglipModel

    vision_cfg = reference.config.to_dict()
    state = tower_state(reference)
    if layout == "v5_vision":  # SiglipVisionModel.save_pretrained in transformers 5: no prefix
        if state.keys() == reference.state_dict().keys():
            reference.save_pretrained(directory)
        else:  # transformers 4.x would write vision_model.*
            _write(directory, state, vision_cfg)
    elif layout == "v4_vision":  # SiglipVisionModel saved by transformers 4.x: vision_model.*
        _write(directory, {f"vision_model.{k}": v for k, v in state.items()}, vision_cfg)
    elif layout == "sharded":  # several shards + model.safetensors.index.json
        reference.save_pretrained(directory, max_shard_size="20KB" if reference.config.hidden_size < 200 else "40MB")
        assert (directory / "model.safetensors.index.json").is_file()
    elif layout == "full_siglip":  # SiglipModel: vision_model.* next to text_model.*, logit_scale/bias
        full = SiglipModel(SiglipConfig(vision_config=vision_cfg, text_config=TEXT))
        full.vision_model.load_state_dict(state)
        full.save_pretrained(directory)
    elif layout.startswith("paligemma"):  # PaliGemma: no head; language model + projector beside it
        cfg = PaliGemmaConfig(
            vision_config={**vision_cfg, "vision_use_head": False, "projection_dim": 32},
            text_config=GEMMA,
            image_token_index=299,
            projection_dim=32,
        )
        pali = PaliGemmaForConditionalGeneration(cfg)
        inner = getattr(pali, "model", pali)  # transformers < 4.52 has no .model level
        _load_tower(inner.vision_tower, {k: v for k, v in state.items() if not k.startswith("head.")})
        pali.save_pretrained(directory)  # vision_tower.* (transformers 5) or vision_tower.vision_model.* (4.x)
        # the Hub's PaliGemma repos: vision_tower.vision_model.*; transformers 5's layout: vision_tower.*
        tower = "vision_tower.vision_model." if layout == "paligemma_hub" else "vision_tower."
        from safetensors.torch import load_file

        tensors = load_file(str(directory / "model.safetensors"))
        renamed = {
            (tower + k.removeprefix("vision_tower.").removeprefix("vision_model.") if k.startswith("vision_tower.") else k): v
            for k, v in tensors.items()
        }
        if renamed.keys() != tensors.keys():
            save_file(renamed, str(directory / "model.safetensors"))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return directory


def has_head(layout: str) -> bool:
    return not layout.startswith("paligemma")


def tiny_job_inputs(directory: Path, images: int) -> tuple[Path, Path]:
    """A 32 px tiny tower saved like transformers 5.x, and a folder of ``images`` flat grey PNGs (20x30, level
    40 * i): what the encode job's failure tests run on. Returns ``(checkpoint, image folder)``."""
    import numpy as np
    from PIL import Image

    checkpoint = save_layout(vision_model({**TINY, "image_size": 32, "patch_size": 16}, seed=3), "v5_vision", directory / "ckpt")
    folder = directory / "images"
    folder.mkdir()
    for i in range(images):
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return checkpoint, folder


def transformers_outputs(model, paths: list, image_size: int):
    """transformers' own pipeline on image files: ``SiglipImageProcessor`` (PIL backend), then ``model``."""
    from transformers.utils import logging as hf_logging

    from references import siglip_image_processor

    hf_logging.set_verbosity_error()  # the "no torchvision, using the PIL backend" notice
    processor = siglip_image_processor(size={"height": image_size, "width": image_size})
    pixels = processor(images=[str(p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels)
