"""Encode a folder of images with a SigLIP vision tower split over several processes.

    torchrun --nproc-per-node 2 examples/encode.py                  # bundled images, default model
    torchrun --nproc-per-node 2 examples/encode.py --model google/siglip-so400m-patch14-384 \
        photos/ --output emb.safetensors
    python examples/encode.py photos/                               # one process, no torchrun

Every rank reads the same images. With ``--parallel tensor`` (default) each rank holds a slice of the
weights and works on the whole batch; with ``--parallel data`` each rank holds all the weights and
encodes its share of the batch. Rank 0 writes one safetensors file:

* ``pooler_output`` (N, hidden): the attention-pooled embedding, for towers with a pooling head;
  ``mean_pooled`` (N, hidden) instead for towers without one (e.g. PaliGemma's): the mean of
  ``last_hidden_state`` over the patches;
* ``last_hidden_state`` (N, patches, hidden), only with ``--tokens``;
* metadata: ``paths`` (JSON list, row order), ``model``, ``dtype``, ``world_size``, ``parallel``,
  ``embedding`` (which of the two embedding tensors is stored).

Tensors are stored as float32 whatever ``--dtype`` the model ran in. Rank 0 then prints the throughput
and the cosine similarities of the first few images.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from tp_siglip import SiglipVisionTransformer
from tp_siglip.processing import find_images, iter_batches

DEFAULT_IMAGES = Path(__file__).resolve().parent / "images"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Encode images with a (tensor-parallel) SigLIP vision tower.")
    parser.add_argument("inputs", nargs="*", type=Path, help=f"image files and/or folders (default: {DEFAULT_IMAGES})")
    parser.add_argument("--model", default="google/siglip-base-patch16-224", help="Hub repo id or local folder")
    parser.add_argument("--output", type=Path, default=Path("embeddings.safetensors"), help="safetensors file to write")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    parser.add_argument("--parallel", default="tensor", choices=["tensor", "data"], help="split weights or batch")
    parser.add_argument("--tokens", action="store_true", help="also store last_hidden_state (held in memory)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: this rank's GPU if any, else cpu)")
    return parser.parse_args(argv)


def encode(args: argparse.Namespace, rank: int, world_size: int) -> None:
    inputs = args.inputs or [DEFAULT_IMAGES]
    paths = find_images(inputs)
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")

    model = SiglipVisionTransformer.from_pretrained(
        args.model, world_size=world_size, dtype=args.dtype, device=args.device, parallel=args.parallel
    )
    pooled_name = "pooler_output" if model.use_head else "mean_pooled"
    dtype_name = str(model.dtype).removeprefix("torch.")
    if rank == 0:
        print(f"{args.model}: {len(paths)} images, {dtype_name}, {world_size} rank(s), {args.parallel} parallel")
        if not model.use_head:
            print("this tower has no pooling head: storing the mean of last_hidden_state over patches as mean_pooled")

    pooled, tokens = [], []
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(paths), unit="img", disable=rank != 0) as bar:
        for batch_paths, pixels in iter_batches(paths, args.batch_size, model.config.image_size, model.dtype):
            out = model(pixels.to(model.device))
            vectors = out.pooler_output if model.use_head else out.last_hidden_state.mean(dim=1)
            if rank == 0:  # every rank has the full outputs; only rank 0 keeps them
                pooled.append(vectors.float().cpu())
                if args.tokens:
                    tokens.append(out.last_hidden_state.float().cpu())
            bar.update(len(batch_paths))
    seconds = time.perf_counter() - start
    if rank != 0:
        return

    tensors = {pooled_name: torch.cat(pooled)}
    if args.tokens:
        tensors["last_hidden_state"] = torch.cat(tokens)
    metadata = {
        "paths": json.dumps([str(p) for p in paths]),
        "model": str(args.model),
        "dtype": dtype_name,
        "world_size": str(world_size),
        "parallel": args.parallel,
        "embedding": pooled_name,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.output), metadata=metadata)
    print(f"{len(paths)} images in {seconds:.2f} s: {len(paths) / seconds:.1f} images/s; wrote {args.output}")
    print_similarities(tensors[pooled_name][:5], [p.stem for p in paths[:5]])


def print_similarities(vectors: torch.Tensor, names: list[str]) -> None:
    """Cosine similarity of every pair, as a small table with short names."""
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    similarity = unit @ unit.T
    names = [n if len(n) <= 10 else n[:9] + "~" for n in names]
    print(f"cosine similarity of the first {len(names)} images")
    print(" " * 10 + "".join(f"{n:>11}" for n in names))
    for name, row in zip(names, similarity.tolist()):
        print(f"{name:<10}" + "".join(f"{v:>11.3f}" for v in row))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bad options: argparse prints the usage and exits with status 2 on every rank
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        encode(args, rank, world_size)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as err:
        # Every rank sees the same inputs, so input errors happen on every rank; a failed load is
        # reported on every rank by from_pretrained. No rank is left waiting for another.
        print(f"[rank {rank}] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
