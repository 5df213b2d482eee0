"""Swap transformers' PaliGemma vision tower for tp-siglip's tensor-parallel one.

    torchrun --nproc-per-node 2 examples/paligemma_swap.py --model google/paligemma2-3b-pt-224 photo.jpg

Every rank loads the language model as usual (shard it with your server's own TP), then replaces
``model.model.vision_tower`` with our encoder sharded over the same ranks. transformers reads
``last_hidden_state`` from it and feeds the projector; the generated text is the same as without the swap.
"""

from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="google/paligemma2-3b-pt-224", help="PaliGemma repo id or directory")
    parser.add_argument("--prompt", default="caption en")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("image")
    args = parser.parse_args()

    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    from tp_siglip import SiglipVisionTransformer
    from tp_siglip.processing import load_image

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = PaliGemmaForConditionalGeneration.from_pretrained(args.model).eval()
    # the swap: our tower, sharded over the torchrun ranks, in the dtype the VLM runs in
    model.model.vision_tower = SiglipVisionTransformer.from_pretrained(
        args.model, world_size=world_size, dtype=model.dtype, device=model.device
    )
    processor = AutoProcessor.from_pretrained(args.model)
    inputs = processor(text=args.prompt, images=load_image(args.image), return_tensors="pt").to(model.device)
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    if int(os.environ.get("RANK", "0")) == 0:
        print(processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
