"""How patches become tokens: the embeddings of every supported tower.

* `SiglipVisionEmbeddings` (SigLIP, SigLIP2 fixed-res, Idefics3/SmolVLM): images ``(B, C, H, W)`` through
  a "valid" strided conv, plus a learned position table over the square ``image_size / patch_size``
  grid. Other sizes resize the table (bicubic, ``interpolate_pos_encoding``) or, given a
  ``patch_attention_mask`` (Idefics3), look positions up by bucketized fractional coordinates
  (`idefics3_position_ids`).
* `NaFlexEmbeddings` (SigLIP2 NaFlex): patches arrive already flattened, ``(B, N, C*p*p)``, through a
  ``nn.Linear``; the square table is resized per image to its own grid ``spatial_shapes[i]``.

Choices:

* Every table is replicated on every rank (it is small); LoRAX-style row sharding went wrong on grids
  that ranks do not divide.
* **NaFlex resizing** means ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)``,
  computed as two small separable weight matrices (`antialiased_bilinear_weights`) in float32 and cast
  back, like transformers 5 does: torch 2.13's CPU kernel gets an output width of 1 wrong, and the
  separable form costs ``O(h*G*G*D)`` instead of ``O(h*w*G*G*D)``. Images that share a shape share one
  resize; padding rows get position (0, 0), as in transformers.
* **Idefics3 position ids** repeat transformers' float32 arithmetic step by step (fractional coordinate
  ``i * (1 / n_valid)``, clamped to ``1 - 1e-6``, bucketized onto ``arange(1/G, 1, 1/G)``): float rounding
  makes that differ from ``floor(i * G / n)``, and even from ``arange`` for a full image, for some grids
  (G = 19, 25, 29, ...). Padded patches get id 0.
* Tables are created with ``torch.empty`` and handed to ``nn.Embedding(_weight=...)``, which skips its
  random init: on the meta device that init would import torch's compiler stack for nothing.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from tp_siglip.config import SiglipVisionConfig

DeviceLike = Union[torch.device, str, int, None]


class SiglipVisionEmbeddings(nn.Module):
    """Non-overlapping patches (a "valid" strided conv) plus a learned, replicated position table."""

    def __init__(self, config: SiglipVisionConfig, *, device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            padding="valid",
            device=device,
            dtype=dtype,
        )
        table = torch.empty(config.num_positions, config.hidden_size, device=device, dtype=dtype)
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size, _weight=table)

    def position_table(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a ``rows x cols`` patch grid, ``(1, rows * cols, D)``.

        The native grid uses the table as is; any other grid resizes the square table with bicubic
        interpolation (align_corners=False, no antialiasing), as transformers does.
        """
        table = self.position_embedding.weight
        if (rows, cols) == (self.grid, self.grid):
            return table.unsqueeze(0)
        dim = table.shape[-1]
        square = table.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=(rows, cols), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        patch_attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, (H // p) * (W // p), D)``.

        Positions: the table as is for the native size; resized with ``interpolate_pos_encoding``; looked
        up by `idefics3_position_ids` when a ``patch_attention_mask (B, H // p, W // p)`` is given.
        """
        height, width = pixel_values.shape[-2:]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)
        if patch_attention_mask is not None:
            return embeddings + self.position_embedding(idefics3_position_ids(patch_attention_mask, self.grid))
        if interpolate_pos_encoding:
            return embeddings + self.position_table(height // self.patch_size, width // self.patch_size)
        return embeddings + self.position_embedding.weight


def idefics3_position_ids(patch_attention_mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Position ids of transformers' ``Idefics3VisionEmbeddings`` for a ``(B, h, w)`` bool patch mask.

    Each image's valid extent is ``n_h`` = valid rows in column 0 and ``n_w`` = valid columns in row 0.
    Row ``r`` maps to ``bucketize(min(r * (1/n_h), 1 - 1e-6), arange(1/G, 1, 1/G), right=True)``, columns
    alike; the id is ``row_bucket * G + col_bucket``; masked-out patches get 0. All in float32, as in
    transformers, so the ids match its rounding too. Returns ``LongTensor (B, h*w)``.
    """
    batch, rows, cols = patch_attention_mask.shape
    device = patch_attention_mask.device
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, device=device, dtype=torch.float32)

    def buckets(valid: torch.Tensor, size: int) -> torch.Tensor:
        step = 1.0 / valid.to(torch.float32)
        coords = torch.arange(size, device=device, dtype=torch.float32)[None, :] * step[:, None]
        return torch.bucketize(coords.clamp(max=1.0 - 1e-6), boundaries, right=True)

    row_ids = buckets(patch_attention_mask[:, :, 0].sum(1), rows)
    col_ids = buckets(patch_attention_mask[:, 0, :].sum(1), cols)
    ids = (row_ids[:, :, None] * grid + col_ids[:, None, :]).reshape(batch, rows * cols)
    return torch.where(patch_attention_mask.reshape(batch, rows * cols), ids, torch.zeros_like(ids))


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
    """SigLIP2 NaFlex: a linear embedding of flattened patches plus the position grid resized per image.

    Parameters as transformers' ``Siglip2VisionEmbeddings``: ``patch_embedding`` is ``nn.Linear(C*p*p, D)``,
    ``position_embedding`` is ``nn.Embedding(num_patches, D)``, read as a ``G x G`` grid in row-major order.
    """

    def __init__(self, config: SiglipVisionConfig, *, device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.grid = math.isqrt(config.num_positions)
        patch_dim = config.num_channels * config.patch_size**2
        self.patch_embedding = nn.Linear(patch_dim, config.hidden_size, device=device, dtype=dtype)
        table = torch.empty(config.num_positions, config.hidden_size, device=device, dtype=dtype)
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size, _weight=table)

    def position_grid(self, height: int, width: int) -> torch.Tensor:
        """The table resized to a ``height x width`` grid, ``(height * width, D)``, in the table's dtype."""
        table = self.position_embedding.weight
        grid = table.float().reshape(self.grid, self.grid, -1)
        row_weights = antialiased_bilinear_weights(height, self.grid, device=table.device)
        col_weights = antialiased_bilinear_weights(width, self.grid, device=table.device)
        resized = torch.einsum("hi,iwd->hwd", row_weights, torch.einsum("wj,ijd->iwd", col_weights, grid))
        return resized.reshape(height * width, -1).to(table.dtype)

    def padded_positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """Position embeddings of a batch, ``(B, length, D)``; rows past ``h*w`` repeat position (0, 0)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (height, width) in enumerate(spatial_shapes.tolist()):
            groups.setdefault((height, width), []).append(index)
        table = self.position_embedding.weight
        out = torch.empty(spatial_shapes.shape[0], length, table.shape[1], device=table.device, dtype=table.dtype)
        for (height, width), members in groups.items():
            resized = self.position_grid(height, width)
            block = torch.cat([resized, resized[:1].expand(length - height * width, -1)])
            out[torch.tensor(members, device=table.device)] = block
        return out

    def forward(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
        """``pixel_values (B, N, C*p*p)``, ``spatial_shapes (B, 2)`` of ``(h, w)`` -> ``(B, N, D)``."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=weight.dtype))
        return patches + self.padded_positions(spatial_shapes, pixel_values.shape[1])
