"""Tiny random SigLIP towers made by timm's and open_clip's own ``create_model``, saved as their Hub repos are.

* timm: ``timm.create_model(<a stock SigLIP architecture>, **TIMM_ARGS)`` (a tiny geometry on top of the
  stock arguments, as timm itself records them in ``model_args``), saved with timm's ``save_for_hf``.
* open_clip: its ``create_model`` builds the trunk from ``timm_model_name`` alone, so the tiny trunk is a
  test-only architecture registered with timm's ``register_model`` (and with tp-siglip's
  ``register_timm_architecture``, the same arguments). Saved the way open_clip's Hub repos are laid out:
  ``open_clip_model.safetensors`` (image and text towers) and ``open_clip_config.json`` written by open_clip's
  own ``save_config_for_hf``.
* big_vision: `write_npz` writes a timm model's weights as a big_vision ``.npz``, one member per layer or
  scan-stacked; the tests check it with timm's own npz reader (``_load_weights``).

Weights are perturbed after init (``checkpoints.perturb``) so that no tensor is constant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoints import perturb

#: the tiny geometry: 8 heads (3 ranks get 3/3/2), an MLP of 200 (67/67/66), 16 tokens of 64
TIMM_ARGS = dict(embed_dim=64, depth=2, num_heads=8, mlp_ratio=200 / 64, img_size=16, patch_size=4)
MAP_ARCH, GAP_ARCH = "vit_base_patch16_siglip_224", "vit_base_patch16_siglip_gap_224"
#: the test-only trunk open_clip builds by name
TRUNK = "vit_tptest_patch4_siglip_16"
TRUNK_ARGS = dict(TIMM_ARGS, class_token=False, global_pool="map")
OPEN_CLIP_MODEL = "tptest-siglip-16"
OPEN_CLIP_CFG = {
    "embed_dim": 64,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 16, "timm_model_name": TRUNK, "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},
    # a text tower several times the image tower's size: reading it by mistake shows in the byte counts
    "text_cfg": {"context_length": 16, "vocab_size": 8000, "width": 64, "heads": 4, "layers": 1, "no_causal_mask": True,
                 "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
}


def timm_model(architecture: str, seed: int, **kwargs: Any) -> Any:
    """A tiny timm SigLIP tower of ``architecture`` (MAP or GAP), perturbed, in eval mode."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, **TIMM_ARGS, **kwargs)
    perturb(model, seed + 1)
    return model.eval()


def save_timm(model: Any, directory: Path) -> Path:
    """timm's own Hub writer: ``model.safetensors`` + ``config.json`` (architecture, model_args, pretrained_cfg)."""
    from timm.models import save_for_hf

    save_for_hf(model, str(directory), safe_serialization=True)
    return directory


def register_trunk() -> None:
    """Register the tiny trunk with timm (for open_clip) and with tp-siglip; idempotent."""
    import timm
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    from tp_siglip.formats import register_timm_architecture

    register_timm_architecture(TRUNK, **TRUNK_ARGS)
    if timm.is_model(TRUNK):
        return

    def vit_tptest_patch4_siglip_16(pretrained: bool = False, **kwargs: Any) -> Any:
        return build_model_with_cfg(VisionTransformer, TRUNK, pretrained, **{**TRUNK_ARGS, **kwargs})

    register_model(vit_tptest_patch4_siglip_16)


def open_clip_model(seed: int, workdir: Path) -> Any:
    """A tiny open_clip SigLIP model (tiny timm trunk, text tower beside it), perturbed, in eval mode."""
    import open_clip

    register_trunk()
    config = workdir / f"{OPEN_CLIP_MODEL}.json"
    config.write_text(json.dumps(OPEN_CLIP_CFG))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    siglip = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "squash"}
    model = open_clip.create_model(OPEN_CLIP_MODEL, pretrained=None, force_preprocess_cfg=siglip)
    perturb(model, seed + 1)
    return model.eval()


def save_open_clip(model: Any, directory: Path) -> Path:
    """The files of an open_clip Hub repo: both towers in ``open_clip_model.safetensors``, and open_clip's own
    ``open_clip_config.json`` (``save_config_for_hf``: model_cfg + preprocess_cfg)."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    save_config_for_hf(model, directory / "open_clip_config.json", model_config=OPEN_CLIP_CFG)
    return directory


# ----------------------------------------------------------------------------- big_vision .npz


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def _attention(q: torch.Tensor, qb: torch.Tensor, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """A torch (out, in) projection as flax's (in, heads, head_dim) kernel and (heads, head_dim) bias."""
    dim = q.shape[1]
    return _np(q).T.reshape(dim, heads, -1), _np(qb).reshape(heads, -1)


def _block(block: Any, heads: int) -> dict[str, np.ndarray]:
    """One timm block in big_vision's names (relative to ``encoderblock_i/``)."""
    dim = block.norm1.weight.shape[0]
    qkv_w, qkv_b = block.attn.qkv.weight.split(dim), block.attn.qkv.bias.split(dim)
    out = {"LayerNorm_0/scale": _np(block.norm1.weight), "LayerNorm_0/bias": _np(block.norm1.bias),
           "LayerNorm_1/scale": _np(block.norm2.weight), "LayerNorm_1/bias": _np(block.norm2.bias)}
    for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b):
        out[f"MultiHeadDotProductAttention_0/{name}/kernel"], out[f"MultiHeadDotProductAttention_0/{name}/bias"] = _attention(w, b, heads)
    out["MultiHeadDotProductAttention_0/out/kernel"] = _np(block.attn.proj.weight).T.reshape(heads, -1, dim)
    out["MultiHeadDotProductAttention_0/out/bias"] = _np(block.attn.proj.bias)
    for i, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
        out[f"MlpBlock_0/Dense_{i}/kernel"], out[f"MlpBlock_0/Dense_{i}/bias"] = _np(fc.weight).T, _np(fc.bias)
    return out


def _map_head(pool: Any, heads: int) -> dict[str, np.ndarray]:
    dim = pool.q.weight.shape[0]
    out = {"probe": _np(pool.latent), "LayerNorm_0/scale": _np(pool.norm.weight), "LayerNorm_0/bias": _np(pool.norm.bias)}
    parts = zip(("query", "key", "value"), (pool.q.weight, *pool.kv.weight.split(dim)), (pool.q.bias, *pool.kv.bias.split(dim)))
    for name, w, b in parts:
        out[f"MultiHeadDotProductAttention_0/{name}/kernel"], out[f"MultiHeadDotProductAttention_0/{name}/bias"] = _attention(w, b, heads)
    out["MultiHeadDotProductAttention_0/out/kernel"] = _np(pool.proj.weight).T.reshape(heads, -1, dim)
    out["MultiHeadDotProductAttention_0/out/bias"] = _np(pool.proj.bias)
    for i, fc in enumerate((pool.mlp.fc1, pool.mlp.fc2)):
        out[f"MlpBlock_0/Dense_{i}/kernel"], out[f"MlpBlock_0/Dense_{i}/bias"] = _np(fc.weight).T, _np(fc.bias)
    return out


def write_npz(model: Any, path: Path, *, stacked: bool, dtype: Any = np.float32, prefix: str = "params/img/") -> Path:
    """``model`` (a timm SigLIP ViT) as a big_vision ``.npz``: one member per layer (``np.savez_compressed``), or
    scan-stacked with a leading layer axis (``np.savez``, stored: memory-mappable). A text tower's members and
    the image tower's projection ``head/*`` lie beside it, as in big_vision's SigLIP checkpoints."""
    heads = model.blocks[0].attn.num_heads
    members = {
        "embedding/kernel": _np(model.patch_embed.proj.weight).transpose(2, 3, 1, 0),
        "embedding/bias": _np(model.patch_embed.proj.bias),
        "pos_embedding": _np(model.pos_embed),
        "Transformer/encoder_norm/scale": _np(model.norm.weight),
        "Transformer/encoder_norm/bias": _np(model.norm.bias),
        "head/kernel": np.ones((64, 32), np.float32),
        "head/bias": np.ones(32, np.float32),
    }
    blocks = [_block(block, heads) for block in model.blocks]
    if stacked:
        members.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        members.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    if model.attn_pool is not None:
        members.update({f"MAPHead_0/{k}": v for k, v in _map_head(model.attn_pool, heads).items()})
    arrays = {prefix + k: v.astype(dtype) for k, v in members.items()}
    arrays["params/txt/Embed_0/embedding"] = np.zeros((100, 64), dtype)
    (np.savez if stacked else np.savez_compressed)(path, **arrays)
    return path


def timm_from_npz(architecture: str, path: Path, **kwargs: Any) -> Any:
    """A fresh tiny timm model of ``architecture`` filled by timm's own big_vision reader (``_load_weights``)."""
    import timm
    from timm.models.vision_transformer import _load_weights

    model = timm.create_model(architecture, pretrained=False, **TIMM_ARGS, **kwargs).eval()
    with torch.no_grad():
        _load_weights(model, str(path))
    return model


def timm_outputs(model: Any, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """timm's ``forward_features`` (last_hidden_state) and ``forward_head(..., pre_logits=True)`` (pooled)."""
    with torch.no_grad():
        features = model.forward_features(pixels)
        return {"last_hidden_state": features, "pooler_output": model.forward_head(features, pre_logits=True)}
