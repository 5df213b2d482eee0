"""Validation of what callers pass to the encoder, done before any compute.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value) with a
message that names the offending value and says what is expected. Checks of values (NaN/inf pixels, the
contents of masks) read tensor data, which on a GPU is a host sync: they run by default only for inputs
on the CPU (``model.check_finite = None``), always with ``True``, never with ``False``, and never inside
``torch.compile`` graphs. SigLIP2 NaFlex reads ``spatial_shapes`` on the host in any case (each image's
position table is resized to its grid, as transformers does): pass it as a CPU tensor.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from tp_siglip.config import SiglipVisionConfig

#: transformers-style forward keywords accepted so the model drops into transformers code (``return_dict=False``:
#: a tuple, `model.as_asked`; the others ignored)
_IGNORED_FORWARD_KWARGS = ("return_dict", "output_attentions", "use_cache")


def check_ready(weights_ready: bool, kwargs: dict[str, Any]) -> None:
    """Refuse to run a tower whose weights are not ready, or ``forward`` keywords it does not know."""
    if not weights_ready:
        raise RuntimeError(
            "this model's weights are not loaded (built on the meta device, or a load failed); call "
            "load_weights(...) or build it with SiglipVisionTransformer.from_pretrained(...)"
        )
    unknown = sorted(k for k in kwargs if k not in _IGNORED_FORWARD_KWARGS)
    if unknown:
        raise TypeError(f"forward() got unexpected keyword argument(s) {unknown}")
    check_flag("return_dict", kwargs.get("return_dict"))
    check_flag("output_attentions", kwargs.get("output_attentions"))
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True is not supported: attention weights are never materialised")


def check_flag(name: str, value: object) -> bool:
    """``value`` (None or a bool) as a bool; ``TypeError`` for anything else (``"False"`` or ``0`` would be read by
    their truth, or by identity with False, and quietly do what was not asked)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or None, got {value!r}")
    return bool(value)


def check_batch_sizes(batch_sizes: object, rows: int, world_size: int, rank: int) -> Optional[tuple[int, ...]]:
    """``batch_sizes`` as a tuple (``None`` stays ``None``): one count per rank, ``rank``'s count = ``rows``."""
    if batch_sizes is None:
        return None
    if torch.compiler.is_compiling():
        raise ValueError("batch_sizes is not supported under torch.compile; pass the whole batch on every rank")
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence):
        raise TypeError(f"batch_sizes must be a sequence of ints (one per rank), got {type(batch_sizes).__name__}")
    sizes = tuple(batch_sizes)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in sizes):
        raise ValueError(f"batch_sizes must hold non-negative ints, got {list(sizes)}")
    if len(sizes) != world_size:
        raise ValueError(f"batch_sizes must give one row count per rank ({world_size}), got {list(sizes)}")
    if not sum(sizes):
        raise ValueError(f"batch_sizes {list(sizes)} holds no image; pass at least one")
    if sizes[rank] != rows:
        raise ValueError(
            f"batch_sizes[{rank}] is {sizes[rank]} but this rank passed {rows} image(s); pass this "
            f"rank's own rows of the batch"
        )
    return sizes


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {list(choices)}")


def check_pixel_values(
    pixel_values: object,
    config: SiglipVisionConfig,
    *,
    interpolate_pos_encoding: bool,
    patch_attention_mask: object,
    check_finite: Optional[bool],
    device: torch.device,
    allow_empty: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check a ``(B, C, H, W)`` float batch (and its optional patch mask) for ``config`` on ``device``.

    Returns ``pixel_values`` and the ``(B, H/p, W/p)`` bool patch mask to use: the given one, an
    all-true one for Idefics3 towers (their positions are always bucketized), else ``None``. Inputs on
    another device are an error, not a silent copy: a server should see (and place) every host-to-device
    transfer itself. ``allow_empty``: a batch of no images is valid (a rank's rows of a split batch).
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
    if batch == 0 and not allow_empty:
        raise ValueError(f"pixel_values has an empty batch (shape {shape}); pass at least one image")
    if channels != config.num_channels:
        raise ValueError(
            f"pixel_values has {channels} channels (shape {shape}) but the model expects {config.num_channels}; "
            f"the layout must be channels-first (B, C, H, W)"
        )
    bucketized = patch_attention_mask is not None or config.variant == "idefics3"
    _check_size(shape, config, any_size=interpolate_pos_encoding or bucketized)
    _check_device("pixel_values", pixel_values, device)
    if bucketized:
        patch_attention_mask = _check_patch_mask(patch_attention_mask, shape, config.patch_size, device, check_finite)
    _check_finite("pixel_values", pixel_values, check_finite)
    return pixel_values, patch_attention_mask  # type: ignore[return-value]


def _check_size(shape: tuple[int, ...], config: SiglipVisionConfig, *, any_size: bool) -> None:
    height, width = shape[-2:]
    size, patch = config.image_size, config.patch_size
    if not any_size:
        if (height, width) != (size, size):
            raise ValueError(
                f"pixel_values are {height}x{width} but the model was trained at {size}x{size}; resize the "
                f"images to {size}x{size}, or pass interpolate_pos_encoding=True for other sizes"
            )
    elif (height, width) != (size, size) and (height % patch or width % patch or height < patch or width < patch):
        raise ValueError(
            f"pixel_values are {height}x{width}; at other sizes than {size}x{size} height and width must be "
            f"positive multiples of the patch size {patch}"
        )


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(
            f"{name} are on {tensor.device} but the model is on {device}; move them first with "
            f"{name}.to(model.device)"
        )


def reads_values(check_finite: Optional[bool], tensor: torch.Tensor) -> bool:
    """Whether value checks of ``tensor`` run: ``check_finite`` when set, else only for a CPU tensor (no host
    sync); never inside ``torch.compile`` (a graph cannot branch on data)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" if check_finite is None else bool(check_finite)


def _check_finite(name: str, tensor: torch.Tensor, check_finite: Optional[bool]) -> None:
    if reads_values(check_finite, tensor) and not _all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} contain {bad} NaN or infinite value(s); check the preprocessing (set "
            f"model.check_finite = False to skip this check)"
        )


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or infinity: its min and max carry any (NaN propagates through both),
    and one ``aminmax`` pass is far cheaper than materialising ``isfinite`` of the whole tensor."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_patch_mask(
    mask: object, shape: tuple[int, ...], patch: int, device: torch.device, check_finite: Optional[bool] = None
) -> torch.Tensor:
    """The ``(B, H/p, W/p)`` bool patch mask (all true when ``mask`` is None), checked."""
    batch, _, height, width = shape
    grid = (batch, height // patch, width // patch)
    if mask is None:
        return torch.ones(grid, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"patch_attention_mask must be a bool torch.Tensor of shape {grid}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"patch_attention_mask must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != grid:
        raise ValueError(
            f"patch_attention_mask has shape {tuple(mask.shape)} but pixel_values {tuple(shape)} with patch size "
            f"{patch} need (B, H/p, W/p) = {grid}"
        )
    _check_device("patch_attention_mask", mask, device)
    if reads_values(check_finite, mask) and not bool(mask.flatten(1).any(1).all()):
        raise ValueError("patch_attention_mask has an image with no valid patch; every image needs at least one")
    return mask


# ----------------------------------------------------------------------------- SigLIP2 NaFlex


def _check_tensor(name: str, value: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(value.shape)}")
    return value


def _check_mask_values(mask: torch.Tensor) -> None:
    """A bool mask, or an integer mask holding only 0 and 1."""
    if mask.dtype == torch.bool:
        return
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"pixel_attention_mask must be bool or an integer tensor of 0/1, got dtype {mask.dtype}")
    if bool(((mask != 0) & (mask != 1)).any()):
        found = sorted(set(mask.unique().tolist()) - {0, 1})[:5]
        raise ValueError(f"pixel_attention_mask must contain only 0 and 1, found value(s) {found}")


def _check_spatial_shapes(spatial_shapes: object, batch: int, length: int) -> torch.Tensor:
    shapes = _check_tensor("spatial_shapes", spatial_shapes, 2, "(B, 2) of (h, w) patch counts")
    if shapes.dtype == torch.bool or shapes.is_floating_point() or shapes.is_complex():
        raise TypeError(f"spatial_shapes must be an integer tensor (e.g. torch.long), got dtype {shapes.dtype}")
    if tuple(shapes.shape) != (batch, 2):
        raise ValueError(f"spatial_shapes must have shape ({batch}, 2) for {batch} image(s), got {tuple(shapes.shape)}")
    for index, (height, width) in enumerate(shapes.tolist()):
        if height <= 0 or width <= 0:
            raise ValueError(f"spatial_shapes[{index}] = ({height}, {width}); both patch counts must be positive")
        if height * width > length:
            raise ValueError(
                f"spatial_shapes[{index}] = ({height}, {width}) needs {height * width} patches but pixel_values "
                f"holds only {length} per image"
            )
    return shapes


def _check_mask_layout(mask: torch.Tensor, shapes: torch.Tensor, length: int) -> None:
    """Row ``i`` of ``mask`` is ``h_i*w_i`` ones followed by zeros (reads the mask: a host sync on a device)."""
    counts = (shapes[:, 0] * shapes[:, 1]).to(device=mask.device, dtype=torch.long)
    valid = mask.to(torch.long).sum(1)
    wrong_count = (valid != counts).nonzero().flatten().tolist()
    if wrong_count:
        i = wrong_count[0]
        raise ValueError(
            f"pixel_attention_mask[{i}] has {int(valid[i])} valid patch(es) but spatial_shapes[{i}] = "
            f"{tuple(shapes[i].tolist())} needs {int(counts[i])}"
        )
    ones_first = torch.arange(length, device=mask.device)[None, :] < counts[:, None]
    out_of_order = (mask.bool() != ones_first).any(1).nonzero().flatten().tolist()
    if out_of_order:
        i = out_of_order[0]
        raise ValueError(
            f"pixel_attention_mask[{i}] must be {int(counts[i])} ones followed by zeros (valid patches first, "
            f"padding last)"
        )


def check_naflex_inputs(
    pixel_values: object,
    pixel_attention_mask: object,
    spatial_shapes: object,
    *,
    num_channels: int,
    patch_size: int,
    check_finite: Optional[bool] = None,
    device: Optional[torch.device] = None,
    allow_empty: bool = False,
) -> None:
    """Validate a NaFlex batch before any compute; raise ``TypeError`` / ``ValueError`` naming the problem.

    Expected: ``pixel_values`` a float ``(B, N, C*p*p)`` tensor (``B >= 1``), finite; ``pixel_attention_mask``
    a ``(B, N)`` bool or 0/1 integer tensor whose row ``i`` is ``h_i*w_i`` ones followed by zeros (valid
    patches first); ``spatial_shapes`` an integer ``(B, 2)`` tensor of positive ``(h, w)`` with ``h*w <= N``,
    on the CPU or ``device`` (it is read on the host either way; the others must be on ``device``).
    ``allow_empty``: ``B = 0`` is valid too (a rank's rows of a split batch).
    """
    pixels = _check_tensor("pixel_values", pixel_values, 3, "(B, N, C*p*p)")
    if not pixels.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got dtype {pixels.dtype}")
    batch, length, features = pixels.shape
    expected = num_channels * patch_size * patch_size
    if features != expected:
        raise ValueError(
            f"pixel_values has {features} values per patch (shape {tuple(pixels.shape)}) but the model expects "
            f"C*p*p = {num_channels}*{patch_size}*{patch_size} = {expected}"
        )
    if (batch == 0 and not allow_empty) or length == 0:
        raise ValueError(f"pixel_values is empty (shape {tuple(pixels.shape)}); pass at least one image and patch")
    mask = _check_tensor("pixel_attention_mask", pixel_attention_mask, 2, "(B, N)")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"pixel_attention_mask must have shape ({batch}, {length}) to match pixel_values, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"pixel_attention_mask must be bool or an integer tensor of 0/1, got dtype {mask.dtype}")
    shapes = _check_spatial_shapes(spatial_shapes, batch, length)
    if reads_values(check_finite, mask):
        _check_mask_values(mask)
        _check_mask_layout(mask, shapes, length)
    if device is not None:
        for name, tensor in (("pixel_values", pixels), ("pixel_attention_mask", mask)):
            _check_device(name, tensor, device)
        if shapes.device.type != "cpu":  # read on the host: the CPU (as the processor makes it, no sync) or the model's
            _check_device("spatial_shapes", shapes, device)
    _check_finite("pixel_values", pixels, check_finite)
