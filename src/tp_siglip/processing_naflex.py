"""Turn images into SigLIP2 NaFlex inputs, matching transformers' ``Siglip2ImageProcessor(max_num_patches=...)``.

For each image the output is a variable grid of ``h x w`` patches with ``h * w <= max_num_patches``, chosen
to keep the aspect ratio. This module returns ``pixel_values (B, max_num_patches, 3*p*p)`` float32,
``pixel_attention_mask (B, max_num_patches)`` int32 and ``spatial_shapes (B, 2)`` int64, which is what
transformers gives for the same images. With transformers 5.x and no torchvision installed,
``Siglip2ImageProcessor`` resolves to ``Siglip2ImageProcessorPil``, and the tests compare against it bit for
bit.

The steps, with the choices made:

* **RGB conversion** follows ``tp_siglip.processing``: a PIL image with an alpha band or a ``transparency``
  entry is composited onto opaque white, and any other image goes through ``convert("RGB")``. A path is
  opened, turned upright from its EXIF orientation and converted with ``convert("RGB")``, so a file's alpha
  band is dropped (as transformers' ``load_image`` does), and then goes through the same conversion.
  transformers' SigLIP2 processor has ``do_convert_rgb=None``: it passes RGB through and rejects other
  modes (its channel count stops matching the 3-value mean). For those modes our output equals
  ``Siglip2ImageProcessor(do_convert_rgb=True)``. :func:`preprocess_naflex` has its own small opener,
  which raises on a bad file and names it; it opens a file exactly as ``tp_siglip.processing.load_image``.
* **Target grid.** transformers binary-searches a scale ``s`` in ``[1e-6, 100]``, stopping when the interval
  is narrower than 1e-5. Each side becomes ``max(p, ceil(side * s / p) * p)``, and the search keeps the
  largest ``s`` whose patch count fits. The same search, with the same float arithmetic, is repeated here
  (:func:`naflex_target_size`), because a closed form can round differently at ties. One result of the
  upper bound of 100: a tiny image is enlarged at most about 100x, so it can use fewer patches than allowed.
* **Resize** is Pillow ``BILINEAR`` on the uint8 RGB image (Pillow's antialiasing, no ``reducing_gap``),
  transformers' default ``resample`` for SigLIP2.
* **Rescale and normalize** use transformers' arithmetic: ``uint8 * (1/255)`` in float64, rounded to float32,
  then ``(x - 0.5) / 0.5`` in float32. It is done once, as a 256-entry lookup table.
* **Patch order** is row-major over patches. Inside a patch the order is ``(row, col, channel)`` with the
  channel varying fastest, so a ``(h*w, p*p*3)`` array matches transformers' ``convert_image_to_patches``.
  Padding rows are zeros, and their mask entries are 0.
* **Files of a corpus** (:func:`preprocess_naflex_files`, what ``tp-siglip encode`` uses): a batch of paths
  is read without stopping at a bad file, with :func:`tp_siglip.processing.load_image` and the reasons of
  ``tp_siglip.processing`` (shared on purpose, so that fixed-resolution and NaFlex runs skip the same files
  with the same words). An unreadable file's row stays a valid placeholder (a 1x1 grid of one zero patch),
  so the batch could still be fed as is; the caller decides to drop it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image as PILImage

__all__ = ["decode_naflex_files", "naflex_inputs", "naflex_target_size", "preprocess_naflex", "preprocess_naflex_files"]

logger = logging.getLogger(__name__)

ImageLike = Union["PILImage.Image", str, "os.PathLike[str]"]

_SEARCH_EPS = 1e-5  # transformers' binary-search width
_SEARCH_LOW = _SEARCH_EPS / 10
_SEARCH_HIGH = 100.0


def _levels_to_values() -> np.ndarray:
    """float32 value of each uint8 level after rescale (float64 * 1/255 -> float32) and normalize (0.5, 0.5)."""
    rescaled = (np.arange(256, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (rescaled - np.float32(0.5)) / np.float32(0.5)


_LEVELS = _levels_to_values()


def _require_pil() -> tuple[Any, Any]:
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise ImportError('NaFlex preprocessing needs Pillow; install it with: pip install "tp-siglip[images]"') from exc
    return Image, ImageOps


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def naflex_target_size(height: int, width: int, *, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The ``(height, width)`` in pixels, multiples of ``patch_size``, that an image is resized to.

    This is the largest scale (found by transformers' binary search) whose patch grid fits ``max_num_patches``.
    Every side is at least one patch.
    """
    for name, value in (("height", height), ("width", width)):
        _positive_int(name, value)
    patch = _positive_int("patch_size", patch_size)
    limit = _positive_int("max_num_patches", max_num_patches)

    def side(size: int, scale: float) -> int:
        return max(patch, math.ceil(size * scale / patch) * patch)

    low, high = _SEARCH_LOW, _SEARCH_HIGH
    while high - low >= _SEARCH_EPS:
        middle = (low + high) / 2
        if (side(height, middle) // patch) * (side(width, middle) // patch) <= limit:
            low = middle
        else:
            high = middle
    return side(height, low), side(width, low)


def _open_rgb(path: str | os.PathLike[str]) -> PILImage.Image:
    """Open a file like transformers' ``load_image``: decode, apply EXIF orientation, ``convert("RGB")``."""
    Image, ImageOps = _require_pil()
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Image file not found (or not a regular file): '{file}'")
    try:
        with Image.open(file) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened).convert("RGB")
    except (MemoryError, PermissionError):
        raise
    except Exception as exc:  # Pillow raises many types for bad data
        raise ValueError(f"Cannot read image file '{file}': {type(exc).__name__}: {exc}") from exc


def _to_rgb(item: object, where: str) -> PILImage.Image:
    """An RGB PIL image: transparency composited onto white, other modes through ``convert("RGB")``."""
    Image, _ = _require_pil()
    if isinstance(item, (str, os.PathLike)):
        item = _open_rgb(item)
    if not isinstance(item, Image.Image):
        raise TypeError(f"{where} must be a PIL.Image.Image or a path (str or os.PathLike), got {type(item).__name__}")
    if item.width == 0 or item.height == 0:
        raise ValueError(f"{where} is empty (size {item.size})")
    try:
        if "A" not in item.getbands() and item.info.get("transparency") is None:
            return item.convert("RGB")
        rgba = item.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{where}: cannot convert mode {item.mode} to RGB: {type(exc).__name__}: {exc}") from exc


def _patchify(values: np.ndarray, patch: int) -> np.ndarray:
    """``(H, W, C)`` -> ``(H/p * W/p, p*p*C)``: patches row-major; inside one, rows, then columns, then channels."""
    height, width, channels = values.shape
    grid = values.reshape(height // patch, patch, width // patch, patch, channels)
    return grid.transpose(0, 2, 1, 3, 4).reshape((height // patch) * (width // patch), patch * patch * channels)


def preprocess_naflex(
    images: ImageLike | Sequence[ImageLike],
    *,
    patch_size: int = 16,
    max_num_patches: int = 256,
) -> dict[str, torch.Tensor]:
    """Preprocess images for a SigLIP2 NaFlex tower, as ``Siglip2ImageProcessor(max_num_patches=...)`` does.

    Args:
        images: One image or a list/tuple of them: ``PIL.Image.Image`` objects or file paths.
        patch_size: Patch side in pixels (the tower's ``patch_size``).
        max_num_patches: Patches per image after padding (``N``). Each image gets the largest grid that fits.

    Returns:
        ``{"pixel_values": (B, N, 3*p*p) float32, "pixel_attention_mask": (B, N) int32 (1 = real patch,
        real patches first), "spatial_shapes": (B, 2) int64 (patch rows, patch columns)}``.

    Raises:
        ImportError: Pillow is missing. TypeError / ValueError: bad arguments, an empty list, an unsupported
            or empty image, an unreadable file. FileNotFoundError: a path that does not exist.
    """
    _require_pil()
    patch = _positive_int("patch_size", patch_size)
    limit = _positive_int("max_num_patches", max_num_patches)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list; pass at least one image")
        items, names = list(images), [f"images[{i}]" for i in range(len(images))]
    else:
        items, names = [images], ["image"]

    batch = _empty_batch(len(items), patch, limit, torch.float32)
    for index, (item, where) in enumerate(zip(items, names)):
        _fill_row(batch, index, _to_rgb(item, where), patch, limit)
    logger.debug("preprocessed %d image(s) into NaFlex grids %s", len(items), batch["spatial_shapes"].tolist())
    return batch


def _empty_batch(count: int, patch: int, limit: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``count`` rows of zeros, each a valid 1x1 grid (one zero patch, then padding) until filled."""
    mask = torch.zeros(count, limit, dtype=torch.int32)
    mask[:, 0] = 1
    return {
        "pixel_values": torch.zeros(count, limit, 3 * patch * patch, dtype=dtype),
        "pixel_attention_mask": mask,
        "spatial_shapes": torch.ones(count, 2, dtype=torch.int64),
    }


def _fill_row(batch: dict[str, torch.Tensor], index: int, rgb: PILImage.Image, patch: int, limit: int) -> None:
    """Resize an RGB image to its NaFlex grid and write its patches, mask and grid into row ``index``."""
    levels, (rows, columns) = _patch_levels(rgb, patch, limit)
    count = levels.shape[0]
    batch["pixel_values"][index, :count] = torch.from_numpy(_LEVELS[levels])  # cast to the batch's dtype here
    batch["pixel_attention_mask"][index, :count] = 1
    batch["spatial_shapes"][index, 0], batch["spatial_shapes"][index, 1] = rows, columns


def _patch_levels(rgb: PILImage.Image, patch: int, limit: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An RGB image resized to its NaFlex grid: uint8 patches ``(h*w, p*p*3)`` and the grid ``(h, w)``."""
    Image, _ = _require_pil()
    height, width = naflex_target_size(rgb.height, rgb.width, patch_size=patch, max_num_patches=limit)
    resized = rgb.resize((width, height), resample=Image.Resampling.BILINEAR)
    return _patchify(np.asarray(resized, dtype=np.uint8), patch), (height // patch, width // patch)


def decode_naflex_files(
    sources: Sequence[Any],
    *,
    patch_size: int = 16,
    max_num_patches: int = 256,
    opener: Any = None,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """Decode, resize and patchify images, stopping before normalization (the encode job's decode workers).

    Returns ``(levels, spatial_shapes, reasons)``: uint8 patches ``(n, max_num_patches, 3*p*p)`` (padding
    rows zero), the grids ``(n, 2)`` int64 and a reason per unreadable source (its row: a 1x1 grid of one
    zero patch). :func:`naflex_inputs` turns them into model inputs on any device. ``sources``,
    ``opener`` and ``out`` (written into instead of a new tensor) as in
    :func:`tp_siglip.processing.decode_files`.
    """
    from tp_siglip import processing

    _require_pil()
    patch = _positive_int("patch_size", patch_size)
    limit = _positive_int("max_num_patches", max_num_patches)
    shape = (len(sources), limit, 3 * patch * patch)
    if out is not None and (out.shape != shape or out.dtype != torch.uint8):
        raise ValueError(f"out must be a uint8 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    levels = torch.zeros(shape, dtype=torch.uint8) if out is None else out.zero_()
    shapes = torch.ones(len(sources), 2, dtype=torch.int64)
    reasons: list[str | None] = []
    for index, rgb, reason in processing.read_files(sources, lambda image: _to_rgb(image, "image"), opener):
        reasons.append(reason)
        if rgb is not None:
            patches, grid = _patch_levels(rgb, patch, limit)
            levels[index, : patches.shape[0]] = torch.from_numpy(np.require(patches, requirements="W"))  # a view of PIL's read-only pixels is copied
            shapes[index] = torch.tensor(grid)
    return levels, shapes, reasons


def naflex_inputs(levels: torch.Tensor, spatial_shapes: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Model inputs from :func:`decode_naflex_files`' uint8 patches and grids, on their device.

    Values go through the same 256-entry table as :func:`preprocess_naflex` (`processing.to_pixel_values`),
    padding rows are zeros and the mask marks each image's first ``h*w`` patches: the result equals
    :func:`preprocess_naflex`'s for the same images.
    """
    from tp_siglip import processing

    counts = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    mask = torch.arange(levels.shape[1], device=levels.device)[None, :] < counts.to(levels.device)[:, None]
    values = processing.to_pixel_values(levels, dtype).masked_fill_(~mask[..., None], 0)
    return {"pixel_values": values, "pixel_attention_mask": mask.to(torch.int32), "spatial_shapes": spatial_shapes}


def preprocess_naflex_files(
    paths: Sequence[str | os.PathLike[str]],
    *,
    patch_size: int = 16,
    max_num_patches: int = 256,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], list[str | None]]:
    """Preprocess image files like :func:`preprocess_naflex`, recording a reason for each unreadable file.

    The NaFlex counterpart of :func:`tp_siglip.processing.preprocess_files`: files are read with
    :func:`tp_siglip.processing.load_image`, and a file that cannot be read gets the same short reason.

    Args:
        paths: Image files.
        patch_size: Patch side in pixels (the tower's ``patch_size``).
        max_num_patches: Patches per image after padding (``N``).
        dtype: Floating-point dtype of ``pixel_values`` (the mask stays int32, the grids int64).

    Returns:
        ``(inputs, reasons)``: ``inputs`` as :func:`preprocess_naflex` returns it, one row per path.
        ``reasons[i]`` is ``None`` when file ``i`` was read, else why not (without the path). The row of an
        unreadable file is a placeholder that is still a valid input: a 1x1 grid whose one patch is zeros.

    Raises:
        ImportError: Pillow is missing. TypeError / ValueError: bad ``patch_size``, ``max_num_patches``
            or ``dtype``. MemoryError: decoding ran out of memory (not a property of the file).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    levels, shapes, reasons = decode_naflex_files(paths, patch_size=patch_size, max_num_patches=max_num_patches)
    inputs = naflex_inputs(levels, shapes, dtype)
    for index, reason in enumerate(reasons):
        if reason is not None:
            inputs["pixel_values"][index].zero_()
    return inputs, reasons
