"""The library calls shown in README.md and docs/vlm-server.md, runnable: build a random-weight SigLIP checkpoint with transformers, load it
with tp-siglip on every torchrun rank, and check it against transformers.

    torchrun --nproc-per-node 2 examples/readme_snippet.py [CHECKPOINT_DIR]

Needs transformers (the test extra). Without CHECKPOINT_DIR it writes a small checkpoint to a
temporary folder (rank 0 writes, the others wait for it).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(directory: Path) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                num_attention_heads=4, image_size=64, patch_size=16)
    SiglipVisionModel(config).save_pretrained(directory)


def main() -> None:
    from transformers import SiglipVisionModel

    from tp_siglip import SiglipVisionTransformer

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "tp-siglip-readme")
    if rank == 0 and not (directory / "config.json").exists():
        make_checkpoint(directory)
    while not (directory / "config.json").exists():  # others wait for rank 0's files
        time.sleep(0.1)

    # --- the README snippet ---
    model = SiglipVisionTransformer.from_pretrained(directory, world_size=world_size)
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 64, 64)
    bigger_pixels = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        out = model(pixel_values)
        states = model(pixel_values, output_hidden_states=True).hidden_states
        bigger = model(bigger_pixels, interpolate_pos_encoding=True)
    # --- end of snippet ---

    reference = SiglipVisionModel.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.inference_mode():
        ref = reference(pixel_values, output_hidden_states=True)
        ref_big = reference(bigger_pixels, interpolate_pos_encoding=True)
    diffs = {
        "last_hidden_state": (out.last_hidden_state - ref.last_hidden_state).abs().max().item(),
        "pooler_output": (out.pooler_output - ref.pooler_output).abs().max().item(),
        "hidden_states": max((a - b).abs().max().item() for a, b in zip(states, ref.hidden_states)),
        "interpolated": (bigger.last_hidden_state - ref_big.last_hidden_state).abs().max().item(),
    }
    print(f"rank {rank}/{world_size}: last_hidden_state {tuple(out.last_hidden_state.shape)}, "
          f"pooler_output {tuple(out.pooler_output.shape)}, {len(states)} hidden states, "
          f"interpolated {tuple(bigger.last_hidden_state.shape)}; max |ours - transformers| = "
          f"{max(diffs.values()):.2e}")
    if max(diffs.values()) > 1e-4:
        raise SystemExit(f"rank {rank}: outputs differ from transformers: {diffs}")


if __name__ == "__main__":
    main()
