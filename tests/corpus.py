"""A small folder that looks like a real corpus: good images next to every kind of bad file.

``make_corpus(folder)`` writes (names sorted as `find_images` lists them):

* good: ``a_good.png`` (RGB), ``c_good.jpg`` (JPEG), ``sub/f_good.png`` (grayscale), ``sub/g_good.webp``;
* unreadable (right extension, wrong content): ``b_truncated.jpg`` (half a JPEG), ``d_text.png`` (a text
  file), ``e_empty.jpg`` (0 bytes), ``sub/h_float.tiff`` (a valid TIFF whose pixel format, 3 x float32,
  Pillow cannot decode), ``sub/i_truncated.png`` (half a PNG), ``sub/j_broken.jpg`` (a link to a file that
  is gone);
* ignored: ``notes.txt``, ``data.json``, ``README`` (no extension), ``.hidden.png`` (hidden).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

GOOD = ["a_good.png", "c_good.jpg", "sub/f_good.png", "sub/g_good.webp"]
BAD = {  # file -> a fragment of the reason tp-siglip gives
    "b_truncated.jpg": "truncated",
    "d_text.png": "not an image",
    "e_empty.jpg": "empty file (0 bytes)",
    "sub/h_float.tiff": "unsupported pixel format",
    "sub/i_truncated.png": "truncated",
    "sub/j_broken.jpg": "a broken link to",
}
IGNORED = {".txt": 1, ".json": 1, "(none)": 1}
HIDDEN = 1
LISTED = sorted([*GOOD, *BAD], key=lambda name: Path(name).parts)  # what find_images returns, relative


def float_rgb_tiff() -> bytes:
    """A 1x1 TIFF with three 32-bit float samples: a well-formed file in a pixel format Pillow cannot decode."""
    samples, bits = 3, 32
    entries = [  # (tag, type, count, value): 3 = SHORT, 4 = LONG
        (256, 4, 1, 1), (257, 4, 1, 1), (258, 3, samples, 0), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, 0),
        (277, 3, 1, samples), (278, 4, 1, 1), (279, 4, 1, samples * bits // 8), (284, 3, 1, 1), (339, 3, samples, 0),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at, format_at = 8 + ifd_size, 8 + ifd_size + 2 * samples
    pixels_at = format_at + 2 * samples
    values = {258: bits_at, 339: format_at, 273: pixels_at}
    body = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = values.get(tag, value)
        body += struct.pack("<HHII", tag, kind, count, value) if kind == 4 or count > 1 else struct.pack("<HHIHH", tag, kind, count, value, 0)
    body += struct.pack("<I", 0) + struct.pack("<3H", bits, bits, bits) + struct.pack("<3H", 3, 3, 3)
    return body + b"\x00" * (samples * bits // 8)


def make_corpus(folder: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)

    def noise(height: int, width: int, channels: int = 3) -> Image.Image:
        shape = (height, width, channels) if channels > 1 else (height, width)
        return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))

    noise(30, 40).save(folder / "a_good.png")
    noise(48, 36).save(folder / "c_good.jpg", quality=90)
    noise(20, 20, 1).save(folder / "sub/f_good.png")
    noise(25, 33).save(folder / "sub/g_good.webp", lossless=True)
    noise(64, 64).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "full.jpg").unlink()
    (folder / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
    noise(64, 64).save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "full.png").unlink()
    (folder / "sub/i_truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "d_text.png").write_text("this is not an image\n")
    (folder / "e_empty.jpg").write_bytes(b"")
    (folder / "sub/h_float.tiff").write_bytes(float_rgb_tiff())
    if not (folder / "sub/j_broken.jpg").is_symlink():
        (folder / "sub/j_broken.jpg").symlink_to("gone.jpg")
    (folder / "notes.txt").write_text("notes\n")
    (folder / "data.json").write_text("{}\n")
    (folder / "README").write_text("readme\n")
    noise(10, 10).save(folder / ".hidden.png")
    return folder
