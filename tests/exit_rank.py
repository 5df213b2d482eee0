"""A rank whose checkpoint load is refused, caught, and followed by a normal exit (``tests/test_exit.py``).

Usage, with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set as torchrun sets them::

    python exit_rank.py CHECKPOINT_OF_RANK_0 CHECKPOINT_OF_RANK_1 ...

Loads this rank's checkpoint with ``world_size=$WORLD_SIZE`` inside ``try``/``except`` (the library
creates the process group) and prints ``REFUSED: <error>``, or ``LOADED`` and then runs one forward in
which the last rank's pixels hold a NaN (refused on every rank), printing ``FORWARD REFUSED: <error>``.
Returns 0 either way: the process must then exit 0, without gloo aborting it at interpreter exit.
"""

import os
import sys


def main() -> int:
    import torch

    from tp_siglip import SiglipVisionTransformer

    torch.set_num_threads(1)
    checkpoint = sys.argv[1 + int(os.environ["RANK"])]
    try:
        model = SiglipVisionTransformer.from_pretrained(checkpoint, world_size=int(os.environ["WORLD_SIZE"]))
    except Exception as err:  # a caller that handles the failure and carries on
        print(f"REFUSED: {type(err).__name__}: {err}", flush=True)
        return 0
    print("LOADED", flush=True)
    size = model.config.image_size
    pixels = torch.zeros(1, model.config.num_channels, size, size)
    if model.rank == model.world_size - 1:
        pixels[0, 0, 0, 0] = float("nan")
    try:
        model(pixels)
    except Exception as err:
        print(f"FORWARD REFUSED: {type(err).__name__}: {err}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
