"""timm's and open_clip's eval image transforms, reproduced with Pillow and torch (no torchvision needed).

A checkpoint loaded from timm or open_clip carries its library's preprocessing (`config.Preprocessing`, read
from timm's ``pretrained_cfg`` or open_clip's ``preprocess_cfg``); `processing.preprocess` and the encode job
apply it through this module instead of transformers' ``SiglipImageProcessor`` steps. The steps are those of
the libraries' torchvision pipelines on a PIL image, one for one:

* ``convert("RGB")`` (no compositing of transparency onto white, unlike transformers);
* resize with Pillow's filter (torchvision resizes a PIL image with ``Image.resize``): ``"squash"`` to the
  square ``floor(size / crop_pct)``; ``"shortest"`` the shorter side to it, the longer one to
  ``int(side * long / short)`` (``transforms.Resize(int)``); ``"longest"`` both sides to
  ``round(side / max(h / s, w / s))`` (``ResizeKeepRatio(longest=1)``);
* a centre crop, padded first with ``fill`` where the image is smaller (``CenterCrop`` / ``CenterCropOrPad``:
  the offsets ``int(round((H - h) / 2))``);
* ``ToTensor`` (``level / 255`` in float32) and ``Normalize`` (``(x - mean) / std`` per channel, float32):
  the same torch operations, so the same bits.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from tp_siglip.config import Preprocessing

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image as PILImage


def convert_rgb(image: PILImage.Image) -> PILImage.Image:
    """What open_clip (``_convert_to_rgb``) and timm's loaders do: plain ``convert("RGB")``."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _filter(name: str) -> Any:
    from PIL import Image

    return getattr(Image.Resampling, name.upper())


def _resized_size(width: int, height: int, scale: int, mode: str) -> tuple[int, int]:
    """``(width, height)`` of the resized image before the crop, for a square target side ``scale``."""
    if mode == "squash":
        return scale, scale
    if mode == "shortest":  # torchvision's Resize(int): the short side to scale, the long one truncated
        short, long = min(width, height), max(width, height)
        new_short, new_long = scale, int(scale * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    ratio = max(height / scale, width / scale)  # ResizeKeepRatio(longest=1)
    return round(width / ratio), round(height / ratio)


def resize_and_crop(image: PILImage.Image, size: tuple[int, int], preprocessing: Preprocessing) -> PILImage.Image:
    """An RGB image resized and centre-cropped (or padded) to ``size`` = ``(height, width)`` as the library does."""
    from PIL import Image

    height, width = size
    if height != width:
        raise ValueError(f"timm / open_clip preprocessing here is for square images, got {size}")
    scale = math.floor(height / preprocessing.crop_pct)
    target = _resized_size(image.width, image.height, scale, preprocessing.resize)
    if target != image.size:
        image = image.resize(target, _filter(preprocessing.interpolation))
    if image.width < width or image.height < height:  # pad (centred, the extra pixel right/bottom) before cropping
        pad_w, pad_h = max(width - image.width, 0), max(height - image.height, 0)
        canvas = Image.new("RGB", (image.width + pad_w, image.height + pad_h), preprocessing.fill)
        canvas.paste(image, (pad_w // 2, pad_h // 2))
        image = canvas
    if image.size == (width, height):
        return image
    top, left = round((image.height - height) / 2.0), round((image.width - width) / 2.0)  # torchvision: int(round(.))
    return image.crop((left, top, left + width, top + height))


def normalise(levels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` levels -> float32 ``ToTensor`` + ``Normalize`` values, on the levels' device."""
    values = levels.to(torch.float32).div(255)
    shape = (3, 1, 1)
    mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=levels.device).view(shape)
    std = torch.tensor(preprocessing.std, dtype=torch.float32, device=levels.device).view(shape)
    return values.sub_(mean).div_(std)
