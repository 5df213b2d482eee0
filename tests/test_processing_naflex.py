"""``tp_siglip.processing_naflex`` against transformers' PIL-based SigLIP2 image processor, bit for bit.

The reference is ``Siglip2ImageProcessorPil`` (transformers 5.x), which is what ``Siglip2ImageProcessor``
resolves to without torchvision. On 4.x the reference is the slow ``Siglip2ImageProcessor``. Its default
``do_convert_rgb=None`` only accepts RGB, so non-RGB images are compared with ``do_convert_rgb=True``, the
conversion this module always applies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tp_siglip.processing_naflex import naflex_target_size, preprocess_naflex

KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


@pytest.fixture(scope="module")
def reference():
    try:
        from transformers import Siglip2ImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers import Siglip2ImageProcessor as Processor

    def run(images, *, patch_size: int, max_num_patches: int, convert: bool) -> dict[str, torch.Tensor]:
        processor = Processor(do_convert_rgb=True) if convert else Processor()
        out = processor(images, return_tensors="pt", patch_size=patch_size, max_num_patches=max_num_patches)
        return {key: out[key] for key in KEYS}

    return run


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(KEYS)
    for key in KEYS:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key


def _image(mode: str, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "P-transparent":
        image = image.convert("P")
        image.info["transparency"] = 0
        return image
    return image.convert(mode)


CASES = [
    ("RGB", 37, 50, 8, 64),
    ("RGB", 224, 224, 16, 256),
    ("RGB", 300, 200, 16, 256),
    ("RGB", 200, 300, 14, 16),
    ("RGB", 1, 1, 16, 256),  # tiny: grows at most ~100x, so 7x7 patches of 256
    ("RGB", 3, 400, 16, 64),  # very wide: a 1-patch-tall grid
    ("RGB", 900, 5, 8, 32),  # very tall
    ("RGB", 64, 64, 8, 1),  # a single patch
    ("RGBA", 40, 30, 8, 16),
    ("L", 64, 64, 8, 64),
    ("LA", 9, 9, 8, 64),
    ("P", 20, 90, 16, 256),
    ("P-transparent", 31, 17, 8, 48),
    ("CMYK", 33, 33, 8, 32),
    ("1", 17, 80, 8, 64),
    ("I;16", 30, 20, 8, 16),
]


@pytest.mark.parametrize(("mode", "height", "width", "patch", "limit"), CASES)
def test_matches_transformers(reference, mode: str, height: int, width: int, patch: int, limit: int) -> None:
    image = _image(mode, height, width)
    ours = preprocess_naflex(image, patch_size=patch, max_num_patches=limit)
    assert_same(ours, reference(image, patch_size=patch, max_num_patches=limit, convert=mode != "RGB"))


def test_batch_of_mixed_images(reference) -> None:
    images = [_image("RGB", h, w, seed) for seed, (h, w) in enumerate([(50, 70), (70, 50), (16, 16), (5, 300)])]
    ours = preprocess_naflex(images, patch_size=8, max_num_patches=40)
    assert_same(ours, reference(images, patch_size=8, max_num_patches=40, convert=False))
    assert len({tuple(shape) for shape in ours["spatial_shapes"].tolist()}) == 4
    single = preprocess_naflex(images[1], patch_size=8, max_num_patches=40)
    for key in KEYS:
        assert torch.equal(ours[key][1:2], single[key])


def test_files_match(reference, tmp_path: Path) -> None:
    """Paths: an RGBA PNG (alpha dropped, as transformers' load_image does) and a JPEG turned by its EXIF tag."""
    png = tmp_path / "alpha.png"
    _image("RGBA", 45, 61).save(png)
    jpeg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _image("RGB", 40, 90, seed=3).save(jpeg, exif=exif)
    paths = [str(png), jpeg]
    ours = preprocess_naflex(paths, patch_size=8, max_num_patches=32)
    assert_same(ours, reference([str(p) for p in paths], patch_size=8, max_num_patches=32, convert=False))
    assert ours["spatial_shapes"][1, 0] > ours["spatial_shapes"][1, 1]  # upright: taller than wide


def test_layout_and_padding() -> None:
    """Patch order: (row, col, channel) with channel fastest; padding rows zero and masked."""
    levels = np.arange(16 * 8 * 3, dtype=np.uint8).reshape(16, 8, 3)
    out = preprocess_naflex(Image.fromarray(levels), patch_size=8, max_num_patches=5)
    assert out["spatial_shapes"].tolist() == [[2, 1]]
    assert out["pixel_attention_mask"].tolist() == [[1, 1, 0, 0, 0]]
    values = out["pixel_values"][0]
    expected_first = (torch.from_numpy(levels[:8].reshape(-1).astype(np.float64)) / 255 - 0.5) / 0.5
    torch.testing.assert_close(values[0].double(), expected_first, atol=1e-6, rtol=0)
    assert torch.equal(values[2:], torch.zeros(3, 8 * 8 * 3))


@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 6000),
    width=st.integers(1, 6000),
    patch=st.sampled_from([8, 14, 16]),
    limit=st.sampled_from([1, 3, 16, 64, 256, 729, 1024]),
)
def test_target_size_rule(height: int, width: int, patch: int, limit: int) -> None:
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    got = naflex_target_size(height, width, patch_size=patch, max_num_patches=limit)
    assert got == get_image_size_for_max_num_patches(height, width, patch, limit)
    assert got[0] % patch == 0 and got[1] % patch == 0 and (got[0] // patch) * (got[1] // patch) <= limit


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: preprocess_naflex([]), ValueError, "images is an empty list"),
        (lambda: preprocess_naflex(np.zeros((4, 4, 3), np.uint8)), TypeError, "image must be a PIL.Image.Image or a path"),
        (lambda: preprocess_naflex([_image("RGB", 4, 4), 3]), TypeError, r"images\[1\] must be a PIL.Image.Image .* got int"),
        (lambda: preprocess_naflex(_image("RGB", 4, 4), patch_size=0), ValueError, "patch_size must be a positive int, got 0"),
        (lambda: preprocess_naflex(_image("RGB", 4, 4), max_num_patches=2.5), TypeError, "max_num_patches must be a positive int"),
        (lambda: preprocess_naflex("/nonexistent/x.png"), FileNotFoundError, "Image file not found"),
    ],
)
def test_bad_arguments(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="Cannot read image file .*notes.png"):
        preprocess_naflex(bad)


def test_a_one_patch_wide_image_decodes_without_a_torch_warning(tmp_path: Path) -> None:
    import warnings

    from tp_siglip.processing_naflex import decode_naflex_files

    path = tmp_path / "tall.png"
    Image.new("RGB", (1, 500), (0, 255, 0)).save(path)  # a (16, 1) grid: its patches are a read-only view of the pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch: "The given NumPy array is not writable ... undefined behavior"
        levels, shapes, reasons = decode_naflex_files([path], patch_size=8, max_num_patches=16)
    assert reasons == [None] and shapes.tolist() == [[16, 1]] and int(levels[0, :, 1].max()) == 255
