"""Tests for ``tp_siglip.processing``: bit-exact agreement with transformers' SigLIP image processor, error handling,
folder expansion and batching.

The reference is transformers' PIL backend, ``SiglipImageProcessorPil`` (``tests/references.py``: what
``SiglipImageProcessor`` is without torchvision). Every comparison asserts bit-exact equality.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import tp_siglip.processing as processing
from tp_siglip.processing import (
    find_images,
    iter_batches,
    load_image,
    preprocess,
    preprocess_files,
    read_files,
    scan_images,
)

from corpus import BAD, GOOD, HIDDEN, IGNORED, LISTED, make_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "tp_siglip" / "images"  # shipped in the wheel
BUNDLED = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in processing.IMAGE_SUFFIXES)
IMAGE_SIZES = (224, 384)
INSTALL_HINT = 'pip install "tp-siglip[images]"'


# --------------------------------------------------------------------------------------------------------------
# reference: transformers' processor
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> Iterator[Callable[..., torch.Tensor]]:
    """Return ``run(image, size, **kwargs) -> pixel_values`` computed by transformers' SiglipImageProcessor."""
    import transformers

    from references import siglip_image_processor

    tf_logger = logging.getLogger("transformers")
    previous_level = tf_logger.level
    transformers.logging.set_verbosity_error()  # hide the "falling back to the PIL backend" notice
    processors: dict[tuple[int, int], object] = {}

    def run(image: object, size: int | tuple[int, int], **kwargs: object) -> torch.Tensor:
        height, width = (size, size) if isinstance(size, int) else size
        if (height, width) not in processors:
            processors[height, width] = siglip_image_processor(size={"height": height, "width": width})
        return processors[height, width](image, return_tensors="pt", **kwargs)["pixel_values"]

    yield run
    tf_logger.setLevel(previous_level)


def assert_bit_exact(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Assert identical shape, dtype and bits; on failure show the largest difference."""
    assert ours.shape == theirs.shape
    assert ours.dtype == theirs.dtype == torch.float32
    max_diff = (ours.double() - theirs.double()).abs().max().item()
    assert max_diff <= 1e-6, f"max abs diff {max_diff}"
    assert torch.equal(ours, theirs), f"not bit-exact (max abs diff {max_diff})"


# --------------------------------------------------------------------------------------------------------------
# synthetic images
# --------------------------------------------------------------------------------------------------------------


def _bytes(rng: np.random.Generator, width: int, height: int, per_pixel: int) -> bytes:
    return rng.integers(0, 256, width * height * per_pixel, dtype=np.uint8).tobytes()


def _palette(rng: np.random.Generator, mode: str, width: int, height: int) -> Image.Image:
    image = Image.frombytes(mode, (width, height), _bytes(rng, width, height, len(mode)))
    image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


def _rgba_varied_alpha(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[: height // 3, :, 3] = 0  # fully transparent band
    pixels[height // 3 : 2 * height // 3, :, 3] = 255  # fully opaque band; the rest keeps random alpha
    return Image.fromarray(pixels)


def _p_transparent_index(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    image = _palette(rng, "P", width, height)
    image.putpixel((0, 0), 7)
    image.info["transparency"] = 7
    return image


def _p_transparent_bytes(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    image = _palette(rng, "P", width, height)
    image.info["transparency"] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
    return image


def _l_transparent(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    image = Image.frombytes("L", (width, height), _bytes(rng, width, height, 1))
    image.putpixel((0, 0), 128)
    image.info["transparency"] = 128
    return image


def _rgb_transparent(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: max(1, height // 2), : max(1, width // 2)] = (10, 200, 30)
    image = Image.fromarray(pixels)
    image.info["transparency"] = (10, 200, 30)
    return image


SYNTHETIC: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "RGB": lambda rng, w, h: Image.frombytes("RGB", (w, h), _bytes(rng, w, h, 3)),
    "L": lambda rng, w, h: Image.frombytes("L", (w, h), _bytes(rng, w, h, 1)),
    "LA": lambda rng, w, h: Image.frombytes("LA", (w, h), _bytes(rng, w, h, 2)),
    "RGBA-random-alpha": lambda rng, w, h: Image.frombytes("RGBA", (w, h), _bytes(rng, w, h, 4)),
    "RGBA-varied-alpha": _rgba_varied_alpha,
    "RGBa": lambda rng, w, h: Image.frombytes("RGBa", (w, h), _bytes(rng, w, h, 4)),
    "RGBX": lambda rng, w, h: Image.frombytes("RGBX", (w, h), _bytes(rng, w, h, 4)),
    "P": lambda rng, w, h: _palette(rng, "P", w, h),
    "P-transparency-index": _p_transparent_index,
    "P-transparency-bytes": _p_transparent_bytes,
    "PA": lambda rng, w, h: _palette(rng, "PA", w, h),
    "L-transparency": _l_transparent,
    "RGB-transparency": _rgb_transparent,
    "CMYK": lambda rng, w, h: Image.frombytes("CMYK", (w, h), _bytes(rng, w, h, 4)),
    "YCbCr": lambda rng, w, h: Image.frombytes("YCbCr", (w, h), _bytes(rng, w, h, 3)),
    "HSV": lambda rng, w, h: Image.frombytes("HSV", (w, h), _bytes(rng, w, h, 3)),
    "LAB": lambda rng, w, h: Image.frombytes("LAB", (w, h), _bytes(rng, w, h, 3)),
    "I;16": lambda rng, w, h: Image.frombytes("I;16", (w, h), rng.integers(0, 65536, w * h, dtype=np.uint16).tobytes()),
    "I": lambda rng, w, h: Image.fromarray(rng.integers(-1000, 70000, (h, w), dtype=np.int32)),
    "F": lambda rng, w, h: Image.fromarray(rng.uniform(-50.0, 300.0, (h, w)).astype(np.float32)),
    "1": lambda rng, w, h: Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool)),
}
SIZES = ((37, 211), (211, 37), (1, 1), (300, 200))  # (width, height)


# --------------------------------------------------------------------------------------------------------------
# equality with transformers
# --------------------------------------------------------------------------------------------------------------


def test_bundled_images_exist() -> None:
    assert 4 <= len(BUNDLED) <= 6
    for path in BUNDLED:
        assert path.stat().st_size < 300_000, path
    assert (EXAMPLES / "SOURCES.md").is_file()


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_images_match(reference, path: Path, image_size: int) -> None:
    # as a path string (transformers loads it with its own load_image)
    assert_bit_exact(preprocess(str(path), image_size), reference(str(path), image_size))
    # as a pathlib.Path (transformers only takes str) and via our load_image
    assert_bit_exact(preprocess(path, image_size), reference(str(path), image_size))
    assert_bit_exact(preprocess(load_image(path), image_size), reference(str(path), image_size))
    # as an opened PIL image
    with Image.open(path) as opened:
        assert_bit_exact(preprocess(opened, image_size), reference(opened, image_size))


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", list(SYNTHETIC))
def test_synthetic_pil_images_match(reference, mode: str, size: tuple[int, int], image_size: int) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{mode}-{size}".encode()))
    image = SYNTHETIC[mode](rng, *size)
    assert image.size == size
    assert_bit_exact(preprocess(image, image_size), reference(image, image_size))


ARRAY_SHAPES = [
    (211, 37, 3),
    (37, 211, 1),
    (37, 211),
    (50, 60, 4),
    (1, 1, 3),
    (1, 1),
    (3, 40, 3),  # transformers would guess channels-first here
    (4, 9, 4),
    (300, 200, 3),
]


@pytest.mark.parametrize("image_size", IMAGE_SIZES)
@pytest.mark.parametrize("shape", ARRAY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_numpy_arrays_match(reference, shape: tuple[int, ...], image_size: int) -> None:
    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    if array.ndim == 3 and array.shape[-1] == 4:
        edge_alphas = np.array([0, 1, 127, 128, 254, 255], dtype=np.uint8)
        array[: shape[0] // 2, :, 3] = rng.choice(edge_alphas, (shape[0] // 2, shape[1]))
    # transformers has no 2-D array support and guesses the channel axis, so hand it explicit (H, W, C)
    theirs_input = array[..., None] if array.ndim == 2 else array
    expected = reference(theirs_input, image_size, input_data_format="channels_last")
    assert_bit_exact(preprocess(array, image_size), expected)


def test_non_contiguous_array_matches(reference) -> None:
    array = np.random.default_rng(3).integers(0, 256, (120, 90, 3), dtype=np.uint8)[::2, ::3]
    assert not array.flags.c_contiguous
    assert_bit_exact(preprocess(array), reference(np.ascontiguousarray(array), 224))


def test_grayscale_array_equals_grayscale_pil() -> None:
    array = np.random.default_rng(4).integers(0, 256, (33, 47), dtype=np.uint8)
    assert torch.equal(preprocess(array), preprocess(Image.fromarray(array)))
    assert torch.equal(preprocess(array), preprocess(array[..., None]))


def test_rectangular_image_size_matches(reference) -> None:
    path = BUNDLED[0]
    assert_bit_exact(preprocess(path, (224, 320)), reference(str(path), (224, 320)))
    assert preprocess(path, [96, 64]).shape == (1, 3, 96, 64)


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def test_saved_files_match(reference, tmp_path: Path) -> None:
    """Files in several formats, with transparency and with an EXIF rotation, as paths and as opened images."""
    rng = np.random.default_rng(5)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    files = [
        _save(_rgba_varied_alpha(rng, 61, 45), tmp_path / "rgba.png"),
        _save(_p_transparent_index(rng, 45, 61), tmp_path / "palette.png", transparency=7),
        _save(_palette(rng, "P", 40, 30), tmp_path / "palette.gif"),
        _save(SYNTHETIC["LA"](rng, 50, 20), tmp_path / "la.png"),
        _save(SYNTHETIC["RGB"](rng, 64, 48), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=90),
        _save(SYNTHETIC["CMYK"](rng, 31, 17), tmp_path / "cmyk.tiff"),
        _save(SYNTHETIC["RGB"](rng, 31, 17), tmp_path / "rgb.bmp"),
        _save(SYNTHETIC["RGBA-random-alpha"](rng, 31, 17), tmp_path / "rgba.webp", lossless=True),
        _save(SYNTHETIC["I;16"](rng, 31, 17), tmp_path / "gray16.png"),
    ]
    for file in files:
        for image_size in IMAGE_SIZES:
            assert_bit_exact(preprocess(file, image_size), reference(str(file), image_size))
            assert torch.equal(preprocess(load_image(file), image_size), preprocess(file, image_size))
            with Image.open(file) as opened:
                assert_bit_exact(preprocess(opened, image_size), reference(opened, image_size))
    # the EXIF rotation is applied when loading from a path, as transformers' load_image does
    assert load_image(tmp_path / "rotated.jpg").size == (48, 64)


def test_batch_of_mixed_inputs_equals_single_calls() -> None:
    rng = np.random.default_rng(6)
    inputs = [
        str(BUNDLED[0]),
        BUNDLED[1],
        SYNTHETIC["P-transparency-index"](rng, 37, 211),
        rng.integers(0, 256, (20, 30, 4), dtype=np.uint8),
    ]
    batch = preprocess(inputs, 224)
    assert batch.shape == (4, 3, 224, 224)
    for row, item in zip(batch, inputs, strict=True):
        assert torch.equal(row, preprocess(item, 224)[0])
    assert torch.equal(preprocess(tuple(inputs), 224), batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_is_a_final_cast(dtype: torch.dtype) -> None:
    reference_values = preprocess(BUNDLED[0])
    values = preprocess(BUNDLED[0], dtype=dtype)
    assert values.dtype == dtype
    assert torch.equal(values, reference_values.to(dtype))


def test_value_range_and_layout() -> None:
    white = preprocess(np.full((5, 7, 3), 255, dtype=np.uint8), 8)
    black = preprocess(np.zeros((5, 7), dtype=np.uint8), 8)
    assert white.shape == (1, 3, 8, 8)
    assert torch.all(white == 1.0) and torch.all(black == -1.0)
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    values = preprocess(red, 4)
    assert torch.all(values[0, 0] == 1.0) and torch.all(values[0, 1:] == -1.0)


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def strict_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def test_non_image_file(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("this is not an image\n")
    with pytest.raises(ValueError, match=re.escape(str(bogus))):
        load_image(bogus)
    with pytest.raises(ValueError, match=re.escape(str(bogus))):
        preprocess([BUNDLED[0], bogus])


@pytest.mark.parametrize("source", ["astronaut.jpg", "chelsea.png"])
def test_truncated_file(tmp_path: Path, strict_pillow: None, source: str) -> None:
    data = (EXAMPLES / source).read_bytes()
    truncated = tmp_path / f"truncated_{source}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        load_image(truncated)
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        preprocess(str(truncated))


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_image(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        preprocess([str(missing)])


def test_folder_passed_as_image(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_image(tmp_path)


def test_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """A named pipe (say, listed in a .txt list) is refused, not opened: opening it would block until a writer came."""
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        load_image(fifo)
    ((_, image, reason),) = read_files([fifo], lambda image: image)
    assert image is None and "not a regular file" in reason


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, np.bool_])
def test_bad_array_dtype(dtype: type) -> None:
    array = np.zeros((8, 8, 3), dtype=dtype)
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        preprocess(array)


@pytest.mark.parametrize("shape", [(8,), (2, 8, 8, 3), (1, 2, 8, 8, 3)])
def test_bad_array_ndim(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"ndim {len(shape)}.*{re.escape(str(shape))}"):
        preprocess(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("channels", [2, 5, 8])
def test_bad_channel_count(channels: int) -> None:
    shape = (8, 9, channels)
    with pytest.raises(ValueError, match=re.escape(f"{channels} channels")):
        preprocess(np.zeros(shape, dtype=np.uint8))


def test_empty_array() -> None:
    with pytest.raises(ValueError, match=re.escape("(0, 5, 3)")):
        preprocess(np.zeros((0, 5, 3), dtype=np.uint8))


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_list(empty: list | tuple) -> None:
    with pytest.raises(ValueError, match="empty"):
        preprocess(empty)


@pytest.mark.parametrize(
    ("value", "name"),
    [(42, "int"), (b"\x89PNG", "bytes"), (torch.zeros(3, 8, 8), "Tensor"), (None, "NoneType"), ({"a": 1}, "dict")],
)
def test_unsupported_type(value: object, name: str) -> None:
    with pytest.raises(TypeError, match=name):
        preprocess(value)
    with pytest.raises(TypeError, match=rf"images\[1\].*{name}"):
        preprocess([BUNDLED[0], value])


def test_error_names_position_in_list() -> None:
    good = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match=r"images\[2\].*float32"):
        preprocess([good, good, good.astype(np.float32)])


def test_unconvertible_pil_mode() -> None:
    image = Image.new("La", (4, 4))  # Pillow itself cannot convert La to RGB
    with pytest.raises(ValueError, match="La"):
        preprocess(image)


@pytest.mark.parametrize("bad", [0, -5, (224, 0), (-1, 10)])
def test_non_positive_image_size(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        preprocess(BUNDLED[0], bad)


@pytest.mark.parametrize("bad", ["224", 22.4, True, (224,), (224, 224, 3), (224.0, 224)])
def test_bad_image_size_type(bad: object) -> None:
    with pytest.raises(TypeError, match=re.escape(repr(bad))):
        preprocess(BUNDLED[0], bad)


@pytest.mark.parametrize("bad", [torch.int64, torch.uint8, "float32", np.float32])
def test_bad_dtype(bad: object) -> None:
    with pytest.raises(TypeError, match=re.escape(repr(bad))):
        preprocess(BUNDLED[0], dtype=bad)


def test_module_imports_and_explains_without_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PIL", "PIL.Image", "PIL.ImageOps"):
        monkeypatch.setitem(sys.modules, name, None)  # makes "from PIL import ..." raise ImportError
    spec = importlib.util.spec_from_file_location("_processing_without_pillow", processing.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing works without Pillow
    assert module.find_images([EXAMPLES]) == BUNDLED  # so does listing files
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        module.preprocess(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        module.load_image(BUNDLED[0])
    with pytest.raises(ImportError, match=re.escape(INSTALL_HINT)):
        next(module.iter_batches(BUNDLED, 2))


# --------------------------------------------------------------------------------------------------------------
# find_images and iter_batches
# --------------------------------------------------------------------------------------------------------------


def test_find_images(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    for relative in [
        "b.jpg",
        "a.PNG",
        "sub/c.jpeg",
        "sub/deeper/d.webp",
        "z.tiff",
        "y.Gif",
        "x.bmp",
        "w.tif",
        "notes.txt",
        "no_suffix",
        ".hidden/e.jpg",
        "._f.jpg",
    ]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"")
    extra = tmp_path / "single.dat"
    extra.write_bytes(b"")
    found = find_images([root, str(extra), root / "b.jpg"])
    expected = ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp", "w.tif", "x.bmp", "y.Gif", "z.tiff"]
    assert found == [root / r for r in expected] + [extra]
    assert find_images(root) == [root / r for r in expected]
    assert find_images([EXAMPLES]) == BUNDLED


def test_links_to_folders_are_not_followed_but_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/e.jpg").write_bytes(b"")
    (tmp_path / "photos/.cache").mkdir(parents=True)
    (tmp_path / "photos/a.jpg").write_bytes(b"")
    (tmp_path / "photos/2023").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "photos/.cache/old").symlink_to(tmp_path / "elsewhere")  # hidden: passed over as before
    with caplog.at_level(logging.WARNING, logger="tp_siglip.processing"):
        assert find_images(tmp_path / "photos") == [tmp_path / "photos/a.jpg"]
    assert f"1 link(s) to folders in '{tmp_path / 'photos'}' are not followed: '{tmp_path / 'photos/2023'}'" in caplog.text


def test_find_images_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        find_images([EXAMPLES, missing])


def test_find_images_empty_folder_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tp_siglip.processing"):
        assert find_images([tmp_path]) == []
    assert str(tmp_path) in caplog.text


@pytest.mark.parametrize("batch_size", [1, 2, 5, 7])
def test_iter_batches_sizes_and_values(batch_size: int) -> None:
    paths = find_images([EXAMPLES])
    assert len(paths) == len(BUNDLED)
    batches = list(iter_batches(paths, batch_size, 96, torch.float32))
    sizes = [len(batch_paths) for batch_paths, _ in batches]
    full, rest = divmod(len(paths), batch_size)
    expected_sizes = [batch_size] * full + ([rest] if rest else [])
    assert sizes == expected_sizes
    assert [p for batch_paths, _ in batches for p in batch_paths] == paths
    for batch_paths, values in batches:
        assert values.shape == (len(batch_paths), 3, 96, 96)
    assert torch.equal(torch.cat([values for _, values in batches]), preprocess(paths, 96))


def test_iter_batches_dtype_and_laziness() -> None:
    consumed: list[Path] = []

    def source() -> Iterator[Path]:
        for path in BUNDLED:
            consumed.append(path)
            yield path

    batches = iter_batches(source(), batch_size=2, image_size=64, dtype=torch.bfloat16)
    assert consumed == []
    first_paths, first_values = next(batches)
    assert first_paths == BUNDLED[:2] and len(consumed) == 2
    assert first_values.dtype == torch.bfloat16
    assert torch.equal(first_values, preprocess(BUNDLED[:2], 64).to(torch.bfloat16))


def test_iter_batches_checks_arguments_immediately() -> None:
    with pytest.raises(ValueError, match="0"):
        iter_batches(BUNDLED, 0)
    with pytest.raises(TypeError, match=re.escape("2.5")):
        iter_batches(BUNDLED, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="-3"):
        iter_batches(BUNDLED, 2, -3)
    with pytest.raises(TypeError, match="int64"):
        iter_batches(BUNDLED, 2, 224, torch.int64)


def test_iter_batches_bad_file_names_it(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"not a png")
    batches = iter_batches([BUNDLED[0], bogus], batch_size=1)
    next(batches)
    with pytest.raises(ValueError, match=re.escape(str(bogus))):
        next(batches)


# --------------------------------------------------------------------------------------------------------------
# real corpora: scan_images and preprocess_files
# --------------------------------------------------------------------------------------------------------------


def test_scan_images_counts_what_it_leaves_out(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    scan = scan_images([corpus])
    assert scan.files == [corpus / name for name in LISTED] == find_images(corpus)
    assert dict(scan.ignored) == IGNORED
    assert scan.hidden == HIDDEN
    direct = scan_images([corpus / "notes.txt"])  # a file named directly is kept whatever its suffix
    assert direct.files == [corpus / "notes.txt"] and not direct.ignored


def test_preprocess_files_records_a_reason_per_bad_file(tmp_path: Path, strict_pillow: None) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    vanished = corpus / "vanished.png"
    paths = [corpus / name for name in LISTED] + [vanished]
    values, reasons = preprocess_files(paths, 48, dtype=torch.bfloat16)
    assert values.shape == (len(paths), 3, 48, 48) and values.dtype == torch.bfloat16
    for path, row, reason in zip(paths, values, reasons, strict=True):
        name = path.relative_to(corpus).as_posix()
        if name in GOOD:
            assert reason is None
            assert torch.equal(row, preprocess(path, 48, dtype=torch.bfloat16)[0])
        else:
            assert reason is not None and str(path) not in reason
            assert BAD.get(name, "file not found") in reason.lower(), (name, reason)
            assert torch.count_nonzero(row) == 0
    assert preprocess_files([corpus / "sub"], 48)[1] == ["a folder, not an image file"]  # e.g. a folder in a .txt list


def test_exif_and_alpha_path_versus_pil_image(reference, tmp_path: Path) -> None:
    """What docs/encode.md states, checked for us and for transformers: a path gets the EXIF rotation and loses
    its alpha band; an opened PIL image keeps its stored orientation and is composited onto white."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    Image.fromarray(rgba).save(tmp_path / "clear_red.png")
    red_rgb = torch.tensor([1.0, -1.0, -1.0])
    white = torch.ones(3)
    for run in (lambda image: preprocess(image, 8), lambda image: reference(image, 8)):
        assert torch.equal(run(str(tmp_path / "clear_red.png"))[0, :, 0, 0], red_rgb)  # alpha dropped
        with Image.open(tmp_path / "clear_red.png") as opened:
            assert torch.equal(run(opened)[0, :, 0, 0], white)  # alpha composited onto white

    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, :8, 0] = 255  # left half red, stored 16 wide and 8 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(wide).save(tmp_path / "rotated.png", exif=exif.tobytes())
    for run in (lambda image: preprocess(image, (8, 16)), lambda image: reference(image, (8, 16))):
        upright = run(str(tmp_path / "rotated.png"))[0, 0]  # rotated to 16 high: each column half red
        with Image.open(tmp_path / "rotated.png") as opened:
            stored = run(opened)[0, 0]  # not rotated: left half red
        assert torch.all(stored[:, :8] == 1.0) and torch.all(stored[:, 8:] == -1.0)
        assert torch.all(upright[:4] == upright[:4, :1]) and not torch.equal(upright, stored)
