"""The vision tower's hyper-parameters, and finding them in any config.json.

`SiglipVisionConfig` uses transformers' field names and defaults, so a config from the Hub reads straight
into it. One extra field, ``variant``, says which kind of tower it is:

* ``"siglip"``: SigLIP, SigLIP2 fixed-res and the towers of PaliGemma, Gemma3, LLaVA-OneVision, ... --
  images ``(B, C, H, W)``, a conv patch embedding, a position table over the ``image_size / patch_size``
  grid, a pooling head unless ``vision_use_head`` is false;
* ``"naflex"``: SigLIP2 NaFlex (``siglip2_vision_model``) -- flattened patches, a linear embedding and a
  ``num_patches``-row square table resized per image; no ``image_size``;
* ``"idefics3"``: Idefics3 / SmolVLM towers -- like ``"siglip"`` without a head, positions of partly
  padded images found by bucketizing (transformers' defaults for these towers differ: 1152 hidden, 16
  heads, patch 32).

Choices:

* **Found by structure, wherever it is** (`find_vision_config`): a top-level vision config (its
  ``model_type``), else the shallowest ``vision_config`` at any depth (``vlm_config.vision_config`` in
  ColPali), else a legacy top-level config without ``model_type``. A config that is none of these (a
  llama text config) is an error, never a default tower.
* **Defaults follow the tower's model_type** (SigLIP, SigLIP2, Idefics3, SmolVLM), as transformers fills
  them, with one exception: a config that does not state ``vision_use_head`` gets a head only if the
  checkpoint holds one (transformers would build a random head); unknown keys (``projection_dim``, ``torch_dtype``, ...) are ignored; impossible values are rejected
  up front with a message naming the value. Whether the config agrees with the checkpoint's tensors is
  checked by the loader.
* **Two fields transformers does not have**, for towers loaded from timm, open_clip or big_vision
  checkpoints (``formats.py``): ``global_pool="avg"`` (timm's GAP towers: ``pooler_output`` is the mean of
  ``last_hidden_state``'s tokens, no head) and ``preprocessing`` (how that library turns images into
  ``pixel_values``; ``None`` is transformers' ``SiglipImageProcessor``). Both default to transformers'
  behaviour, so a transformers config reads exactly as before.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from tp_siglip.activations import get_activation

#: vision ``model_type`` -> (variant, defaults that differ from SigLIP's)
VISION_MODEL_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "siglip_vision_model": ("siglip", {}),
    "siglip2_vision_model": ("naflex", {"num_patches": 256}),
    "idefics3_vision": ("idefics3", {"hidden_size": 1152, "num_attention_heads": 16, "patch_size": 32}),
    "smolvlm_vision": ("idefics3", {"hidden_size": 1152, "num_attention_heads": 16, "patch_size": 32}),
}
#: parent ``model_type`` -> vision ``model_type``, for nested vision configs that do not name theirs
PARENT_VISION_TYPES = {"siglip2": "siglip2_vision_model", "idefics3": "idefics3_vision", "smolvlm": "smolvlm_vision"}
Variant = Literal["siglip", "naflex", "idefics3"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"]
#: a top-level config without model_type is read as a (legacy) vision config only if it names one of these
_LEGACY_KEYS = {"hidden_size", "patch_size", "image_size", "num_hidden_layers", "num_attention_heads"}


class Preprocessing(BaseModel):
    """How timm's or open_clip's eval transform turns an image into ``pixel_values`` (`tp_siglip.transforms`).

    ``resize``: ``"squash"`` to the square (aspect ratio lost), ``"shortest"`` the shorter side then a centre
    crop, ``"longest"`` the longer side then a centre pad with ``fill``. The resize target is
    ``floor(image_size / crop_pct)`` (timm's ``crop_pct``; 1.0 for open_clip). Then torchvision's
    ``ToTensor`` (``level / 255`` in float32) and ``(x - mean) / std`` per channel.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    library: Literal["timm", "open_clip"]
    resize: Literal["squash", "shortest", "longest"]
    crop_pct: float = 1.0
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    fill: tuple[int, int, int] = (0, 0, 0)

    @field_validator("crop_pct")
    @classmethod
    def _crop_pct_range(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {value}")
        return value

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(v > 0 for v in value):
            raise ValueError(f"std must be positive per channel, got {value}")
        return value


class SiglipVisionConfig(BaseModel):
    """Hyper-parameters of a SigLIP-family vision tower, with transformers' names and defaults."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: Optional[int] = None  #: 224 unless given; None for NaFlex, whose images have any size
    patch_size: int = 16
    num_patches: Optional[int] = None  #: rows of the position table; derived from image_size unless NaFlex
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    #: None (not stated): a head if the checkpoint has one (``use_head``: true without a checkpoint)
    vision_use_head: Optional[bool] = None
    variant: Variant = "siglip"
    #: how ``pooler_output`` is made: None (transformers) = the pooling head when there is one; "map" = the head
    #: (required); "avg" = the mean of ``last_hidden_state`` over tokens, no head (timm's ``*_gap_*`` towers)
    global_pool: Optional[Literal["map", "avg"]] = None
    #: timm's / open_clip's image preprocessing for the checkpoint; None = transformers' SiglipImageProcessor
    preprocessing: Optional[Preprocessing] = None

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: Any) -> Any:
        return _fill_variant_defaults(data)

    @field_validator("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "image_size", "patch_size", "num_patches")
    @classmethod
    def _positive(cls, value: Optional[int], info: Any) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be a positive integer, got {value}")
        return value

    @field_validator("layer_norm_eps")
    @classmethod
    def _eps_positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {value}")
        return value

    @field_validator("attention_dropout")
    @classmethod
    def _dropout_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {value}")
        return value

    @field_validator("hidden_act")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        get_activation(value)  # raises, naming the known activations
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SiglipVisionConfig:
        _check_consistent(self)
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def use_head(self) -> bool:
        """Whether the tower has a pooling head: ``vision_use_head``, true when not stated."""
        return self.vision_use_head is not False

    @property
    def num_positions(self) -> int:
        """Rows of the position table (a square grid)."""
        assert self.num_patches is not None
        return self.num_patches

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> SiglipVisionConfig:
        """Build from any config dict: found with `find_vision_config`, defaults by its model_type.

        ``overrides`` replace fields after reading (e.g. ``num_hidden_layers=k`` for early exit).
        """
        vision, _where, model_type = find_vision_config(data)
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"unknown config field(s) {unknown}; expected some of {sorted(cls.model_fields)}")
        variant, defaults = VISION_MODEL_TYPES[model_type]
        fields = {"variant": variant, **defaults}
        fields.update({k: v for k, v in vision.items() if v is not None and k in cls.model_fields})
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **overrides: Any) -> SiglipVisionConfig:
        """Read ``config.json`` (any layout `find_vision_config` knows) from ``path``; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(data, **overrides)
        except (ValidationError, ValueError) as err:
            raise ValueError(f"config file {path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what ``SiglipVisionConfig(**d)`` reads back)."""
        return self.model_dump()


def _fill_variant_defaults(data: Any) -> Any:
    """The defaults that depend on other fields (``variant``'s, ``num_patches`` from the image grid, no head for
    Idefics3 and GAP towers), filled into a raw field dict before validation; ``None`` values count as unset."""
    if not isinstance(data, dict):
        return data
    data = {k: v for k, v in data.items() if v is not None}
    variant = data.get("variant", "siglip")
    if variant == "naflex":
        data.setdefault("num_patches", 256)
        data["image_size"] = None
    else:
        data.setdefault("image_size", 224)
        size, patch = data["image_size"], data.get("patch_size", 16)
        if isinstance(size, int) and isinstance(patch, int) and 0 < patch <= size:
            data.setdefault("num_patches", (size // patch) ** 2)
    if variant == "idefics3":
        data["vision_use_head"] = False  # these towers have no pooling head
    if data.get("global_pool") == "avg":
        data.setdefault("vision_use_head", False)  # a GAP tower pools without a head
    return data


def _check_consistent(config: SiglipVisionConfig) -> None:
    """Reject field values that contradict each other: pooling, head width, the position grid."""
    _check_pooling(config)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not divisible by num_attention_heads "
            f"{config.num_attention_heads}; every head must have the same width"
        )
    if config.variant == "naflex":
        assert config.num_patches is not None
        if math.isqrt(config.num_patches) ** 2 != config.num_patches:
            raise ValueError(f"num_patches {config.num_patches} must be a square (a G x G position grid) for NaFlex")
        return
    assert config.image_size is not None
    if config.patch_size > config.image_size:
        raise ValueError(f"patch_size {config.patch_size} is larger than image_size {config.image_size}")
    grid = (config.image_size // config.patch_size) ** 2
    if config.num_patches != grid:
        raise ValueError(
            f"num_patches {config.num_patches} does not match image_size {config.image_size} // patch_size "
            f"{config.patch_size} squared ({grid})"
        )


def _check_pooling(config: SiglipVisionConfig) -> None:
    """``global_pool`` against ``vision_use_head`` and ``variant``."""
    if config.global_pool == "avg" and (config.vision_use_head or config.variant != "siglip"):
        raise ValueError(
            f"global_pool='avg' (mean of the tokens, timm's GAP towers) needs a SigLIP tower without a head; got "
            f"variant {config.variant!r}, vision_use_head {config.vision_use_head}: drop global_pool or vision_use_head"
        )
    if config.global_pool == "map" and config.vision_use_head is False:
        raise ValueError("global_pool='map' needs the pooling head but vision_use_head is False; drop one of them")


def _vision_type(data: dict[str, Any], parent_type: Optional[str]) -> str:
    """The vision model_type of a vision config dict (named, or implied by its parent's model_type)."""
    named = data.get("model_type")
    if named is None:
        return PARENT_VISION_TYPES.get(parent_type or "", "siglip_vision_model")
    if named not in VISION_MODEL_TYPES:
        raise ValueError(
            f"vision tower model_type {named!r} is not a SigLIP-family tower; tp-siglip runs "
            f"{sorted(VISION_MODEL_TYPES)} (pass config= to force one)"
        )
    return named


def find_vision_config(data: object) -> tuple[dict[str, Any], str, str]:
    """Locate the vision config in a config dict: ``(vision dict, where it was, vision model_type)``.

    A top-level vision config (its model_type, or a legacy config without model_type); else the
    shallowest ``vision_config`` at any depth (``null`` means the defaults). Anything else is a
    ``ValueError`` naming what was found.
    """
    if not isinstance(data, dict):
        raise TypeError(f"a config must be a dict, got {type(data).__name__}")
    top_type = data.get("model_type")
    legacy = top_type is None and "vision_config" not in data and bool(_LEGACY_KEYS & set(data))
    if top_type in VISION_MODEL_TYPES or legacy or data == {}:
        return data, "the top level", _vision_type(data, None)
    level: list[tuple[str, dict[str, Any]]] = [("", data)]
    while level:
        for path, node in level:
            if "vision_config" in node:
                vision = node["vision_config"] or {}
                if not isinstance(vision, dict):
                    raise TypeError(f"{path}vision_config must be a dict, got {type(vision).__name__}")
                return vision, f"{path}vision_config", _vision_type(vision, node.get("model_type"))
        level = [(f"{path}{key}.", value) for path, node in level for key, value in node.items() if isinstance(value, dict)]
    raise ValueError(
        f"no vision config found: model_type {top_type!r} with no vision_config at any depth; pass the "
        f"tower's config explicitly (config=SiglipVisionConfig(...) or a dict)"
    )
