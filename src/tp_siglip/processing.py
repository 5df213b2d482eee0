"""Turn images into SigLIP ``pixel_values``, matching transformers' ``SiglipImageProcessor`` exactly.

This module takes PIL images, image files or uint8 numpy arrays and produces a ``(B, 3, H, W)`` tensor. The
result is what transformers' default SigLIP image processor gives for the same input. With transformers 5.x and
no torchvision installed, that processor is ``SiglipImageProcessorPil``. The pipeline was copied step by step
from transformers' source (``image_processing_backends.PilBackend``, ``image_transforms.convert_to_rgb`` /
``resize`` / ``rescale`` / ``normalize`` and ``image_utils.load_image``), and the test suite checks the output
against transformers bit for bit.

The choices made, and why:

* **Conversion to RGB follows transformers, not plain** ``Image.convert("RGB")``. If a PIL image has an alpha
  band (``"A"`` in its bands: RGBA, LA, PA) or a ``transparency`` entry in ``info`` (palette or grayscale images
  with a transparent colour), it is converted to RGBA and alpha-composited onto opaque white. Any other image
  goes through ``convert("RGB")`` (L, P, CMYK, I;16, F, ...). A 4-channel numpy array is blended onto white
  with transformers' float64 formula, ``round(a/255 * rgb + (1 - a/255) * 255)``. This can differ by one level
  from PIL's integer ``alpha_composite``, and transformers shows the same difference.
* **Paths are handled as transformers handles a path string.** The file is opened, the EXIF orientation is
  applied (``ImageOps.exif_transpose``) and the result goes through ``convert("RGB")``. :func:`load_image`
  returns exactly this image. After that, the image goes through the same RGB conversion as any PIL image.
  As a result, the alpha band of an RGBA/LA *file* is dropped, not composited. A palette or grayscale file
  with a transparent colour is different: Pillow keeps that colour as an RGB colour key, so its pixels still
  become white. ``preprocess(path)`` and ``preprocess(load_image(path))`` always agree. To composite a file's
  alpha band onto white, open it yourself with ``PIL.Image.open`` and pass the PIL image.
* **Resizing** goes through Pillow on the uint8 RGB image: ``Image.resize((W, H), Resampling.BICUBIC)`` with
  Pillow's default antialiasing and no ``reducing_gap``. The target is always exactly ``(H, W)``, with no
  aspect-ratio handling and no crop.
* **Rescale and normalize** reproduce transformers' arithmetic. Rescaling happens in float64
  (``uint8 * (1/255)``) and is rounded to float32, then ``(x - 0.5) / 0.5`` runs in float32. Only 256
  input levels exist, so the whole computation is done once into a 256-entry lookup table and applied per
  pixel. The values are bit-identical to transformers' and no float64 copy of a batch is ever made. The
  float32 result is cast to the ``dtype`` asked for at the end.
* **Numpy arrays** must be uint8, shaped ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``. They are
  always read as channels-last. transformers guesses the layout and would take e.g. a ``(3, W, 3)`` array as
  channels-first. We do not copy that guess.
* **Pillow is optional** (``pip install "tp-siglip[images]"``). It is imported inside the functions that need
  it, so this module imports without it. Only the image functions raise :class:`ImportError`.
* **Memory**: :func:`preprocess` decodes one image at a time straight into a preallocated output tensor, and
  :func:`iter_batches` loads a batch only when it is asked for. Memory use therefore stays flat however many
  files are processed.
* **Other libraries' preprocessing**: a checkpoint loaded from timm or open_clip carries theirs
  (``model.config.preprocessing``); pass it as ``preprocessing=`` and :func:`preprocess`,
  :func:`decode_files` and :func:`to_pixel_values` follow that library instead (:mod:`tp_siglip.transforms`).
* **Real corpora**: :func:`scan_images` lists a folder like :func:`find_images` and also counts what it left
  out (by extension, and hidden files). :func:`preprocess_files` reads a batch of files without stopping at a
  bad one: each unreadable file (empty, truncated, not an image, a pixel format Pillow cannot decode,
  vanished, no permission) gets a short reason instead of raising, and its row is left at zero. The caller
  decides what to do with it (``tp-siglip encode`` skips it on every rank, or stops with ``--strict``).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import numpy as np
import torch

from tp_siglip import transforms
from tp_siglip.config import Preprocessing

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "IMAGE_SUFFIXES",
    "RESCALE_FACTOR",
    "ImageScan",
    "decode_files",
    "find_images",
    "iter_batches",
    "load_image",
    "load_image_data",
    "preprocess",
    "preprocess_files",
    "require_pillow",
    "scan_images",
    "to_pixel_values",
]

logger = logging.getLogger(__name__)

#: Per-channel mean and std used by SigLIP checkpoints (transformers' ``IMAGENET_STANDARD_MEAN/STD``).
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: transformers' default ``rescale_factor``.
RESCALE_FACTOR: float = 1 / 255
#: File suffixes (lower case) that :func:`find_images` picks up inside folders.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

_INSTALL_HINT = 'pip install "tp-siglip[images]"'
_ALLOWED_CHANNELS = (1, 3, 4)

PathLike = Union[str, "os.PathLike[str]"]
ImageLike = Union["PILImage.Image", np.ndarray, str, "os.PathLike[str]"]


def require_pillow() -> None:
    """Raise :class:`ImportError` with the install command when Pillow is missing (a cheap early check)."""
    _require_pil()


def _require_pil() -> tuple[Any, Any]:
    """Import Pillow's ``Image`` and ``ImageOps`` modules, or explain how to install Pillow."""
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise ImportError(
            f"Image loading and preprocessing need Pillow, which is not installed. Install it with: {_INSTALL_HINT}"
        ) from exc
    return Image, ImageOps


def _build_lookup_table() -> np.ndarray:
    """Return the float32 value each uint8 level maps to after rescale + normalize.

    The operations and dtypes are transformers' own: ``image.astype(float64) * rescale_factor`` cast to
    float32 (``image_transforms.rescale``), then ``(x - mean) / std`` with float32 mean/std
    (``image_transforms.normalize``). Mean and std are the same for all three channels, so one table fits all.
    """
    levels = np.arange(256, dtype=np.uint8)
    rescaled = (levels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean = np.float32(IMAGE_MEAN[0])
    std = np.float32(IMAGE_STD[0])
    table = (rescaled - mean) / std
    assert table.dtype == np.float32
    return table


_LOOKUP = _build_lookup_table()


def _describe(value: object, limit: int = 80) -> str:
    """Return a short description of ``value`` for error messages (type plus a truncated repr)."""
    if isinstance(value, np.ndarray):
        return f"numpy array with shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def _check_image_size(image_size: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    """Validate ``image_size`` and return it as ``(height, width)``."""

    def is_int(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    if is_int(image_size):
        height = width = int(image_size)  # type: ignore[arg-type]
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2 and all(is_int(v) for v in image_size):
        height, width = (int(v) for v in image_size)
    else:
        raise TypeError(
            f"image_size must be a positive int or a (height, width) pair of positive ints, got {image_size!r}"
        )
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return height, width


def _check_dtype(dtype: torch.dtype) -> None:
    """Reject anything that is not a floating-point torch dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")


def load_image(path: PathLike) -> PILImage.Image:
    """Open an image file and return it fully decoded, upright and in RGB mode.

    This is what transformers' ``image_utils.load_image`` does for a local file: it applies the EXIF
    orientation and then ``convert("RGB")``. The pixels are decoded right away and the file is closed, so a
    truncated or corrupt file fails here and not later.

    Args:
        path: Path to an image file.

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        ImportError: Pillow is not installed.
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder or a pipe, is not an image, or could not be decoded (truncated, corrupt, too
            large for Pillow's decompression-bomb limit). The message names the path.
    """
    Image, ImageOps = _require_pil()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_image expects a file path (str or os.PathLike), got {_describe(path)}")
    file = Path(path)
    try:
        mode = file.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"Image file not found: '{file}'") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"'{file}' is a folder, not an image file (use find_images() to list the images in it)")
    if not stat.S_ISREG(mode):  # opening a pipe would wait for a writer forever
        raise ValueError(f"'{file}' is not a regular file (a pipe, socket or device); give an image file")
    try:
        with Image.open(file) as opened:
            rgb = _decoded_upright_rgb(opened, ImageOps)
    except (MemoryError, PermissionError):
        raise
    except Exception as exc:  # Pillow raises many types for bad data: OSError, SyntaxError, struct.error, ...
        raise ValueError(f"Cannot read image file '{file}': {type(exc).__name__}: {exc}") from exc
    return rgb


def load_image_data(data: bytes) -> PILImage.Image:
    """:func:`load_image` for an image held in memory (a member of a webdataset tar, a parquet cell).

    The same steps as for a file: decode every pixel now, apply the EXIF orientation, ``convert("RGB")``.

    Raises:
        ValueError: empty, not an image, or undecodable (truncated, corrupt).
    """
    import io

    Image, ImageOps = _require_pil()
    if not data:
        raise ValueError("empty image (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            return _decoded_upright_rgb(opened, ImageOps)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises many types for bad data
        raise ValueError(f"Cannot read image data: {type(exc).__name__}: {exc}") from exc


def _decoded_upright_rgb(opened: PILImage.Image, ImageOps: Any) -> PILImage.Image:
    """transformers' ``load_image`` steps on an open image: every pixel decoded now (so truncation shows up
    here), the EXIF orientation applied, ``convert("RGB")``. One full-size copy, not three: the orientation is
    applied in place (Pillow's ``exif_transpose`` otherwise copies even an upright image), and the convert's
    copy is what detaches the result from the file. The pixels are the same either way."""
    opened.load()
    ImageOps.exif_transpose(opened, in_place=True)
    return opened.convert("RGB")


def _pil_to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Convert a PIL image to RGB the way transformers' ``convert_to_rgb`` does.

    Images with an alpha band or a ``transparency`` entry are composited onto opaque white. All others go
    through ``convert("RGB")``; an RGB image that needs nothing is returned as it is (``convert`` would only
    copy it).
    """
    Image, _ = _require_pil()
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _array_to_rgb(array: np.ndarray, where: str) -> np.ndarray:
    """Check a uint8 ``(H, W[, C])`` array and return it as ``(H, W, 3)`` uint8, as transformers would.

    One channel is repeated three times. Four channels are blended onto white with transformers' float64
    formula and rounded.
    """
    if array.dtype != np.uint8:
        raise TypeError(
            f"{where}: numpy images must have dtype uint8 (values 0-255), got dtype {array.dtype} "
            f"(shape {array.shape}); convert with (x * 255).round().astype(np.uint8) if x is float in [0, 1]"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim != 3:
        raise ValueError(
            f"{where}: numpy images must have shape (H, W) or (H, W, C), got ndim {array.ndim} "
            f"(shape {array.shape}); pass a batch as a list of arrays"
        )
    height, width, channels = array.shape
    if channels not in _ALLOWED_CHANNELS:
        raise ValueError(
            f"{where}: numpy images must be channels-last with C in {_ALLOWED_CHANNELS}, got shape {array.shape} "
            f"({channels} channels)"
        )
    if height == 0 or width == 0:
        raise ValueError(f"{where}: image is empty, got shape {array.shape}")
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:4] / 255
        blended = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(blended).astype(np.uint8)
    return array


def _to_rgb_pil(item: object, where: str, to_rgb: Callable[[PILImage.Image], PILImage.Image] = _pil_to_rgb) -> PILImage.Image:
    """Turn one supported input (path, PIL image or uint8 array) into an RGB PIL image (``to_rgb``: how a PIL
    image becomes RGB: transformers' way by default)."""
    Image, _ = _require_pil()
    if isinstance(item, (str, os.PathLike)):
        # transformers runs its RGB conversion on the loaded image too. That matters: Pillow's
        # convert("RGB") turns a palette/grayscale ``transparency`` entry into an RGB colour key in ``info``,
        # and pixels of that colour are then composited onto white.
        return to_rgb(load_image(item))
    if isinstance(item, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(_array_to_rgb(item, where)))  # (H, W, 3) uint8 -> RGB
    if isinstance(item, Image.Image):
        if item.width == 0 or item.height == 0:
            raise ValueError(f"{where}: image is empty, got size {item.size}")
        try:
            return to_rgb(item)
        except (OSError, SyntaxError, ValueError) as exc:  # a lazily opened truncated file, an unconvertible mode
            source = getattr(item, "filename", "") or "PIL image"
            raise ValueError(
                f"{where}: cannot convert {source!r} (mode {item.mode}, size {item.size}) to RGB: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    raise TypeError(
        f"{where}: unsupported image type {_describe(item)}; expected a PIL.Image.Image, a path "
        "(str or os.PathLike) or a uint8 numpy array of shape (H, W) or (H, W, C) with C in (1, 3, 4)"
    )


def preprocess(
    images: ImageLike | Sequence[ImageLike],
    image_size: int | tuple[int, int] = 224,
    *,
    dtype: torch.dtype = torch.float32,
    preprocessing: Optional[Preprocessing] = None,
) -> torch.Tensor:
    """Turn images into SigLIP ``pixel_values``, matching transformers' ``SiglipImageProcessor`` exactly.

    Each image is converted to RGB (see the module docstring for how transparency is handled), resized to
    ``image_size`` with Pillow's bicubic filter, rescaled by 1/255 and normalized with mean 0.5 and std 0.5.
    Nothing is cropped.

    Args:
        images: One image or a list/tuple of images. An image is a ``PIL.Image.Image``, a path (``str`` or
            ``os.PathLike``) or a uint8 numpy array of shape ``(H, W)`` or ``(H, W, C)`` with ``C`` in
            ``(1, 3, 4)``.
        image_size: Output side length, or a ``(height, width)`` pair.
        dtype: Floating-point dtype of the result. Values are computed in float32 and cast at the end.
        preprocessing: timm's or open_clip's steps instead (``model.config.preprocessing`` of a checkpoint
            loaded from them; :mod:`tp_siglip.transforms`). ``None``: transformers' steps described above.

    Returns:
        ``pixel_values`` of shape ``(B, 3, height, width)``.

    Raises:
        ImportError: Pillow is not installed.
        TypeError: An image, ``image_size`` or ``dtype`` has the wrong type (including non-uint8 arrays).
        ValueError: An empty list, a badly shaped array, a non-positive ``image_size``, or a file that is
            not a readable image.
        FileNotFoundError: A path does not exist.
    """
    Image, _ = _require_pil()
    height, width = _check_image_size(image_size)
    _check_dtype(dtype)

    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is an empty list; pass at least one image")
        items = list(images)
        names = [f"images[{i}]" for i in range(len(items))]
    else:
        items = [images]
        names = ["image"]

    if preprocessing is not None:  # timm / open_clip: their RGB conversion, resize, crop and arithmetic
        rgbs = [_to_rgb_pil(item, where, transforms.convert_rgb) for item, where in zip(items, names, strict=True)]
        levels = np.stack([np.asarray(transforms.resize_and_crop(rgb, (height, width), preprocessing)) for rgb in rgbs])
        return to_pixel_values(torch.from_numpy(levels).permute(0, 3, 1, 2), dtype, preprocessing=preprocessing)
    pixel_values = torch.empty((len(items), 3, height, width), dtype=dtype)
    for index, (item, where) in enumerate(zip(items, names, strict=True)):
        rgb = _to_rgb_pil(item, where)
        resized = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
        levels = np.asarray(resized, dtype=np.uint8)  # (height, width, 3)
        values = _LOOKUP[levels]  # float32, bit-identical to transformers' rescale + normalize
        pixel_values[index].copy_(torch.from_numpy(values).permute(2, 0, 1))
    logger.debug("preprocessed %d image(s) to %s %s", len(items), tuple(pixel_values.shape), dtype)
    return pixel_values


class ImageScan(NamedTuple):
    """What :func:`scan_images` found: the image files, and what it left out inside folders.

    Attributes:
        files: The image files, in the order :func:`find_images` returns them.
        ignored: Files inside folders skipped for their extension, counted per lower-case suffix
            (``"(none)"`` for names without one).
        hidden: Files inside folders skipped because they or a folder above them are hidden (``"."`` names).
    """

    files: list[Path]
    ignored: Counter[str]
    hidden: int


def scan_images(inputs: PathLike | Iterable[PathLike]) -> ImageScan:
    """List image files like :func:`find_images`, and count the files left out inside folders.

    Raises:
        FileNotFoundError / ValueError / TypeError: as :func:`find_images`.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    ignored: Counter[str] = Counter()
    hidden = 0
    seen: set[Path] = set()
    for raw in inputs:
        if not isinstance(raw, (str, os.PathLike)):
            raise TypeError(f"find_images expects paths (str or os.PathLike), got {_describe(raw)}")
        path = Path(raw)
        if path.is_dir():
            files, hidden_here = _scan_folder(path, ignored)
            hidden += hidden_here
            if not files:
                logger.warning("No image files (%s) found in folder '%s'", ", ".join(sorted(IMAGE_SUFFIXES)), path)
        elif path.is_file():
            files = [path]
        elif not path.exists():
            raise FileNotFoundError(f"Input path does not exist: '{path}'")
        else:
            raise ValueError(f"Input path '{path}' is neither a regular file nor a folder")
        for file in files:
            if file not in seen:
                seen.add(file)
                found.append(file)
    logger.debug("scan_images: %d file(s), %d ignored, %d hidden", len(found), sum(ignored.values()), hidden)
    return ImageScan(found, ignored, hidden)


def _scan_folder(folder: Path, ignored: Counter[str]) -> tuple[list[Path], int]:
    """The folder's image files in sorted relative-path order, and its hidden files' count; counts the other
    files into ``ignored``."""
    files, hidden, links = [], 0, []
    for candidate in folder.rglob("*"):
        relative = candidate.relative_to(folder)
        if not candidate.is_file() and not (candidate.is_symlink() and not candidate.exists()):
            if candidate.is_symlink() and candidate.is_dir() and not any(part.startswith(".") for part in relative.parts):
                links.append(str(candidate))  # a link to a folder: rglob does not follow it
            continue  # a folder; a broken link stays, so that reading it says what is wrong
        if any(part.startswith(".") for part in relative.parts):
            hidden += 1
        elif candidate.suffix.lower() in IMAGE_SUFFIXES:
            files.append(candidate)
        else:
            ignored[candidate.suffix.lower() or "(none)"] += 1
    if links:
        shown = ", ".join(f"'{link}'" for link in links[:3]) + (", ..." if len(links) > 3 else "")
        logger.warning("%d link(s) to folders in '%s' are not followed: %s; give them as inputs to include their images",
                       len(links), folder, shown)
    return sorted(files, key=lambda candidate: candidate.relative_to(folder).parts), hidden


def find_images(inputs: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand files and folders into a list of image files.

    Files given directly are kept whatever their suffix, in the order given. Folders are searched
    recursively for files whose suffix (case-insensitive) is in :data:`IMAGE_SUFFIXES`, in sorted order of
    their path relative to that folder. Hidden files and folders (names starting with ``"."``, e.g. macOS
    ``._photo.jpg`` resource forks) are skipped inside folders; a broken link is listed, so that reading it
    says so. If a file shows up twice, only its first occurrence is kept. :func:`scan_images` does the same
    and also counts what was left out.

    Args:
        inputs: One path, or a list of paths to files and/or folders.

    Returns:
        The image files, as :class:`pathlib.Path` objects.

    Raises:
        FileNotFoundError: An input path does not exist (the message names it).
        ValueError: An input path exists but is neither a regular file nor a folder.
        TypeError: An input is not a ``str`` / ``os.PathLike``.
    """
    return scan_images(inputs).files


def iter_batches(
    paths: Iterable[PathLike],
    batch_size: int = 32,
    image_size: int | tuple[int, int] = 224,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Yield ``(batch_paths, pixel_values)`` for image files, ``batch_size`` at a time.

    Batches are loaded only when they are asked for, so memory stays flat for any number of files. Every
    batch is full except possibly the last one. ``pixel_values`` equals ``preprocess(batch_paths, image_size,
    dtype=dtype)``. The arguments are checked when this function is called, not at the first ``next()``.

    Args:
        paths: Image files (run :func:`find_images` first to expand folders). Any iterable, even a lazy one.
        batch_size: Maximum number of images per batch (a positive int).
        image_size: Output side length, or a ``(height, width)`` pair.
        dtype: Floating-point dtype of ``pixel_values``.

    Yields:
        The batch's paths (as :class:`pathlib.Path`) and their ``(len(batch_paths), 3, H, W)`` pixel values.

    Raises:
        TypeError / ValueError: Bad ``batch_size``, ``image_size`` or ``dtype`` (raised right away), or an
            unreadable file (raised when its batch is loaded, naming the file).
    """
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, (bool, np.bool_)):
        raise TypeError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    _check_image_size(image_size)
    _check_dtype(dtype)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return _generate_batches(paths, int(batch_size), image_size, dtype)


def _generate_batches(
    paths: Iterable[PathLike],
    batch_size: int,
    image_size: int | tuple[int, int],
    dtype: torch.dtype,
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """The generator behind :func:`iter_batches` (arguments already checked)."""
    batch: list[Path] = []
    for raw in paths:
        if not isinstance(raw, (str, os.PathLike)):
            raise TypeError(f"iter_batches expects file paths (str or os.PathLike), got {_describe(raw)}")
        batch.append(Path(raw))
        if len(batch) == batch_size:
            yield batch, preprocess(batch, image_size, dtype=dtype)
            batch = []
    if batch:
        yield batch, preprocess(batch, image_size, dtype=dtype)


def preprocess_files(
    paths: Sequence[PathLike],
    image_size: int | tuple[int, int] = 224,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[str | None]]:
    """Preprocess image files like :func:`preprocess`, recording a reason for each unreadable file.

    Args:
        paths: Image files.
        image_size: Output side length, or a ``(height, width)`` pair.
        dtype: Floating-point dtype of the result.

    Returns:
        ``(pixel_values, reasons)``: ``pixel_values`` has one row per path (``(len(paths), 3, H, W)``); the row
        of an unreadable file is all zeros. ``reasons[i]`` is ``None`` when file ``i`` was read, else a short
        description of what is wrong with it (without the path).

    Raises:
        ImportError: Pillow is not installed. TypeError / ValueError: bad ``image_size`` or ``dtype``.
        MemoryError: decoding ran out of memory (not a property of the file, so not recorded).
    """
    _check_dtype(dtype)
    levels, reasons = decode_files(paths, image_size)
    pixel_values = to_pixel_values(levels, dtype)
    for index, reason in enumerate(reasons):
        if reason is not None:
            pixel_values[index].zero_()
    return pixel_values, reasons


def decode_files(
    sources: Sequence[Any],
    image_size: int | tuple[int, int] = 224,
    *,
    opener: Optional[Callable[[Any], PILImage.Image]] = None,
    out: Optional[torch.Tensor] = None,
    preprocessing: Optional[Preprocessing] = None,
) -> tuple[torch.Tensor, list[str | None]]:
    """Decode and resize images to uint8 levels ``(n, 3, H, W)``: :func:`preprocess_files` before normalizing.

    This is the half of preprocessing that runs in the encode job's decode workers; :func:`to_pixel_values`
    is the other half, on the model's device. ``sources`` are paths, or anything ``opener`` turns into a
    decoded, upright RGB image (default: :func:`load_image`). An unreadable source gets a reason and a
    zero row, as in :func:`preprocess_files`. ``out`` (uint8, contiguous, ``(n, 3, H, W)``) is written
    into and returned instead of a new tensor (the job's workers write into shared memory this way).
    ``preprocessing``: timm's or open_clip's RGB conversion, resize and crop instead of transformers'.
    """
    Image, _ = _require_pil()
    height, width = _check_image_size(image_size)
    shape = (len(sources), 3, height, width)
    if out is not None and (out.shape != shape or out.dtype != torch.uint8 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous uint8 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    levels = torch.zeros(shape, dtype=torch.uint8) if out is None else out
    rows = levels.numpy()  # numpy copies on this thread: no intra-op thread pool woken (and spinning) per image
    reasons: list[str | None] = []
    to_rgb = _pil_to_rgb if preprocessing is None else transforms.convert_rgb
    for index, rgb, reason in read_files(sources, to_rgb, opener):
        reasons.append(reason)
        if rgb is not None and preprocessing is not None:
            rows[index] = np.asarray(transforms.resize_and_crop(rgb, (height, width), preprocessing)).transpose(2, 0, 1)
        elif rgb is not None:
            resized = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
            rows[index] = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)
        elif out is not None:
            rows[index] = 0
    return levels, reasons


_DEVICE_TABLES: dict[torch.device, torch.Tensor] = {}
#: ``level / 127.5 - 1`` in float32 (two correctly rounded IEEE operations) gives ``_LOOKUP``'s value for every one
#: of the 256 levels; `_arithmetic_is_exact` checks that on this machine before the CPU relies on it.
_HALF_RANGE = 127.5
_ARITHMETIC_EXACT: Optional[bool] = None


def _normalise_in_place(values: torch.Tensor) -> torch.Tensor:
    """float32 levels (0-255) -> ``_LOOKUP``'s values, in place."""
    return values.div_(_HALF_RANGE).sub_(1.0)


def _arithmetic_is_exact() -> bool:
    """Whether `_normalise_in_place` reproduces ``_LOOKUP`` bit for bit here (checked once: every level, in a
    length that runs both torch's vectorised loop and its scalar tail); the table is the fallback."""
    global _ARITHMETIC_EXACT
    if _ARITHMETIC_EXACT is None:
        levels = torch.arange(256 + 7, dtype=torch.int64).remainder_(256)
        got = _normalise_in_place(levels.to(torch.float32)).numpy().view(np.int32)
        _ARITHMETIC_EXACT = bool(np.array_equal(got, _LOOKUP[levels.numpy()].view(np.int32)))
        if not _ARITHMETIC_EXACT:  # pragma: no cover - IEEE arithmetic gives the table's values
            logger.warning("float32 arithmetic here does not reproduce the normalisation table; using the table")
    return _ARITHMETIC_EXACT


def to_pixel_values(
    levels: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    *,
    out: Optional[torch.Tensor] = None,
    preprocessing: Optional[Preprocessing] = None,
) -> torch.Tensor:
    """uint8 levels -> normalized ``pixel_values`` in ``dtype``, on the levels' own device.

    The values are those of the 256-entry table of :func:`preprocess` (transformers' rescale + normalize,
    float32), cast to ``dtype``: bit-identical to :func:`preprocess`'s for the same levels, on any device. On
    the CPU they are computed as ``level / 127.5 - 1`` in float32, which equals the table at every level
    (checked on first use; the table otherwise), faster than a lookup; elsewhere ``torch.take``.

    Args:
        levels: uint8 tensor of any shape.
        dtype: Floating-point dtype of the result.
        out: Optional tensor of ``levels``' shape, in ``dtype`` on ``levels``' device, to write into and
            return (a caller that normalises batch after batch keeps one: no fresh pages each batch).
        preprocessing: timm's / open_clip's normalisation instead (``ToTensor`` + ``Normalize``, per channel).
    """
    if not isinstance(levels, torch.Tensor) or levels.dtype != torch.uint8:
        raise TypeError(f"levels must be a uint8 torch.Tensor, got {getattr(levels, 'dtype', type(levels).__name__)}")
    _check_dtype(dtype)
    if out is not None and (out.shape != levels.shape or out.dtype != dtype or out.device != levels.device):
        raise ValueError(
            f"out must be a {dtype} tensor of shape {tuple(levels.shape)} on {levels.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if preprocessing is not None:
        values = transforms.normalise(levels, preprocessing)
    elif levels.device.type == "cpu" and _arithmetic_is_exact():
        values = out if out is not None and dtype == torch.float32 else torch.empty(levels.shape, dtype=torch.float32)
        _normalise_in_place(values.copy_(levels))
    elif levels.device.type == "cpu":  # the table, should arithmetic ever be inexact here
        values = torch.from_numpy(_LOOKUP[levels.contiguous().numpy()])
    else:
        table = _DEVICE_TABLES.get(levels.device)
        if table is None:
            table = _DEVICE_TABLES[levels.device] = torch.from_numpy(_LOOKUP).to(levels.device)
        values = torch.take(table, levels.long())
    if out is None:
        return values if dtype == torch.float32 else values.to(dtype)
    return out if values is out else out.copy_(values)


def open_file(path: PathLike) -> PILImage.Image:
    """`load_image`, after one ``stat`` that gives an empty file, a folder and a broken link a plain reason."""
    file = Path(path)
    try:
        info: Optional[os.stat_result] = file.stat()
    except FileNotFoundError:
        info = None  # load_image says so, unless it is a link to a file that is gone
        if file.is_symlink():
            raise ValueError(f"a broken link to '{os.readlink(file)}'") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise ValueError("a folder, not an image file")
    if info is not None and stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise ValueError("empty file (0 bytes)")
    return load_image(file)


def read_files(
    sources: Sequence[Any],
    to_rgb: Callable[[PILImage.Image], PILImage.Image],
    opener: Optional[Callable[[Any], PILImage.Image]] = None,
) -> Iterator[tuple[int, Optional[PILImage.Image], Optional[str]]]:
    """``(index, RGB image or None, reason or None)`` per source: each opened with ``opener`` (default
    `load_image`, for paths), converted with ``to_rgb``; an unreadable one (empty, truncated, not an image,
    gone) gets a one-line `failure_reason`.

    MemoryError is not caught: running out of memory says nothing about the file.
    """
    for index, raw in enumerate(sources):
        try:
            yield index, to_rgb(open_file(raw) if opener is None else opener(raw)), None
        except (OSError, ValueError, SyntaxError) as exc:
            yield index, None, failure_reason(exc, raw if isinstance(raw, (str, os.PathLike)) else "")


def failure_reason(exc: BaseException, path: PathLike) -> str:
    """A one-line reason for an unreadable file, without its path (the caller prints the path)."""
    from PIL import UnidentifiedImageError

    cause = exc.__cause__ if isinstance(exc, ValueError) and exc.__cause__ is not None else exc
    if isinstance(cause, FileNotFoundError):
        return "file not found (removed after it was listed?)"
    if isinstance(cause, PermissionError):
        return "permission denied"
    if isinstance(cause, UnidentifiedImageError):
        return "not an image Pillow can decode (another file type, or an unsupported pixel format)"
    text = str(cause)
    for form in filter(None, (repr(str(path)), repr(path), str(path)) if str(path) else ()):
        text = text.replace(form, "")
    text = " ".join(text.replace(" :", ":").split()) or "no details"
    if cause is exc and isinstance(exc, ValueError):  # our own message (e.g. an empty file)
        return text
    return f"{type(cause).__name__}: {text}"
