"""Drop-in use inside VLM servers: our tower inside transformers' PaliGemma, and the caller's weights."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from checkpoints import TINY, save_layout, vision_model
from distributed import run_ranks


@pytest.fixture(scope="module")
def pali(tmp_path_factory):
    """A tiny random PaliGemma built and saved by transformers, its logits on one prompt, and the Hub-named copy."""
    from transformers import PaliGemmaForConditionalGeneration

    root = tmp_path_factory.mktemp("vlm")
    ckpt = save_layout(vision_model(TINY, seed=21), "paligemma_v5", root / "pali")
    hub = save_layout(vision_model(TINY, seed=21), "paligemma_hub", root / "pali_hub")
    # transformers loads the Hub's layout (4.x and 5.x alike); our tower reads transformers 5's layout (ckpt)
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(hub, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    tokens = (TINY["image_size"] // TINY["patch_size"]) ** 2
    ids = torch.tensor([[model.config.image_token_index] * tokens + [2, 5, 7, 9]] * 2)
    pixels = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    return root, ckpt, hub, logits, {"ids": ids, "pixels": pixels}


def _swap(rank, world_size, prompt, ckpt, hub):
    from transformers import PaliGemmaForConditionalGeneration

    from tp_siglip import SiglipVisionTransformer

    model = PaliGemmaForConditionalGeneration.from_pretrained(hub, attn_implementation="eager").eval()
    inner = getattr(model, "model", model)  # transformers < 4.52 has no .model level
    inner.vision_tower = SiglipVisionTransformer.from_pretrained(ckpt, world_size=world_size)
    with torch.no_grad():
        return model(input_ids=prompt["ids"], pixel_values=prompt["pixels"]).logits


@pytest.mark.parametrize("world_size", [1, 2])
def test_paligemma_with_our_tower_gives_the_same_logits(pali, world_size):
    root, ckpt, hub, logits, prompt = pali
    for ours in run_ranks(world_size, root, _swap, prompt, str(ckpt), str(hub)):
        torch.testing.assert_close(ours, logits, atol=1e-4, rtol=0)


def _two_step(rank, world_size, pixels, ckpt):
    from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer

    group = dist.group.WORLD
    config = SiglipVisionConfig.from_json_file(os.path.join(ckpt, "config.json"))
    model = SiglipVisionTransformer(config, process_group=group, device="meta")
    everything = load_file(os.path.join(ckpt, "model.safetensors"))  # what a server's own iterator yields
    report = model.load_weights(everything.items())
    assert report.prefix == "vision_tower.vision_model." and not report.missing and not report.unexpected
    assert len(report.loaded) == len(model.state_dict())
    # each rank kept only its slice
    assert model.state_dict()["encoder.layers.0.self_attn.q_proj.weight"].shape == (TINY["hidden_size"] // 2, TINY["hidden_size"])
    assert model.encoder.layers[0].mlp.fc2.weight.shape == (TINY["hidden_size"], TINY["intermediate_size"] // 2)
    reference = SiglipVisionTransformer.from_pretrained(ckpt, process_group=group)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with torch.inference_mode():
        assert torch.equal(model(pixels).last_hidden_state, reference(pixels).last_hidden_state)

    # what is wrong is reported, by name
    broken = dict(everything)
    broken.pop("vision_tower.vision_model.encoder.layers.1.self_attn.k_proj.bias")
    broken["vision_tower.vision_model.encoder.layers.0.mlp.fc9.weight"] = torch.zeros(2)
    fresh = SiglipVisionTransformer(config, process_group=group, device="meta")
    with pytest.raises(ValueError, match="(?s)missing.*layers.1.self_attn.k_proj.bias.*unexpected.*fc9"):
        fresh.load_weights(broken.items())
    report = fresh.load_weights(broken.items(), strict=False)
    assert report.missing == ["vision_tower.vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    assert report.unexpected == ["vision_tower.vision_model.encoder.layers.0.mlp.fc9.weight"]
    with pytest.raises(RuntimeError, match="not loaded"):
        fresh(pixels)
    broken = dict(everything)
    broken["vision_tower.vision_model.post_layernorm.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"post_layernorm.bias: given \[5\] vs model \[96\]"):
        SiglipVisionTransformer(config, process_group=group, device="meta").load_weights(broken.items())
    with pytest.raises(TypeError, match=r"\(str, torch.Tensor\) pairs"):
        SiglipVisionTransformer(config, process_group=group, device="meta").load_weights([("a", 1)])


def test_load_weights_two_step_path_equals_from_pretrained(pali):
    root, _, hub, _, prompt = pali
    run_ranks(2, root, _two_step, prompt["pixels"], str(hub))
