"""SiglipVisionConfig: transformers' names and defaults, both config layouts, clear rejections."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tp_siglip import SiglipVisionConfig


def test_defaults_equal_transformers():
    from transformers import SiglipVisionConfig as HFConfig

    ours, theirs = SiglipVisionConfig(), HFConfig()
    for name in SiglipVisionConfig.model_fields:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_reads_vision_and_nested_configs_ignoring_unknown_keys(tmp_path):
    from transformers import SiglipConfig

    # google/siglip-base-patch16-224 keeps little more than patch_size in its vision_config
    nested = SiglipConfig(vision_config={"patch_size": 16}).to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(nested))
    cfg = SiglipVisionConfig.from_json_file(path)
    assert cfg == SiglipVisionConfig(patch_size=16)
    flat = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": 384,
            "projection_dim": 2048, "num_image_tokens": 729, "vision_use_head": False}
    cfg = SiglipVisionConfig.from_dict(flat)
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_patches, cfg.vision_use_head) == (1152, 72, 729, False)
    assert SiglipVisionConfig.from_dict({"vision_config": None}) == SiglipVisionConfig()


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"hidden_size": 100, "num_attention_heads": 12}, "100"),
        ({"patch_size": 32, "image_size": 16}, "32"),
        ({"hidden_act": "tanhh"}, "tanhh"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"layer_norm_eps": 0}, "layer_norm_eps"),
        ({"attention_dropout": 1.5}, "attention_dropout"),
    ],
)
def test_impossible_values_rejected(fields, named):
    with pytest.raises(ValueError, match=named):
        SiglipVisionConfig(**fields)
    assert issubclass(ValidationError, ValueError)


def test_bad_config_files_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        SiglipVisionConfig.from_json_file(bad)
    bad.write_text(json.dumps({"hidden_size": 100, "num_attention_heads": 12}))
    with pytest.raises(ValueError, match="(?s)config.json.*100"):
        SiglipVisionConfig.from_json_file(bad)
    with pytest.raises(FileNotFoundError, match="nope"):
        SiglipVisionConfig.from_json_file(tmp_path / "nope" / "config.json")
    with pytest.raises(TypeError, match="unknown config field"):
        SiglipVisionConfig.from_dict({}, hidden_sise=3)
