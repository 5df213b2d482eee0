"""All-reduce and all-gather through shared memory for CPU ranks on one host (gloo's TCP loopback is the bottleneck).

A tensor-parallel forward does two sums per layer; here they cost a fraction of gloo's (figures in
docs/architecture.md and docs/benchmarks.md).

How it works, per process group:

* Rank 0 creates a file in ``/dev/shm`` with a random name and broadcasts the name over the group;
  every rank maps it (``torch.from_file(shared=True)``) and the file is unlinked once all have it, so
  nothing is left behind even if a process dies. If any rank cannot map it (ranks on different hosts),
  all ranks agree to fall back to gloo.
* A sum: each rank copies its tensor into its own slot, a barrier makes every slot visible (the
  barrier's system calls are full memory barriers, so no architecture-specific ordering is assumed),
  then every rank adds the slots in rank order (in fp32 for fp16/bf16 tensors, rounded once at the
  end). Same order everywhere, so all ranks get the same bits.
* An all-gather (`gather_in_place`) is the same first half: each rank writes straight into its slot, one
  barrier, and every rank reads every slot where it lies, before its next operation on the segment (the
  encode job's exchanges, and the row gathers of a split batch).
* A reduce-scatter (`sum_rows`, for a batch split by rows) is a sum of which each rank adds up only its
  own rows, in the same rank order: the same bits as those rows of a full sum.
* Two sets of slots alternate between consecutive operations (sums and gathers alike): a rank can only start writing a set again after
  the barrier of the sum in between, which every rank reaches only after it finished reading that set.
  So one barrier per sum suffices.
* The segment grows (collectively: all ranks reduce same-shaped tensors, so they all grow at the same
  sum) when a tensor does not fit.
* The barrier is gloo's (``dist.barrier`` on the group): a named-pipe barrier was tried and removed, as it
  did not pay for one rank or data-parallel ranks (docs/benchmarks.md).

``TP_SIGLIP_SHM_ALLREDUCE=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import weakref
from typing import Callable, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
MIN_SLOT_BYTES = 8 * 1024 * 1024


def enabled() -> bool:
    """Whether shared-memory sums may be tried at all on this machine."""
    return os.environ.get("TP_SIGLIP_SHM_ALLREDUCE", "1") != "0" and os.path.isdir(SHM_DIR)


def _segment_path(token: int) -> str:
    return os.path.join(SHM_DIR, f"tp-siglip-{token}")


class SharedMemoryAllReduce:
    """Sums contiguous CPU tensors over the ranks of ``group`` through one shared segment."""

    def __init__(self, group: dist.ProcessGroup, slot_bytes: int) -> None:
        # only a weak reference: a group kept alive past destroy_process_group can make gloo abort the
        # process at interpreter exit
        self._group = weakref.ref(group)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.slot_bytes = slot_bytes
        self.step = 0
        self.buffer = self._map_segment(2 * self.size * slot_bytes)

    def _from_rank_0(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (one broadcast)."""
        token = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(token, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(token[0])

    def _map_segment(self, nbytes: int) -> Optional[torch.Tensor]:
        """A new segment of ``nbytes`` mapped on every rank (collectively), or None on every rank if any could not."""
        created = None  # rank 0's file: unlinked once every rank has mapped it, or on any error (a rank died)
        try:
            token = -1
            if self.rank == 0:
                with contextlib.suppress(OSError):  # cannot make it: -1 tells every rank so
                    drawn = secrets.randbits(62)
                    with open(_segment_path(drawn), "xb") as fh:
                        fh.truncate(nbytes)
                    created, token = _segment_path(drawn), drawn
            token = self._from_rank_0(token)
            buffer, ok = None, torch.zeros(1, dtype=torch.int64)
            if token >= 0:
                try:  # a normal tensor even when first used under inference_mode: writable after it, too
                    with torch.inference_mode(False):
                        buffer = torch.from_file(_segment_path(token), shared=True, size=nbytes, dtype=torch.uint8)
                    ok[0] = 1
                except (OSError, RuntimeError):
                    pass
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)  # every rank has mapped it (or not)
            return buffer if bool(ok[0]) else None
        finally:
            if created is not None:
                os.unlink(created)

    @property
    def group(self) -> dist.ProcessGroup:
        group = self._group()
        if group is None:
            raise RuntimeError("the process group of this shared-memory all-reduce no longer exists")
        return group

    @property
    def usable(self) -> bool:
        return self.buffer is not None

    def _slot(self, parity: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        start = (parity * self.size + rank) * self.slot_bytes
        raw = self.buffer[start : start + like.numel() * like.element_size()]
        return raw.view(like.dtype).view(like.shape)

    def _fit(self, nbytes: int) -> None:
        """Grow the segment (collectively: every rank asks for the same size at the same step) to hold ``nbytes``."""
        if nbytes > self.slot_bytes:  # slots stay 64-byte multiples: views of any dtype line up
            slot_bytes = max(-(-nbytes // 64) * 64, 2 * self.slot_bytes)
            self.buffer, self.slot_bytes, self.step = self._map_segment(2 * self.size * slot_bytes), slot_bytes, 0
            if self.buffer is None:
                raise RuntimeError("could not grow the shared-memory all-reduce segment")

    def _publish(self, x: torch.Tensor) -> int:
        """Copy ``x`` into this rank's slot of the next set and wait until every rank has; returns the set."""
        return self._fill_and_wait(x.numel() * x.element_size(), lambda raw: raw.view(x.dtype).view(x.shape).copy_(x))

    def _fill_and_wait(self, nbytes: int, fill: Callable[[torch.Tensor], object]) -> int:
        """``fill`` this rank's slot of the next set (``nbytes`` raw bytes), wait until every rank has; returns the set."""
        self._fit(nbytes)
        parity = self.step % 2
        self.step += 1
        start = (parity * self.size + self.rank) * self.slot_bytes
        fill(self.buffer[start : start + nbytes])
        dist.barrier(group=self.group)
        return parity

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (contiguous, CPU) over the group in place and return it."""
        parity = self._publish(x)
        if x.dtype in (torch.float16, torch.bfloat16):  # add the partial sums in fp32, round once
            total = self._slot(parity, 0, x).float()
            for rank in range(1, self.size):
                total.add_(self._slot(parity, rank, x))
            return x.copy_(total)
        x.copy_(self._slot(parity, 0, x))
        for rank in range(1, self.size):
            x.add_(self._slot(parity, rank, x))
        return x

    def sum_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """A reduce-scatter: sum ``x`` (contiguous, CPU, the same shape everywhere) over the group and return
        only this rank's rows of the sum (rank ``r`` owns ``sizes[r]`` consecutive rows of dim 0), added in
        rank order like a full sum, so they are the same bits as those rows of ``self(x)``."""
        parity = self._publish(x)
        first = sum(sizes[: self.rank])
        rows = slice(first, first + sizes[self.rank])
        slots = [self._slot(parity, r, x)[rows] for r in range(self.size)]
        total = slots[0].float() if x.dtype in (torch.float16, torch.bfloat16) else slots[0].clone()
        for slot in slots[1:]:
            total.add_(slot)
        return total.to(x.dtype)

    def gather_in_place(self, nbytes: int, fill: Callable[[torch.Tensor], object]) -> list[torch.Tensor]:
        """An all-gather without the copies in and out: ``fill`` writes this rank's ``nbytes`` straight into its slot (a uint8
        view holding stale bytes: ``fill`` writes every byte it means), one barrier, and every rank's slot comes
        back as a uint8 view, in rank order. Read them (or copy them) before this rank's next operation here:
        once every rank has passed that one's barrier, a rank may write these slots again."""
        parity = self._fill_and_wait(nbytes, fill)
        first = parity * self.size * self.slot_bytes
        return [self.buffer[first + r * self.slot_bytes : first + r * self.slot_bytes + nbytes] for r in range(self.size)]


#: reducer per group, keyed weakly so that the cache never keeps a group alive
_BY_GROUP: weakref.WeakKeyDictionary[dist.ProcessGroup, Optional[SharedMemoryAllReduce]] = weakref.WeakKeyDictionary()


def for_group(group: dist.ProcessGroup) -> Optional[SharedMemoryAllReduce]:
    """The group's shared-memory reducer, set up on first use (collectively), or None if unusable."""
    if group in _BY_GROUP:
        return _BY_GROUP[group]
    reducer: Optional[SharedMemoryAllReduce] = None
    if dist.get_backend(group) == "gloo":
        reducer = SharedMemoryAllReduce(group, MIN_SLOT_BYTES)
        if not reducer.usable:
            logger.warning("shared-memory all-reduce unavailable (ranks on several hosts?); using gloo")
            reducer = None
    _BY_GROUP[group] = reducer
    return reducer
