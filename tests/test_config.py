"""SiglipVisionConfig: transformers' names and defaults, both config layouts, clear rejections."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tp_siglip import SiglipVisionConfig
from tp_siglip.config import find_vision_config


@pytest.mark.parametrize("hf_name", ["SiglipVisionConfig", "Siglip2VisionConfig", "Idefics3VisionConfig", "SmolVLMVisionConfig"])
def test_defaults_equal_transformers(hf_name):
    """Each tower type's defaults, read from a config that names only its model_type, equal transformers'."""
    import transformers

    theirs = getattr(transformers, hf_name)()
    ours = SiglipVisionConfig.from_dict({"model_type": theirs.model_type})
    compared = [name for name in SiglipVisionConfig.model_fields if name in theirs.to_dict()]
    assert {"hidden_size", "patch_size", "num_attention_heads", "hidden_act"} <= set(compared)
    for name in compared:
        if name != "vision_use_head":  # None in transformers' Idefics3 configs; decided by the checkpoint here
            assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.use_head == (hf_name in ("SiglipVisionConfig", "Siglip2VisionConfig"))
    assert ours.variant == {"Siglip2VisionConfig": "naflex", "SiglipVisionConfig": "siglip"}.get(hf_name, "idefics3")
    nested = SiglipVisionConfig.from_dict({"model_type": "x", "vision_config": theirs.to_dict()})
    assert nested.use_head == ours.use_head
    assert nested.model_copy(update={"vision_use_head": None}) == ours.model_copy(update={"vision_use_head": None})


def test_vision_config_found_at_any_depth_and_never_invented():
    colpali = {"model_type": "colpali", "text_config": {"model_type": "gemma", "hidden_size": 32},
               "vlm_config": {"model_type": "paligemma", "text_config": {"hidden_size": 32},
                              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 64,
                                                "num_attention_heads": 4, "patch_size": 8, "image_size": 32}}}
    assert SiglipVisionConfig.from_dict(colpali).hidden_size == 64
    assert find_vision_config(colpali)[1] == "vlm_config.vision_config"
    # a nested config without model_type takes its parent's tower type
    assert SiglipVisionConfig.from_dict({"model_type": "siglip2", "vision_config": {}}).variant == "naflex"
    with pytest.raises(ValueError, match="model_type 'llama' with no vision_config at any depth.*config="):
        SiglipVisionConfig.from_dict({"model_type": "llama", "hidden_act": "silu", "hidden_size": 32})
    with pytest.raises(ValueError, match="'clip_vision_model' is not a SigLIP-family tower"):
        SiglipVisionConfig.from_dict({"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}})
    with pytest.raises(ValueError, match="num_patches 10 must be a square"):
        SiglipVisionConfig(variant="naflex", num_patches=10)
    with pytest.raises(ValueError, match="num_patches 10 does not match image_size 32"):
        SiglipVisionConfig(image_size=32, patch_size=8, num_patches=10)


def test_reads_vision_and_nested_configs_ignoring_unknown_keys(tmp_path):
    from transformers import SiglipConfig

    # google/siglip-base-patch16-224 keeps little more than patch_size in its vision_config
    nested = SiglipConfig(vision_config={"patch_size": 16}).to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(nested))
    cfg = SiglipVisionConfig.from_json_file(path)
    assert cfg == SiglipVisionConfig(patch_size=16, vision_use_head=True)  # transformers writes the flag
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
        ({"global_pool": "avg", "vision_use_head": True}, "global_pool='avg'"),
        ({"global_pool": "avg", "variant": "naflex"}, "global_pool='avg'"),
        ({"global_pool": "map", "vision_use_head": False}, "global_pool='map'"),
        ({"preprocessing": {"library": "timm", "resize": "squash", "crop_pct": 1.5}}, "crop_pct"),
        ({"preprocessing": {"library": "timm", "resize": "squash", "std": (0.5, 0, 0.5)}}, "std"),
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


def test_gap_pooling_drops_the_head_and_round_trips():
    """global_pool='avg' (timm's GAP towers) implies no head; the extra fields survive to_dict / from it."""
    config = SiglipVisionConfig(global_pool="avg", preprocessing={"library": "open_clip", "resize": "longest", "fill": (7, 7, 7)})
    assert config.use_head is False and config.vision_use_head is False
    assert SiglipVisionConfig(**config.to_dict()) == config
    assert SiglipVisionConfig().global_pool is None and SiglipVisionConfig().preprocessing is None
