"""torch.compile(model, fullgraph=True) matches eager on one rank and under tensor parallelism
(where the all-reduces become traceable functional collectives)."""

from __future__ import annotations

import torch

from checkpoints import save_layout, vision_model
from distributed import run_ranks

SMALL = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8)


def _compiled_vs_eager(rank, world_size, pixels, ckpt):
    from tp_siglip import SiglipVisionTransformer

    model = SiglipVisionTransformer.from_pretrained(ckpt, world_size=world_size)
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        eager = model(pixels)
        fast = compiled(pixels)
    return {"eager": eager.pooler_output, "compiled": fast.pooler_output,
            "eager_last": eager.last_hidden_state, "compiled_last": fast.last_hidden_state}


def test_compiled_matches_eager_single_rank_and_tensor_parallel(tmp_path):
    reference = vision_model(SMALL, seed=3)
    ckpt = save_layout(reference, "v5_vision", tmp_path / "ckpt")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = reference(pixels)
    for world_size in (1, 2):
        for out in run_ranks(world_size, tmp_path, _compiled_vs_eager, pixels, str(ckpt)):
            torch.testing.assert_close(out["compiled"], out["eager"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["compiled_last"], out["eager_last"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["compiled"], ref.pooler_output, atol=1e-4, rtol=0)
