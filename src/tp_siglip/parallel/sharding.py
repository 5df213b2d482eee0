"""How weights split over ranks: shard sizes, the checkpoint pieces each local parameter is made of, and
the plan of which heads and MLP columns a rank owns.

Pure bookkeeping: no collective runs here (a plan asks `groups` for its group's communicator). The loader,
``load_weights``, random init and ``state_dict()`` all read the one description this file defines
(`checkpoint_layout`).

* **Shards follow attention heads and may be uneven.** ``H`` heads over ``W`` ranks give the first
  ``H % W`` ranks one extra head (16 over 3 = 6/5/5). Row-parallel sums are exact whatever the shard sizes.
* **The MLP width is split as evenly as possible** (4304 over 3 = 1435/1435/1434), independently of the
  heads: any split is correct, and an even one keeps the slowest rank's part of the largest GEMMs small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tp_siglip.parallel.communicator import Communicator
from tp_siglip.parallel.groups import ProcessGroup, communicator_for, group_rank, group_size


def split_sizes(total: int, parts: int) -> list[int]:
    """Split ``total`` items into ``parts`` contiguous shards, the first ``total % parts`` one larger."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts; expected at least 1")
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def shard_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of shard ``index`` when ``total`` items are split by `split_sizes`."""
    sizes = split_sizes(total, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass(frozen=True)
class Piece:
    """One block of a checkpoint tensor that a local parameter is made of.

    ``source`` is the checkpoint name (relative to the tower) and ``full_shape`` its full shape. Along
    ``dim`` the span ``[start, end)`` is taken (``dim=None``: the whole tensor). A parameter made of several
    pieces (a fused q/k/v weight) is their concatenation along ``dim``, in order.
    """

    source: str
    full_shape: tuple[int, ...]
    dim: Optional[int] = None
    start: int = 0
    end: int = 0

    @property
    def length(self) -> int:
        """Size of the piece along ``dim``."""
        return self.end - self.start

    def index(self) -> tuple[slice, ...]:
        """The piece's index into the full checkpoint tensor."""
        index = [slice(None)] * len(self.full_shape)
        if self.dim is not None:
            index[self.dim] = slice(self.start, self.end)
        return tuple(index)


#: how every local parameter (full name) is cut from checkpoint tensors
Layout = dict[str, tuple[Piece, ...]]


def piece_targets(param: torch.Tensor, pieces: Sequence[Piece]) -> list[torch.Tensor]:
    """Views of ``param`` that ``pieces`` fill, in order (a piece with ``dim=None`` fills all of it)."""
    if len(pieces) == 1 and pieces[0].dim is None:
        return [param]
    views, offset = [], 0
    for piece in pieces:
        views.append(param.narrow(piece.dim, offset, piece.length))
        offset += piece.length
    return views


def feeds_by_source(layout: Layout, params: dict[str, torch.Tensor]) -> dict[str, list[tuple[torch.Tensor, Piece]]]:
    """For each checkpoint tensor (in layout order): the parameter views it fills and the piece each takes."""
    feeds: dict[str, list[tuple[torch.Tensor, Piece]]] = {}
    for name, pieces in layout.items():
        for piece, view in zip(pieces, piece_targets(params[name], pieces)):
            feeds.setdefault(piece.source, []).append((view, piece))
    return feeds


@torch.no_grad()
def copy_piece(target: torch.Tensor, piece: Piece, source: Any) -> None:
    """Copy ``piece`` of ``source`` (a full tensor, or a lazy safetensors slice) into ``target``."""
    target.copy_(source[piece.index()])


@dataclass(frozen=True)
class Block:
    """Rows ``[start, end)`` of a checkpoint linear layer with ``full_rows`` output rows.

    ``name`` is the checkpoint layer's name relative to the parent of the layer that holds the block:
    its tensors are ``{name}.weight`` / ``{name}.bias``, or ``{name}_weight`` / ``{name}_bias`` with
    ``flat=True`` (``nn.MultiheadAttention``'s ``in_proj_weight``). ``name=None`` means the holding
    layer itself (its own ``weight`` / ``bias``).
    """

    name: Optional[str]
    full_rows: int
    start: int
    end: int
    flat: bool = False

    def tensor_name(self, leaf: str, own_prefix: str) -> str:
        if self.name is None:
            return own_prefix + leaf
        parent = own_prefix[: own_prefix.rstrip(".").rfind(".") + 1]
        return parent + self.name + ("_" if self.flat else ".") + leaf




def checkpoint_layout(root: nn.Module) -> Layout:
    """For every parameter of ``root`` (full name), the checkpoint pieces it is made of.

    Parallel layers say it themselves (``checkpoint_pieces``); every other parameter is its checkpoint
    tensor, whole and under its own name.
    """
    layout: Layout = {}
    for module_name, module in root.named_modules():
        prefix = f"{module_name}." if module_name else ""
        custom = module.checkpoint_pieces(prefix) if hasattr(module, "checkpoint_pieces") else {}
        for leaf, param in module.named_parameters(recurse=False):
            layout[prefix + leaf] = custom.get(leaf) or (Piece(prefix + leaf, tuple(param.shape)),)
    return layout


@dataclass(frozen=True)
class TensorParallelPlan:
    """The group a model is sharded over, its communicator, and which heads and MLP columns this rank owns."""

    group: Optional[ProcessGroup]
    world_size: int
    rank: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    #: the group's collectives (`communicator_for`); ``None`` for a single rank, which needs none
    comm: Optional[Communicator] = None

    @classmethod
    def for_group(cls, group: Optional[ProcessGroup], num_heads: int, head_dim: int, intermediate_size: int):
        size = group_size(group)
        if size > num_heads:
            raise ValueError(
                f"world_size {size} is larger than num_attention_heads {num_heads}: every rank needs at "
                f"least one head; use at most {num_heads} ranks"
            )
        return cls(group, size, group_rank(group), num_heads, head_dim, intermediate_size, communicator_for(group))

    @property
    def heads(self) -> tuple[int, int]:
        """``[first, last)`` head of this rank."""
        return shard_range(self.num_heads, self.world_size, self.rank)

    @property
    def head_columns(self) -> tuple[int, int]:
        """Columns of the hidden dimension that this rank's heads cover."""
        first, last = self.heads
        return first * self.head_dim, last * self.head_dim

    @property
    def mlp_columns(self) -> tuple[int, int]:
        """This rank's columns of the MLP's intermediate dimension."""
        return shard_range(self.intermediate_size, self.world_size, self.rank)
