"""Encode a folder of images with a SigLIP vision tower split over several processes.

    torchrun --nproc-per-node 2 examples/encode.py                  # bundled images, default model
    torchrun --nproc-per-node 2 examples/encode.py --model google/siglip-so400m-patch14-384 \
        photos/ --output emb.safetensors
    python examples/encode.py photos/                               # one process, no torchrun

The job itself lives in the installed package, so after ``pip install tp-siglip`` the same runs as
``tp-siglip encode ...`` or ``torchrun --nproc-per-node 2 -m tp_siglip.encode ...``; this file only shows
how little a script needs. ``python examples/encode.py --help`` lists every option and its default.

What one run does, in terms of the library (see ``tp_siglip/encode.py`` for the full job: checks, skipped
files, atomic and resumable output)::

    from tp_siglip import SiglipVisionTransformer
    from tp_siglip.processing import find_images, iter_batches

    model = SiglipVisionTransformer.from_pretrained(repo_or_folder, world_size=world_size)
    for paths, pixels in iter_batches(find_images(folders), 8, model.config.image_size, model.dtype):
        embeddings = model(pixels.to(model.device)).pooler_output   # full result on every rank
"""

import sys

from tp_siglip.encode import main

if __name__ == "__main__":
    sys.exit(main(prog="examples/encode.py"))
