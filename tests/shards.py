"""Small img2dataset-style shards for the corpus tests: webdataset tars and parquet files.

img2dataset writes ``KEY.jpg`` + ``KEY.json`` (+ ``KEY.txt``, the caption) per sample in ``00000.tar``, keys
being zero-padded 9-digit numbers whose first digits are the shard number; its parquet output has a ``key``
column, the image bytes in ``jpg`` and the other fields beside them. ``make_tar`` / ``make_parquet`` write
such shards with real JPEG/PNG bytes; ``samples`` returns what each key holds, for the reference.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(24, 60)), int(rng.integers(24, 60)))
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    coarse.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path: Path, shard: int, count: int, *, missing_image: int = -1, corrupt: int = -1) -> dict[str, bytes]:
    """A webdataset shard of ``count`` samples; returns ``{key: image bytes}`` of those that have an image.

    Sample ``missing_image`` has only its json and txt; sample ``corrupt`` has half a JPEG.
    """
    images = {}
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            key = f"{shard:05d}{i:04d}"
            data = image_bytes(1000 * shard + i, "PNG" if i % 3 == 2 else "JPEG")
            if i == corrupt:
                data = data[: len(data) // 2]
            if i != missing_image:
                _add(tar, f"{key}.{'png' if i % 3 == 2 else 'jpg'}", data)
                images[key] = data
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "caption": f"caption {key}"}
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            _add(tar, f"{key}.txt", f"caption {key}".encode())
    return images


def make_parquet(path: Path, shard: int, count: int) -> dict[str, bytes]:
    """An img2dataset parquet shard (``key``, ``jpg``, ``url``, ``caption``); returns ``{key: image bytes}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [f"{shard:05d}{i:04d}" for i in range(count)]
    images = {key: image_bytes(7000 + 1000 * shard + i) for i, key in enumerate(keys)}
    table = pa.table({
        "key": keys,
        "jpg": [images[k] for k in keys],
        "url": [f"https://example.com/{k}.jpg" for k in keys],
        "caption": [f"caption {k}" for k in keys],
    })
    pq.write_table(table, path, row_group_size=4)
    return images
