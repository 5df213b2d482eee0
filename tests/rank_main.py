"""A rank launched by hand (no torchrun agent): load a checkpoint with world_size=$WORLD_SIZE, encode.

Usage: python rank_main.py CHECKPOINT OUTPUT.safetensors INPUT.safetensors
Exits 0 after writing the outputs, 3 after printing ``FAILED: <error>`` on stderr.
"""

import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> int:
    from tp_siglip import SiglipVisionTransformer

    torch.set_num_threads(1)
    ckpt, output, inputs = sys.argv[1:4]
    import os

    try:
        model = SiglipVisionTransformer.from_pretrained(ckpt, world_size=int(os.environ["WORLD_SIZE"]))
    except Exception as err:  # the test reads what each rank was told
        print(f"FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 3
    with torch.inference_mode():
        out = model(load_file(inputs)["pixels"])
    save_file({"pooler_output": out.pooler_output.contiguous()}, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
