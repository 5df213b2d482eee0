"""Peak memory of ``tp-siglip encode`` against corpus size: does it stay flat from 200 to 2,000 images?

    python benchmarks/encode_memory.py                 # 200 and 2,000 images, with and without --tokens
    python benchmarks/encode_memory.py --sizes 200 20000

Everything is generated on the fly in a temporary folder: a tiny random checkpoint (built with tp-siglip
itself, no transformers needed) and small random PNGs. Each run is a fresh ``python -m tp_siglip.encode``
process (one rank, one thread); its peak resident set size is the kernel's ``ru_maxrss`` for that child,
read with ``os.wait4`` (so the figures of different runs do not mix). Prints one Markdown table.

The model is sized so that ``--tokens`` rows are large (64 patches x 256 floats = 64 KiB per image): if
rows were kept in memory, 2,000 images would add ~120 MiB to the peak; spooled to disk they add nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8)


def make_checkpoint(folder: Path) -> Path:
    from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer

    config = SiglipVisionConfig(**CONFIG)
    model = SiglipVisionTransformer(config)  # randomly initialised, one rank
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"{index:06d}.png")
    return folder


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child process; raises if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{argv} exited {child.returncode}: {child.stderr.read().decode()[-2000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return usage.ru_maxrss * scale / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000], help="corpus sizes to compare")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="tp-siglip-memory-") as tmp:
        root = Path(tmp)
        checkpoint = make_checkpoint(root / "checkpoint")
        rows = []
        for size in args.sizes:
            images = make_images(root / f"images-{size}", size)
            for tokens in (False, True):
                output = root / f"out-{size}-{tokens}.safetensors"
                argv = [sys.executable, "-m", "tp_siglip.encode", str(images), "--model", str(checkpoint),
                        "--output", str(output), "--batch-size", str(args.batch_size), "--dtype", "float32"]
                mib, seconds = peak_rss(argv + (["--tokens"] if tokens else []))
                rows.append((size, tokens, mib, output.stat().st_size / 2**20, seconds))
                output.unlink()
    print(f"tp-siglip encode, one rank, batch {args.batch_size}, model {CONFIG}")
    print()
    print("| images | --tokens | peak RSS (MiB) | output file (MiB) | wall time (s) |")
    print("|---:|:---:|---:|---:|---:|")
    for size, tokens, mib, out_mib, seconds in rows:
        print(f"| {size} | {'yes' if tokens else 'no'} | {mib:.0f} | {out_mib:.1f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
