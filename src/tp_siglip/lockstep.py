"""How the ranks of ``tp-siglip encode`` stay in lockstep when files are bad, missing or differ between ranks.

Every rank lists and decodes the same files, and every batch must be identical on every rank (tensor
parallel: each rank computes a slice of the same batch; data parallel: each takes its share of it). A
file that one rank cannot read, or reads differently, must therefore be dropped by every rank, in the same
batch. A few collectives on the default process group decide this; each returns the same answer on every rank.

* :func:`agree_on_files`, once before the first batch: the ranks compare a hash of their file lists (a
  mismatch raises :class:`RanksDisagree` on every rank), rank 0 says whether it can resume, and rank 0's
  "already in the output" flags are broadcast (only rank 0 reads the earlier output).
* :func:`share_from_rank0`, once for a NaFlex tower: rank 0's ``max_num_patches`` (each rank reads the
  default from its own copy of the checkpoint; different copies must not mean different grids).
* :func:`agree_on_batch`, once per batch: one all-reduce (MAX) of four int64 rows per file: "failed here",
  "read here", a 62-bit hash of the decoded pixels and its negation. A file is kept only when no rank
  failed and the maximum hash equals the minimum (every rank decoded the same pixels). The cost is one
  small all-reduce and one BLAKE2b pass over the pixels per batch.

Choices made: hashes rather than broadcasting pixels (rank 0 would become the bottleneck); a file
unreadable on any rank is skipped rather than sent from a rank that could read it (same reason, and a file
that differs between nodes is suspect anyway). Without a process group (one process) nothing is exchanged.
Tensors for the collectives live on the GPU for NCCL groups, else on the CPU.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["RanksDisagree", "agree_on_batch", "agree_on_files", "share_from_rank0"]


class RanksDisagree(RuntimeError):
    """The ranks do not see the same files."""


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _digest(data: Any) -> int:
    """A 62-bit hash (fits an int64 and its negation) of bytes or a C-contiguous buffer."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


def agree_on_files(
    files: Sequence[Path], done: Optional[list[bool]], problem: bool, rank: int, world_size: int
) -> tuple[list[bool], bool]:
    """Check that every rank lists the same ``files``; share rank 0's ``done`` flags and ``problem``.

    ``done`` (which files an earlier output already holds) and ``problem`` (rank 0 cannot resume) are read
    from rank 0 only. Returns ``(done, problem)`` as rank 0 sees them, on every rank.

    Raises:
        RanksDisagree: on every rank, when the ranks' file lists differ.
    """
    if not _distributed(world_size):
        return (done or [False] * len(files)), problem
    device = _collective_device()
    listing = _digest("\n".join(map(str, files)).encode())
    flags = torch.tensor([listing, -listing, int(problem and rank == 0)], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0].item() != -flags[1].item():
        raise RanksDisagree(
            "the ranks list different image files; every rank must see the same files (same inputs, same working directory)"
        )
    mask = torch.tensor(done if (rank == 0 and done) else [False] * len(files), dtype=torch.uint8, device=device)
    dist.broadcast(mask, src=0)
    return [bool(v) for v in mask.tolist()], bool(flags[2].item())


def share_from_rank0(value: int, world_size: int) -> int:
    """Rank 0's ``value`` on every rank (one broadcast of one int64); ``value`` itself without a process group."""
    if not _distributed(world_size):
        return value
    shared = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.broadcast(shared, src=0)
    return int(shared.item())


def agree_on_batch(pixels: torch.Tensor, reasons: list[Optional[str]], world_size: int) -> tuple[list[bool], list[str]]:
    """Decide, identically on every rank, which files of a batch to encode.

    Args:
        pixels: This rank's decoded batch, one row per file (rows of unreadable files are ignored); any dtype,
            its bytes are hashed (NaFlex: the patches and the grid, see `tp_siglip.encode`).
        reasons: Per file, ``None`` when this rank read it, else why not.

    Returns:
        ``(keep, why)``: ``why[i]`` says why file ``i`` is skipped: this rank's own reason (with "read fine
        on another rank" when some rank could read it), or what went wrong elsewhere.
    """
    count = len(reasons)
    failed = [int(r is not None) for r in reasons]
    if not _distributed(world_size):
        return [not f for f in failed], [r or "" for r in reasons]
    hashes = [0 if failed[i] else _digest(pixels[i].contiguous().view(torch.uint8).numpy()) for i in range(count)]
    table = torch.tensor(
        [failed, [1 - f for f in failed], hashes, [-h for h in hashes]], dtype=torch.int64, device=_collective_device()
    )
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    any_failed, any_read, high, neg_low = (row.tolist() for row in table.cpu())
    keep, why = [], []
    for i in range(count):
        own = reasons[i]
        if own is not None:
            why.append(own if not any_read[i] else f"{own} (read fine on another rank)")
        elif any_failed[i]:
            why.append("unreadable on another rank (see that rank's warning)")
        elif high[i] != -neg_low[i]:
            why.append("the ranks decoded different pixels (was the file changed while being read?)")
        else:
            why.append("")
        keep.append(why[-1] == "")
    return keep, why
