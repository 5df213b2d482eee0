"""Tiny random-weight transformers models with variable-resolution or nested vision towers, saved to disk.

Each builder creates a seeded model, perturbs every parameter so that no tensor is constant (see
``checkpoints.perturb``), switches it to eager attention, puts it in eval mode and writes it with
``save_pretrained`` (safetensors, transformers 5 layout). It returns ``(model, directory)``.
:func:`vision_tower` gives the transformers vision module to compare against. :data:`KEY_PREFIX` gives the
prefix its tensors carry in the checkpoint, and :data:`VISION_CONFIG_PATH` gives where its config sits
inside ``config.json``.

Facts checked with transformers 5.24:

* ``Siglip2VisionModel`` writes no prefix, and ``Siglip2Model`` writes ``vision_model.`` (next to
  ``text_model.``, ``logit_scale`` and ``logit_bias``).
* Idefics3 and SmolVLM write ``model.vision_model.`` (no head). The config's ``vision_config`` has
  ``model_type`` ``idefics3_vision`` / ``smolvlm_vision`` and ``image_size``, and the llama
  ``text_config`` has ``hidden_act="silu"``.
* ColPali writes ``vlm.vision_tower.``, with the vision config at ``vlm_config.vision_config``. Its gemma
  ``text_config`` has ``hidden_act="gelu_pytorch_tanh"``, the same activation as the vision tower.
  ``vision_use_head`` is set to False, as in the real PaliGemma-based checkpoints (transformers' default
  for a ``vision_config`` given as a dict would keep a head).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from checkpoints import GEMMA, perturb

#: NaFlex tower: a 4x4 position grid (num_patches=16) with patch 8, so most images resize it.
NAFLEX_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8, num_patches=16
)
#: Idefics3 / SmolVLM tower: 40 px / 8 px = a 5x5 native grid.
IDEFICS3_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=40
)
#: ColPali's SigLIP tower (a PaliGemma vision tower without head).
COLPALI_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=8,
    image_size=32,
    projection_dim=32,
    vision_use_head=False,
)
SIGLIP2_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)
LLAMA_TEXT = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
)
GEMMA_TEXT = GEMMA  # the tiny gemma text config of tests/checkpoints.py

KEY_PREFIX = {
    "siglip2_vision": "",
    "siglip2": "vision_model.",
    "idefics3": "model.vision_model.",
    "smolvlm": "model.vision_model.",
    "colpali": "vlm.vision_tower.",
    "gemma3": "vision_tower.",
    "llava_onevision": "vision_tower.",
    "llava": "vision_tower.",
}
VISION_CONFIG_PATH: dict[str, tuple[str, ...]] = {
    "siglip2_vision": (),
    "siglip2": ("vision_config",),
    "idefics3": ("vision_config",),
    "smolvlm": ("vision_config",),
    "colpali": ("vlm_config", "vision_config"),
    "gemma3": ("vision_config",),
    "llava_onevision": ("vision_config",),
    "llava": ("vision_config",),
}


def _finish(model: torch.nn.Module, seed: int, directory: Path) -> tuple[Any, Path]:
    """Perturb, switch to eager attention, eval, save; return ``(model, directory)``."""
    perturb(model, seed + 1)
    model.set_attn_implementation("eager")
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return model, directory


def siglip2_vision(directory: Path, *, seed: int = 0, **overrides: Any):
    """``Siglip2VisionModel`` (NaFlex, with head), keys without prefix."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(seed)
    return _finish(Siglip2VisionModel(Siglip2VisionConfig(**{**NAFLEX_VISION, **overrides})), seed, directory)


def siglip2(directory: Path, *, seed: int = 0):
    """``Siglip2Model``: NaFlex vision tower under ``vision_model.`` next to a text tower."""
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(seed)
    config = Siglip2Config(vision_config=NAFLEX_VISION, text_config=SIGLIP2_TEXT)
    return _finish(Siglip2Model(config), seed, directory)


def idefics3(directory: Path, *, seed: int = 0, **vision: Any):
    """``Idefics3ForConditionalGeneration`` with a tiny llama; tower under ``model.vision_model.``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Idefics3Config(vision_config={**IDEFICS3_VISION, **vision}, text_config=LLAMA_TEXT, image_token_id=299)
    return _finish(Idefics3ForConditionalGeneration(config), seed, directory)


def smolvlm(directory: Path, *, seed: int = 0, **vision: Any):
    """``SmolVLMForConditionalGeneration`` with a tiny llama; tower under ``model.vision_model.``."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    config = SmolVLMConfig(vision_config={**IDEFICS3_VISION, **vision}, text_config=LLAMA_TEXT, image_token_id=299)
    return _finish(SmolVLMForConditionalGeneration(config), seed, directory)


def colpali(directory: Path, *, seed: int = 0):
    """``ColPaliForRetrieval`` around a tiny PaliGemma; tower under ``vlm.vision_tower.``."""
    from transformers import ColPaliConfig, ColPaliForRetrieval

    torch.manual_seed(seed)
    vlm = dict(
        model_type="paligemma",
        vision_config=COLPALI_VISION,
        text_config=GEMMA_TEXT,
        image_token_index=299,
        projection_dim=32,
    )
    return _finish(ColPaliForRetrieval(ColPaliConfig(vlm_config=vlm, embedding_dim=16)), seed, directory)


#: a SigLIP tower inside Gemma3 / LLaVA-OneVision / LLaVA (``vision_tower.`` in transformers 5)
SIGLIP_VISION = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, patch_size=8, image_size=32)
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=300)


def gemma3(directory: Path, *, seed: int = 0):
    """``Gemma3ForConditionalGeneration``: SigLIP tower without head (as the Hub's) under ``vision_tower.``."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(SMALL_TEXT, model_type="gemma3_text", head_dim=16)
    config = Gemma3Config(vision_config={**SIGLIP_VISION, "vision_use_head": False}, text_config=text,
                          mm_tokens_per_image=4, image_token_index=299)
    return _finish(Gemma3ForConditionalGeneration(config), seed, directory)


def llava_onevision(directory: Path, *, seed: int = 0):
    """``LlavaOnevisionForConditionalGeneration`` (qwen2 text): SigLIP tower without head under ``vision_tower.``."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(vision_config={**SIGLIP_VISION, "vision_use_head": False},
                                  text_config=dict(SMALL_TEXT, model_type="qwen2"), image_token_index=299)
    return _finish(LlavaOnevisionForConditionalGeneration(config), seed, directory)


def llava(directory: Path, *, seed: int = 0):
    """``LlavaForConditionalGeneration`` (llama text) with a SigLIP tower that keeps its head."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=SIGLIP_VISION, text_config=dict(SMALL_TEXT, model_type="llama"),
                         image_token_index=299)
    return _finish(LlavaForConditionalGeneration(config), seed, directory)


BUILDERS: dict[str, Callable[..., tuple[Any, Path]]] = {
    "siglip2_vision": siglip2_vision,
    "siglip2": siglip2,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "colpali": colpali,
    "gemma3": gemma3,
    "llava_onevision": llava_onevision,
    "llava": llava,
}


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers vision module inside a model from :data:`BUILDERS` (the reference to compare with)."""
    name = type(model).__name__
    if name == "Siglip2VisionModel":
        return model
    if name == "Siglip2Model":
        return model.vision_model
    if name in ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"):
        return model.model.vision_model
    if name == "ColPaliForRetrieval":
        return model.vlm.vision_tower
    if name in ("Gemma3ForConditionalGeneration", "LlavaOnevisionForConditionalGeneration", "LlavaForConditionalGeneration"):
        return model.model.vision_tower
    raise TypeError(f"no known vision tower in {name}")


def read_config(directory: Path) -> dict[str, Any]:
    """The ``config.json`` dict a builder wrote."""
    return json.loads((Path(directory) / "config.json").read_text())


def vision_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The vision part of ``config`` (a :func:`read_config` dict) for builder ``name``."""
    for key in VISION_CONFIG_PATH[name]:
        config = config[key]
    return config
