"""torch.compile(model, fullgraph=True) matches eager on one rank and under tensor parallelism
(where the all-reduces become traceable functional collectives)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from checkpoints import save_layout, vision_model
from distributed import run_ranks

SMALL = dict(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=8)


def _compiled_vs_eager(rank, world_size, root, ckpt):
    from tp_siglip import SiglipVisionTransformer

    model = SiglipVisionTransformer.from_pretrained(ckpt, world_size=world_size)
    pixels = load_file(os.path.join(root, "pixels.safetensors"))["pixels"]
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        eager = model(pixels)
        fast = compiled(pixels)
    save_file({"eager": eager.pooler_output, "compiled": fast.pooler_output,
               "eager_last": eager.last_hidden_state.contiguous(), "compiled_last": fast.last_hidden_state.contiguous()},
              os.path.join(root, f"compiled-{world_size}-{rank}.safetensors"))


def test_compiled_matches_eager_single_rank_and_tensor_parallel(tmp_path):
    reference = vision_model(SMALL, seed=3)
    ckpt = save_layout(reference, "v5_vision", tmp_path / "ckpt")
    pixels = torch.randn(2, 3, 32, 32)
    save_file({"pixels": pixels}, str(tmp_path / "pixels.safetensors"))
    with torch.no_grad():
        ref = reference(pixels)
    for world_size in (1, 2):
        run_ranks(world_size, tmp_path, _compiled_vs_eager, str(tmp_path), str(ckpt))
        for rank in range(world_size):
            out = load_file(str(tmp_path / f"compiled-{world_size}-{rank}.safetensors"))
            torch.testing.assert_close(out["compiled"], out["eager"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["compiled_last"], out["eager_last"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["compiled"], ref.pooler_output, atol=1e-4, rtol=0)
