"""The parallel linear layers, and the batch split by rows they understand.

* `ColumnParallelLinear` keeps output rows (this rank's heads, or MLP columns) of one or several
  checkpoint layers fused into one GEMM; `RowParallelLinear` keeps the matching input columns and sums
  partial products over the group, adding its replicated bias once, after the sum: exact for any split.
* **A batch may be split by rows** (`split_batch`, the model's ``batch_sizes``): Megatron-LM's sequence
  parallelism over images. Each rank holds its own images between the parallel layers, so what every
  rank would compute alike (embeddings, norms, residual adds) is computed once; a column-parallel layer
  all-gathers the rows first and a row-parallel one reduce-scatters, keeping its rows of the sum. The
  GEMMs still see the whole batch, each row's arithmetic is the unsplit forward's, and an all-gather plus
  a reduce-scatter move the bytes of the one all-reduce they replace. The split is read from a context
  variable set for one forward (sizes only).
* Layers talk through their group's `Communicator` (``comm``; ``None`` for one rank: plain ``nn.Linear``
  math) and never see the transport.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tp_siglip.parallel.communicator import Communicator
from tp_siglip.parallel.groups import ProcessGroup, communicator_for
from tp_siglip.parallel.sharding import Block, Layout, Piece, piece_targets

#: within `split_batch`: how many rows (images) of the batch each rank of the group holds, in rank order
_BATCH_SPLIT: ContextVar[Optional[tuple[int, ...]]] = ContextVar("tp_siglip_batch_split", default=None)


@contextmanager
def split_batch(sizes: Sequence[int]) -> Iterator[None]:
    """Within this block each rank holds only its rows of the batch: rank ``r`` the next ``sizes[r]``.

    Megatron-LM's sequence parallelism, over images instead of tokens: what every rank would compute alike
    (embeddings, layer norms, residual adds, the head's norm) is computed once, by the rank that holds
    the row. A `ColumnParallelLinear` all-gathers its input rows first (`gather_rows`) and a
    `RowParallelLinear` sums and keeps this rank's rows (`sum_rows`, a reduce-scatter) instead of summing
    the whole batch: as many bytes move as with one all-reduce, and the GEMMs see the whole batch as usual.
    """
    token = _BATCH_SPLIT.set(tuple(int(n) for n in sizes))
    try:
        yield
    finally:
        _BATCH_SPLIT.reset(token)


def active_split() -> Optional[tuple[int, ...]]:
    """The ranks' row counts inside `split_batch`, else ``None`` (always under ``torch.compile``, which cannot
    trace a context variable; the model refuses ``batch_sizes`` there)."""
    return None if torch.compiler.is_compiling() else _BATCH_SPLIT.get()


def gather_rows(x: torch.Tensor, comm: Optional[Communicator]) -> torch.Tensor:
    """Inside `split_batch`: every rank's rows of ``x`` (dim 0), in rank order; elsewhere ``x`` itself."""
    sizes = active_split()
    return x if sizes is None or comm is None else comm.all_gather_rows(x, sizes)


def sum_rows(x: torch.Tensor, comm: Optional[Communicator]) -> torch.Tensor:
    """The sum of ``x`` over the group: inside `split_batch` this rank's rows only (a reduce-scatter),
    elsewhere the whole sum (an all-reduce); ``x`` itself without a communicator."""
    if comm is None:
        return x
    sizes = active_split()
    return comm.all_reduce(x) if sizes is None else comm.reduce_scatter_rows(x, sizes)


class ColumnParallelLinear(nn.Module):
    """``y = x W_local^T + b_local``, where ``W_local`` stacks this rank's row ``blocks`` of checkpoint layers.

    Input is replicated on every rank, output is sharded along its last dimension; no communication
    (inside `split_batch` the input rows are all-gathered over ``group`` first).
    One block is the classic column-parallel layer (``fc1``); several blocks fuse layers that read the
    same input into one GEMM (``q_proj``, ``k_proj``, ``v_proj``). ``state_dict()`` and loading still speak
    the checkpoint's names: each block is stored under its own layer's name.
    """

    def __init__(
        self,
        in_features: int,
        blocks: Sequence[Block],
        *,
        group: Optional[ProcessGroup] = None,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a ColumnParallelLinear needs at least one block")
        self.in_features = in_features
        self.comm = communicator_for(group)
        self.blocks = tuple(blocks)
        self.out_features = sum(b.end - b.start for b in self.blocks)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if bias else None
        if any(b.name is not None for b in self.blocks):
            self._register_state_dict_hook(_split_blocks)  # loading: `join_blocks` on the model

    @classmethod
    def shard(cls, in_features: int, out_features: int, rows: tuple[int, int], **kwargs: Any) -> ColumnParallelLinear:
        """The classic layer: rows ``[start, end)`` of its own ``(out_features, in_features)`` weight."""
        return cls(in_features, [Block(None, out_features, *rows)], **kwargs)

    def block_rows(self) -> list[tuple[int, int]]:
        """``[start, end)`` of each block within the local output."""
        spans, offset = [], 0
        for block in self.blocks:
            spans.append((offset, offset + block.end - block.start))
            offset += block.end - block.start
        return spans

    def forward(self, x: torch.Tensor, blocks: slice = slice(None), *, shared: bool = False) -> torch.Tensor:
        """The layer's output, or only that of ``blocks`` (e.g. ``slice(1, 3)``: k and v of a q/k/v layer).

        ``shared``: ``x`` is the same on every rank, not rows of the batch (a learned probe), so a split batch
        does not gather it."""
        if not shared:
            x = gather_rows(x, self.comm)
        if blocks == slice(None):
            return F.linear(x, self.weight, self.bias)
        spans = self.block_rows()[blocks]
        rows = slice(spans[0][0], spans[-1][1])
        return F.linear(x, self.weight[rows], None if self.bias is None else self.bias[rows])

    def checkpoint_pieces(self, prefix: str) -> Layout:
        """Where ``weight`` and ``bias`` come from, given this layer's own name ``prefix`` (with a dot)."""
        shapes = {"weight": lambda rows: (rows, self.in_features), "bias": lambda rows: (rows,)}
        if self.bias is None:
            del shapes["bias"]
        return {
            leaf: tuple(Piece(b.tensor_name(leaf, prefix), shape(b.full_rows), 0, b.start, b.end) for b in self.blocks)
            for leaf, shape in shapes.items()
        }

    def extra_repr(self) -> str:
        blocks = ", ".join(f"{b.name or 'self'}[{b.start}:{b.end}]" for b in self.blocks)
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks=({blocks})"


def _split_blocks(module: ColumnParallelLinear, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """state_dict hook: store each block under its checkpoint tensor's name (this rank's rows only).

    Blocks cut from one checkpoint tensor (``in_proj_weight``'s q, k and v thirds) are stored together.
    """
    for leaf, pieces in module.checkpoint_pieces(prefix).items():
        fused = state.pop(prefix + leaf)
        grouped: dict[str, list[torch.Tensor]] = {}
        for piece, view in zip(pieces, piece_targets(fused, pieces)):
            grouped.setdefault(piece.source, []).append(view)
        for source, views in grouped.items():
            state[source] = views[0] if len(views) == 1 else torch.cat(views)


def join_blocks(root: nn.Module, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    """load_state_dict pre-hook for the module that holds fused layers: the inverse of `_split_blocks`.

    It must sit on an ancestor (the model): torch hands a layer only the keys under its own name, and
    ``q_proj.weight`` is not under ``qkv_proj.``.
    """
    for name, module in root.named_modules():
        if not isinstance(module, ColumnParallelLinear) or all(b.name is None for b in module.blocks):
            continue
        for leaf, pieces in module.checkpoint_pieces(f"{prefix}{name}.").items():
            sources = list(dict.fromkeys(p.source for p in pieces))
            if all(source in state for source in sources):
                chunks = {s: list(state.pop(s).split([p.length for p in pieces if p.source == s])) for s in sources}
                state[f"{prefix}{name}.{leaf}"] = torch.cat([chunks[p.source].pop(0) for p in pieces])


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_local W_local^T) + b``: keeps the input columns ``in_range`` of a full weight.

    Input is sharded along its last dimension (the output of a column-parallel layer), output is full
    and identical on every rank (inside `split_batch`: this rank's rows of it). The bias is replicated
    and added once, after the sum.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_range: tuple[int, int],
        group: Optional[ProcessGroup],
        *,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.in_range = (int(in_range[0]), int(in_range[1]))
        self.comm = communicator_for(group)  # None: one rank, no sum
        local = self.in_range[1] - self.in_range[0]
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def checkpoint_pieces(self, prefix: str) -> Layout:
        """The weight's input columns of this rank; the bias whole."""
        pieces = {"weight": (Piece(prefix + "weight", (self.out_features, self.in_features), 1, *self.in_range),)}
        if self.bias is not None:
            pieces["bias"] = (Piece(prefix + "bias", (self.out_features,)),)
        return pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return F.linear(x, self.weight, self.bias)
        y = sum_rows(F.linear(x, self.weight), self.comm)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, in_range={self.in_range}"

