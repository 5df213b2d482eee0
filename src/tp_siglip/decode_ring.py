"""A ring of portion buffers in shared memory, which the decode workers write their pieces into directly.

The main process makes the buffers once, before the workers start, so no shared segment is made, faulted
in and mapped per piece. Why ``slots_needed`` buffers are enough, and the stamp that checks it anyway:
docs/encode-design.md#decoding-ahead-of-the-model.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

__all__ = ["DecodeFailed", "DecodeRing", "SharedMemoryTooSmall", "SlotOverwritten", "slots_needed"]

_SHM = "/dev/shm"


class DecodeFailed(RuntimeError):
    """The decode workers cannot deliver a portion (a bad image is never this: it is a reason)."""


class SharedMemoryTooSmall(DecodeFailed):
    """``/dev/shm`` has less free space than the ring needs."""


class SlotOverwritten(DecodeFailed):
    """A worker began writing into a buffer whose portion was still being read (a bug, never expected)."""


def slots_needed(ahead: int, parts: int) -> int:
    """Buffers a ring needs when the loader runs ``ahead`` items ahead and a portion has ``parts`` pieces."""
    return 1 + -(-ahead // parts)


def _free_shared_memory() -> int | None:
    """Free bytes in ``/dev/shm``, or None where there is none to measure (not Linux)."""
    if not sys.platform.startswith("linux") or not os.path.isdir(_SHM):
        return None
    stats = os.statvfs(_SHM)
    return stats.f_bavail * stats.f_frsize


class DecodeRing:
    """``slots`` buffers of ``rows`` items of ``item_shape``, each portion written in ``parts`` pieces; raises
    `SharedMemoryTooSmall` when ``/dev/shm`` has less room than they need (the message gives both sizes)."""

    def __init__(self, slots: int, rows: int, parts: int, item_shape: Sequence[int], dtype: torch.dtype = torch.uint8) -> None:
        if min(slots, rows, parts) < 1:
            raise ValueError(f"slots, rows and parts must be >= 1, got {slots}, {rows}, {parts}")
        shape = (slots, rows, *item_shape)
        needed = torch.Size(shape).numel() * dtype.itemsize
        free = _free_shared_memory()
        if free is not None and needed > free:
            raise SharedMemoryTooSmall(
                f"the decode workers need {needed / 2**20:.0f} MiB of shared memory ({slots} batches of {rows} "
                f"images) but {_SHM} has {free / 2**20:.0f} MiB free; give it more (docker run --shm-size=1g) or "
                "lower --batch-size (--workers 0 needs none)"
            )
        self.slots = slots
        self.data = torch.zeros(shape, dtype=dtype).share_memory_()  # every page faulted in now, in this process
        self.stamps = torch.full((slots, parts), -1, dtype=torch.int64).share_memory_()

    def piece(self, portion: int, part: int, start: int, stop: int) -> torch.Tensor:
        """In a worker: rows ``start:stop`` of portion ``portion``'s buffer, to write into (stamped first)."""
        slot = portion % self.slots
        if stop > self.data.shape[1]:
            raise ValueError(f"portion {portion} needs rows up to {stop}; a buffer holds {self.data.shape[1]}")
        self.stamps[slot, part] = portion
        return self.data[slot, start:stop]

    def portion(self, portion: int, rows: int) -> torch.Tensor:
        """Portion ``portion``'s first ``rows`` rows, where they lie (valid while `check` passes)."""
        return self.data[portion % self.slots, :rows]

    def check(self, portion: int) -> None:
        """Raise if a worker has begun writing another portion into portion ``portion``'s buffer."""
        stamps = self.stamps[portion % self.slots]
        if not bool((stamps == portion).all()):
            raise SlotOverwritten(
                f"decode buffer {portion % self.slots} holds parts of portions {sorted(set(stamps.tolist()))}, expected "
                f"{portion}, before its pixels were read; this is a bug in tp_siglip's pipeline, please report it"
            )
