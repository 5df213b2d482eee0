"""Validation of what callers pass to the encoder, done before any compute.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value) with a
message that names the offending value and says what is expected. The finiteness check is the only one
that reads tensor data (one device sync); servers that cannot afford it switch it off with
``model.check_finite = False``, and it is skipped inside ``torch.compile`` graphs.
"""

from __future__ import annotations

import torch

from tp_siglip.config import SiglipVisionConfig


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {list(choices)}")


def check_pixel_values(
    pixel_values: object,
    config: SiglipVisionConfig,
    *,
    interpolate_pos_encoding: bool,
    check_finite: bool,
    device: torch.device,
) -> torch.Tensor:
    """Return ``pixel_values`` if it is a valid ``(B, C, H, W)`` float batch for ``config`` on ``device``.

    Inputs on another device are an error, not a silent copy: a server should see (and place) every
    host-to-device transfer itself.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor of shape (B, C, H, W), got {type(pixel_values).__name__}")
    if not isinstance(interpolate_pos_encoding, bool):
        raise TypeError(f"interpolate_pos_encoding must be a bool, got {interpolate_pos_encoding!r}")
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be 4-D (B, C, H, W), got shape {shape}")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}; convert images with "
            f"tp_siglip.preprocess (rescale by 1/255 and normalise) rather than passing raw integers"
        )
    batch, channels, height, width = shape
    if batch == 0:
        raise ValueError(f"pixel_values has an empty batch (shape {shape}); pass at least one image")
    if channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels (shape {shape}) but the model expects {config.num_channels}; "
            f"the layout must be channels-first (B, C, H, W)"
        )
    size, patch = config.image_size, config.patch_size
    if not interpolate_pos_encoding:
        if (height, width) != (size, size):
            raise ValueError(
                f"pixel_values are {height}x{width} but the model was trained at {size}x{size}; resize the "
                f"images to {size}x{size}, or pass interpolate_pos_encoding=True for other sizes"
            )
    elif (height, width) != (size, size) and (height % patch or width % patch or height < patch or width < patch):
        raise ValueError(
            f"pixel_values are {height}x{width}; with interpolate_pos_encoding=True height and width must be "
            f"positive multiples of the patch size {patch} (or exactly {size}x{size})"
        )
    if pixel_values.device != device:
        raise ValueError(
            f"pixel_values are on {pixel_values.device} but the model is on {device}; move them first with "
            f"pixel_values.to(model.device)"
        )
    # a compiled graph cannot branch on tensor data: under torch.compile the finiteness check is skipped
    if check_finite and not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
        bad = int((~torch.isfinite(pixel_values)).sum())
        raise ValueError(
            f"pixel_values contain {bad} NaN or infinite value(s); check the preprocessing (set "
            f"model.check_finite = False to skip this check)"
        )
    return pixel_values
