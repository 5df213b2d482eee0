"""Self-contained parts for variable-resolution towers: SigLIP2 NaFlex and Idefics3 / SmolVLM.

What is here:

* :class:`NaFlexEmbeddings` - the embeddings of transformers' ``Siglip2VisionModel``. Pixels arrive already
  cut into patches, ``(B, N, C*p*p)``, and go through a ``nn.Linear``. The learned position table is a square
  ``G x G`` grid (``G*G = num_patches``). For each image it is resized to that image's patch grid
  ``spatial_shapes[i] = (h, w)`` and then padded to ``N`` rows.
* :func:`check_naflex_inputs` - validation of ``pixel_values`` / ``pixel_attention_mask`` / ``spatial_shapes``,
  done before any compute, with messages that name the value and what is expected.
* :func:`idefics3_position_ids` - the position ids that transformers' ``Idefics3VisionEmbeddings`` gives a
  batch of (possibly partly padded) patch grids.
* :func:`balance_by_cost` / :func:`split_by_count` - two ways to share a batch of images out between ranks.

The choices made, and why:

* **Resizing the position grid** means what ``F.interpolate(mode="bilinear", align_corners=False,
  antialias=True)`` means. It is computed here as two small weight matrices, one for rows and one for
  columns (see :func:`antialiased_bilinear_weights`), always in float32 whatever the table's dtype, and
  the result is cast back to the table's dtype. transformers 5.24 also writes these weights out by hand and
  also works in float32 on every device (4.5x called ``F.interpolate`` in float32 on CPU only). The two
  differ by float rounding only, about 1e-7. ``F.interpolate`` is avoided because torch 2.13's CPU kernel
  gets output width 1 wrong. The separable form costs ``O(h*G*G*D)`` rather than ``O(h*w*G*G*D)``.
  Resizing is linear and works channel by channel, so a column shard of the table can be resized on its
  own.
* **Padding rows** (positions ``h*w .. N-1``) get the resized grid's first row, position ``(0, 0)``, which
  is what transformers adds there. Zeros would also be masked out later, but the padded hidden states
  would then not match.
* **One resize per distinct shape.** Images are grouped by ``(h, w)``. Each group's grid is resized once
  and written into all of its images. This needs ``spatial_shapes`` on the host (one ``.tolist()``), which
  the output sizes need anyway.
* **Idefics3 position ids** repeat transformers' float32 arithmetic step by step. The fractional coordinate
  is ``i * (1 / n_valid)``, clamped to ``1 - 1e-6``, and bucketized (``right=True``) onto
  ``arange(1/G, 1, 1/G)``. The plain integer rule ``floor(i * G / n_valid)`` is what the computation means,
  but float rounding makes the two disagree for some grids. For ``G`` in {19, 25, 29, 31, ...} even a full
  image does not get ``arange``. For the shipped grids (``G`` = 26, 27, 32) they agree. Padded patches get
  id 0.
* **Load balancing** uses greedy longest-processing-time. Items are sorted by cost (largest first, ties by
  index) and each one goes to the currently least-loaded part (ties go to the lowest part number). This is
  deterministic, and its worst case is at most 4/3 of the optimum (Graham's bound).

Imports only torch and the standard library.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "NaFlexEmbeddings",
    "antialiased_bilinear_weights",
    "balance_by_cost",
    "check_naflex_inputs",
    "idefics3_position_ids",
    "max_share",
    "split_by_count",
]

logger = logging.getLogger(__name__)

DeviceLike = torch.device | str | int | None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def antialiased_bilinear_weights(out_size: int, in_size: int, *, device: DeviceLike = None) -> torch.Tensor:
    """The ``(out_size, in_size)`` float32 matrix of 1-D antialiased bilinear resizing (``align_corners=False``).

    Output ``o`` samples the input at ``c = (o + 0.5) * s - 0.5`` with ``s = in_size / out_size``, using the
    triangle filter ``max(0, 1 - |i - c| / max(s, 1))`` normalised to sum 1. This is the definition behind
    ``F.interpolate(mode="bilinear", antialias=True)`` and behind transformers 5.24's hand-written weights.
    ``F.interpolate`` itself is not used: in torch 2.13 on CPU it returns the first row for every output
    row when the output width is 1 (contiguous NCHW input), whereas transformers computes the correct values.
    """
    scale = torch.tensor(in_size, dtype=torch.float32, device=device) / out_size
    centers = (torch.arange(out_size, dtype=torch.float32, device=device) + 0.5) * scale - 0.5
    sources = torch.arange(in_size, dtype=torch.float32, device=device)
    weights = (1 - (sources[None, :] - centers[:, None]).abs() / scale.clamp(min=1)).clamp(min=0)
    return weights / weights.sum(-1, keepdim=True)


class NaFlexEmbeddings(nn.Module):
    """Patch embedding plus per-image resized position grid, as in transformers' ``Siglip2VisionEmbeddings``.

    Parameters (names match transformers' state dict under ``embeddings.``):
    ``patch_embedding`` is ``nn.Linear(C*p*p, D)`` and ``position_embedding`` is ``nn.Embedding(num_patches, D)``,
    read as a ``G x G`` grid in row-major order.
    """

    def __init__(
        self,
        *,
        num_channels: int,
        patch_size: int,
        hidden_size: int,
        num_patches: int,
        device: DeviceLike = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_channels = _positive_int("num_channels", num_channels)
        self.patch_size = _positive_int("patch_size", patch_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_patches = _positive_int("num_patches", num_patches)
        self.grid = math.isqrt(self.num_patches)
        if self.grid * self.grid != self.num_patches:
            raise ValueError(f"num_patches must be a perfect square (a G x G position grid), got {num_patches}")
        self.patch_dim = self.num_channels * self.patch_size * self.patch_size
        self.patch_embedding = nn.Linear(self.patch_dim, self.hidden_size, device=device, dtype=dtype)
        # `_weight` skips nn.Embedding's random init (costly on the meta device); the loader fills the table
        table = torch.empty(self.num_patches, self.hidden_size, device=device, dtype=dtype)
        self.position_embedding = nn.Embedding(self.num_patches, self.hidden_size, _weight=table)

    def extra_repr(self) -> str:
        return f"patch_dim={self.patch_dim}, hidden_size={self.hidden_size}, grid={self.grid}x{self.grid}"

    def position_grid(self, height: int, width: int) -> torch.Tensor:
        """The position table resized to a ``height x width`` patch grid: ``(height * width, D)``.

        Antialiased bilinear (``align_corners=False``), separable: columns first, then rows, in float32; the
        result is cast to the table's dtype.
        """
        table = self.position_embedding.weight
        grid = table.float().reshape(self.grid, self.grid, -1)
        row_weights = antialiased_bilinear_weights(height, self.grid, device=table.device)
        col_weights = antialiased_bilinear_weights(width, self.grid, device=table.device)
        resized = torch.einsum("hi,iwd->hwd", row_weights, torch.einsum("wj,ijd->iwd", col_weights, grid))
        return resized.reshape(height * width, -1).to(table.dtype)

    def padded_positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """Position embeddings for a batch, ``(B, length, D)`` in the table's dtype.

        Rows ``h*w ..`` of image ``i`` repeat its first position, as in transformers. Images that share a
        shape share one resize.
        """
        shapes = [tuple(pair) for pair in spatial_shapes.tolist()]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (height, width) in enumerate(shapes):
            if height <= 0 or width <= 0 or height * width > length:
                raise ValueError(
                    f"spatial_shapes[{index}] = ({height}, {width}) must be positive with h*w <= {length} "
                    f"(the number of patches per image in pixel_values)"
                )
            groups.setdefault((height, width), []).append(index)
        table = self.position_embedding.weight
        out = torch.empty(len(shapes), length, table.shape[1], device=table.device, dtype=table.dtype)
        for (height, width), members in groups.items():
            resized = self.position_grid(height, width)
            block = torch.cat([resized, resized[:1].expand(length - height * width, -1)])
            out[torch.tensor(members, device=table.device)] = block
        return out

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        """``pixel_values (B, N, C*p*p)``, ``spatial_shapes (B, 2)`` integer ``(h, w)`` -> ``(B, N, D)``.

        ``pixel_values`` is cast to the patch embedding's dtype first, as transformers does. Run
        :func:`check_naflex_inputs` beforehand for full validation. This method only rejects shapes that
        cannot be resized.
        """
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=weight.dtype))
        return patches + self.padded_positions(spatial_shapes, pixel_values.shape[1])


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


def check_naflex_inputs(
    pixel_values: object,
    pixel_attention_mask: object,
    spatial_shapes: object,
    *,
    num_channels: int,
    patch_size: int,
    check_finite: bool = True,
) -> None:
    """Validate a NaFlex batch before any compute; raise ``TypeError`` / ``ValueError`` naming the problem.

    Expected: ``pixel_values`` a float ``(B, N, C*p*p)`` tensor (``B >= 1``), finite; ``pixel_attention_mask``
    a ``(B, N)`` bool or 0/1 integer tensor whose row ``i`` is ``h_i*w_i`` ones followed by zeros (valid
    patches first); ``spatial_shapes`` an integer ``(B, 2)`` tensor of positive ``(h, w)`` with ``h*w <= N``.
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
    if batch == 0 or length == 0:
        raise ValueError(f"pixel_values is empty (shape {tuple(pixels.shape)}); pass at least one image and patch")
    mask = _check_tensor("pixel_attention_mask", pixel_attention_mask, 2, "(B, N)")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"pixel_attention_mask must have shape ({batch}, {length}) to match pixel_values, got {tuple(mask.shape)}"
        )
    _check_mask_values(mask)
    shapes = _check_spatial_shapes(spatial_shapes, batch, length)
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
    if check_finite and not bool(torch.isfinite(pixels).all()):
        bad = int((~torch.isfinite(pixels)).sum())
        raise ValueError(f"pixel_values contain {bad} NaN or infinite value(s); check the preprocessing")


def idefics3_position_ids(patch_attention_mask: torch.Tensor, num_patches_per_side: int) -> torch.Tensor:
    """Position ids of transformers' ``Idefics3VisionEmbeddings`` for a ``(B, h, w)`` bool patch mask.

    Each image's valid extent is ``n_h`` = valid rows in column 0 and ``n_w`` = valid columns in row 0. Row
    ``r`` maps to bucket ``bucketize(min(r * (1/n_h), 1 - 1e-6), arange(1/G, 1, 1/G), right=True)``, and
    columns map the same way. The id is ``row_bucket * G + col_bucket``. Masked-out patches get 0. All of
    this runs in float32, as in transformers, so the ids match its rounding too.

    Returns:
        ``LongTensor (B, h*w)`` on the mask's device.
    """
    mask = _check_tensor("patch_attention_mask", patch_attention_mask, 3, "(B, h, w)")
    if mask.dtype != torch.bool:
        raise TypeError(f"patch_attention_mask must be a bool tensor, got dtype {mask.dtype}")
    side = _positive_int("num_patches_per_side", num_patches_per_side)
    batch, rows, cols = mask.shape
    device = mask.device
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device, dtype=torch.float32)

    def buckets(valid: torch.Tensor, size: int) -> torch.Tensor:
        step = 1.0 / valid.to(torch.float32)  # (B,)
        coords = torch.arange(size, device=device, dtype=torch.float32)[None, :] * step[:, None]
        return torch.bucketize(coords.clamp(max=1.0 - 1e-6), boundaries, right=True)

    row_ids = buckets(mask[:, :, 0].sum(1), rows)  # (B, h)
    col_ids = buckets(mask[:, 0, :].sum(1), cols)  # (B, w)
    ids = (row_ids[:, :, None] * side + col_ids[:, None, :]).reshape(batch, rows * cols)
    return torch.where(mask.reshape(batch, rows * cols), ids, torch.zeros((), dtype=ids.dtype, device=device))


def _check_costs(costs: object, parts: object) -> tuple[list[int], int]:
    if isinstance(costs, (str, bytes)) or not isinstance(costs, Sequence):
        raise TypeError(f"costs must be a sequence of non-negative ints, got {type(costs).__name__}")
    values = list(costs)
    for index, cost in enumerate(values):
        if not _is_int(cost):
            raise TypeError(f"costs[{index}] must be an int, got {cost!r}")
        if cost < 0:
            raise ValueError(f"costs[{index}] must be non-negative, got {cost}")
    return values, _positive_int("parts", parts)


def balance_by_cost(costs: Sequence[int], parts: int) -> list[list[int]]:
    """Share item indices out to ``parts`` ranks so the largest per-rank total cost is small.

    Greedy longest-processing-time: items by cost descending (ties: lower index first), each to the part
    with the least load so far (ties: lower part number). Every index appears exactly once. Each part's
    indices are sorted ascending, and a part may be empty when there are fewer items than parts.
    """
    values, count = _check_costs(costs, parts)
    heap = [(0, part) for part in range(count)]
    assignment: list[list[int]] = [[] for _ in range(count)]
    for index in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        load, part = heapq.heappop(heap)
        assignment[part].append(index)
        heapq.heappush(heap, (load + values[index], part))
    return [sorted(members) for members in assignment]


def split_by_count(costs: Sequence[int], parts: int) -> list[list[int]]:
    """Contiguous split by number of items, ignoring cost (the first ``len % parts`` parts get one extra).

    Same signature as :func:`balance_by_cost` so the two can be swapped and compared.
    """
    values, count = _check_costs(costs, parts)
    base, extra = divmod(len(values), count)
    assignment, start = [], 0
    for part in range(count):
        size = base + (1 if part < extra else 0)
        assignment.append(list(range(start, start + size)))
        start += size
    return assignment


def max_share(costs: Sequence[int], assignment: Sequence[Sequence[int]]) -> float:
    """The largest part's share of the total cost (1/parts is perfect balance; 0.0 if everything is free)."""
    total = sum(costs)
    if total == 0:
        return 0.0
    return max(sum(costs[i] for i in part) for part in assignment) / total
