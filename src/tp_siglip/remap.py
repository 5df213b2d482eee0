"""Tensors of other checkpoint layouts seen under transformers' names, read only where a rank asks.

The model describes what each rank holds as pieces of transformers' tensors (`parallel.Piece`). A timm,
open_clip or big_vision checkpoint stores the same numbers under other names and shapes: q, k and v fused
in one ``qkv`` weight, the pooling head's query and key/value apart, kernels transposed, a position table
with a leading axis of one. A `Mapped` entry says which stored tensors make one transformers tensor and
how; at read time it becomes a *source* that answers ``source[index]`` (the index of a piece) by reading
just those elements of the stored tensors, through safetensors' slice API or a memory-mapped ``.npz``
member. No stored tensor is ever read whole unless the piece asks for all of it.

Sources return torch tensors that the loader copies into memory each parameter owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

Index = tuple[slice, ...]


@dataclass(frozen=True)
class Mapped:
    """A transformers tensor of full ``shape`` made by ``build`` from the stored tensors ``keys`` (in order).

    ``build`` takes the opened stored tensors (sliceable, lazily read) and returns a source (`Rows`, `Concat`,
    ...) in transformers' orientation.
    """

    keys: tuple[str, ...]
    shape: tuple[int, ...]
    build: Callable[[Sequence[Any]], Any]


def whole(key: str, shape: tuple[int, ...]) -> Mapped:
    """The stored tensor ``key`` itself, same shape."""
    return Mapped((key,), tuple(shape), lambda bases: Tensor(bases[0]))


class Tensor:
    """A stored tensor (safetensors slice, numpy array or memmap view) answering ``[index]`` with a torch tensor."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __getitem__(self, index: Index) -> torch.Tensor:
        return as_torch(self.base[index])


def as_torch(value: Any) -> torch.Tensor:
    """``value`` as a torch tensor; a numpy view (of a read-only memory map) is first copied into memory of its own."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.array(value, order="C", copy=True))


@dataclass
class Rows:
    """Rows ``[offset, offset + count)`` (first axis) of a stored tensor, seen as a tensor of their own."""

    base: Any
    offset: int
    count: int

    def __getitem__(self, index: Index) -> torch.Tensor:
        start, stop, step = index[0].indices(self.count)
        if step != 1:
            raise ValueError(f"only contiguous row ranges can be read, got step {step}")
        return as_torch(self.base[(slice(self.offset + start, self.offset + stop), *index[1:])])


@dataclass
class Leading:
    """A stored tensor with a leading axis of one (timm's ``pos_embed`` (1, N, D)) seen without it."""

    base: Any

    def __getitem__(self, index: Index) -> torch.Tensor:
        return as_torch(self.base[(slice(0, 1), *index)])[0]


@dataclass
class Concat:
    """Sources stacked along the first axis (``in_proj_weight`` = q; k; v), each of ``sizes[i]`` rows."""

    parts: Sequence[Any]
    sizes: Sequence[int]

    def __getitem__(self, index: Index) -> torch.Tensor:
        start, stop, step = index[0].indices(sum(self.sizes))
        if step != 1:
            raise ValueError(f"only contiguous row ranges can be read, got step {step}")
        chunks, offset = [], 0
        for part, size in zip(self.parts, self.sizes):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                chunks.append(as_torch(part[(slice(lo - offset, hi - offset), *index[1:])]))
            offset += size
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def rows_of(key: str, stored: tuple[int, ...], part: int, parts: int) -> Mapped:
    """Part ``part`` of ``parts`` equal row blocks of the stored tensor ``key`` (timm's fused ``qkv``: q, k, v)."""
    count = stored[0] // parts
    return Mapped((key,), (count, *stored[1:]), lambda bases: Rows(bases[0], part * count, count))


def stacked(keys: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> Mapped:
    """The stored tensors ``keys`` one after another along the first axis."""
    sizes = [shape[0] for shape in shapes]
    shape = (sum(sizes), *shapes[0][1:])
    return Mapped(tuple(keys), shape, lambda bases: Concat([Tensor(b) for b in bases], sizes))
