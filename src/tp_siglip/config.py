"""The vision tower's hyper-parameters.

`SiglipVisionConfig` uses transformers' field names and defaults, so a `config.json` from the Hub
reads straight into it. Two choices:

* A config may be a vision config (``model_type: siglip_vision_model``) or a full SigLIP / VLM config
  that nests the vision part under ``vision_config``; `from_dict` accepts both.
* Unknown keys (``projection_dim``, ``model_type``, ``torch_dtype``, ...) are ignored, while impossible
  values (a hidden size that heads do not divide, a patch larger than the image, an unknown activation,
  non-positive sizes) are rejected up front with a message naming the value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tp_siglip.activations import get_activation
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

class SiglipVisionConfig(BaseModel):
    """Hyper-parameters of a SigLIP vision tower, with transformers' names and defaults."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True

    @field_validator(
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_channels",
        "image_size",
        "patch_size",
    )
    @classmethod
    def _positive(cls, value: int, info: Any) -> int:
        if value < 1:
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
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; every head must have the same width"
            )
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        return self

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        """Rows of the position table: (image_size // patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> SiglipVisionConfig:
        """Build from a config dict: a vision config, or one that nests it under ``vision_config``.

        ``overrides`` replace fields after reading (e.g. ``num_hidden_layers=k`` for early exit).
        """
        if not isinstance(data, dict):
            raise TypeError(f"a config must be a dict, got {type(data).__name__}")
        vision = data.get("vision_config", data)
        if vision is None:  # some VLM configs write `"vision_config": null` to mean "defaults"
            vision = {}
        if not isinstance(vision, dict):
            raise TypeError(f"vision_config must be a dict, got {type(vision).__name__}")
        fields = {k: v for k, v in vision.items() if v is not None and k in cls.model_fields}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"unknown config field(s) {unknown}; expected some of {sorted(cls.model_fields)}")
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **overrides: Any) -> SiglipVisionConfig:
        """Read ``config.json`` (vision or nested) from ``path``; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {path}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        try:
            return cls.from_dict(data, **overrides)
        except ValidationError as err:
            raise ValueError(f"config file {path} holds an invalid vision config: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what ``SiglipVisionConfig(**d)`` reads back)."""
        return self.model_dump()
