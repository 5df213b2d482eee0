"""Random init: transformers' recipe, and the same model at every world size for the same seed."""

from __future__ import annotations

import math

import torch

from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer
from tp_siglip.initialization import default_flax_embed_init, lecun_normal_, trunc_normal_tf_, variance_scaling_

from distributed import run_ranks

CONFIG = SiglipVisionConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                            image_size=32, patch_size=8)


def test_trunc_normal_tf_truncates_before_scaling():
    torch.manual_seed(0)
    t = trunc_normal_tf_(torch.empty(200_000), mean=1.0, std=0.5, a=-2.0, b=2.0)
    assert t.min() >= 1.0 - 2 * 0.5 and t.max() <= 1.0 + 2 * 0.5
    assert abs(t.mean().item() - 1.0) < 0.01
    assert abs(t.std().item() - 0.5 * 0.8796) < 0.01  # a [-2, 2]-truncated unit normal has std 0.8796


def test_variance_scaling_family():
    torch.manual_seed(0)
    w = lecun_normal_(torch.empty(512, 1024))
    assert abs(w.std().item() - 1 / math.sqrt(1024)) < 0.002
    assert w.abs().max().item() <= 2 / 0.87962566103423978 / math.sqrt(1024) + 1e-6
    e = default_flax_embed_init(torch.empty(300, 400))
    assert abs(e.std().item() - 1 / math.sqrt(400)) < 0.002
    u = variance_scaling_(torch.empty(256, 512), scale=2.0, mode="fan_out", distribution="uniform")
    assert u.abs().max().item() <= math.sqrt(3 * 2.0 / 256)
    conv = lecun_normal_(torch.empty(64, 3, 8, 8))  # fan_in = 3 * 8 * 8
    assert abs(conv.std().item() - 1 / math.sqrt(192)) < 0.005


def test_model_init_matches_transformers_recipe():
    model = SiglipVisionTransformer(CONFIG, seed=1)
    d = CONFIG.hidden_size
    assert torch.equal(model.post_layernorm.weight, torch.ones(d))
    assert torch.equal(model.state_dict()["encoder.layers.0.self_attn.q_proj.bias"], torch.zeros(d))
    pos = model.embeddings.position_embedding.weight
    assert abs(pos.std().item() - 1 / math.sqrt(d)) < 0.01
    fc1 = model.encoder.layers[0].mlp.fc1
    bound = math.sqrt(6 / (d + CONFIG.intermediate_size))  # xavier uniform
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.9 * bound
    assert 0 < fc1.bias.abs().max() < 1e-5  # normal(std=1e-6)
    assert model.state_dict()["head.attention.in_proj_weight"].abs().max() <= math.sqrt(6 / (d + 3 * d))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out.last_hidden_state).all() and out.pooler_output.shape == (2, d)
    # the same seed gives the same model; another seed another
    assert torch.equal(SiglipVisionTransformer(CONFIG, seed=1).head.probe, model.head.probe)
    assert not torch.equal(SiglipVisionTransformer(CONFIG, seed=2).head.probe, model.head.probe)


def _random_model(rank, world_size, pixels):
    import torch.distributed as dist

    model = SiglipVisionTransformer(CONFIG, process_group=dist.group.WORLD, seed=5)
    with torch.no_grad():
        return model(pixels).pooler_output


def test_random_init_is_the_same_model_at_every_world_size(tmp_path):
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        single = SiglipVisionTransformer(CONFIG, seed=5)(pixels).pooler_output
    for pooled in run_ranks(3, tmp_path, _random_model, pixels):
        torch.testing.assert_close(pooled, single, atol=1e-5, rtol=0)
