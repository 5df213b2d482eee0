"""A barrier for the CPU ranks of one host through named pipes: tens of microseconds where gloo's takes about 1 ms.

Every shared-memory sum or gather (``shm_allreduce.py``) waits at one barrier, and a tensor-parallel
forward does several per layer. Measured on a 2-core machine between two ranks: a gloo barrier took
about 370 us idle and 900-1000 us while two other processes kept the cores busy (the encode job's decode
workers do); this one took 12-20 us in both cases. A gloo barrier is a round trip over TCP loopback through
gloo's own I/O threads, so each one costs several thread wake-ups; here a rank writes one byte into each
peer's pipe and sleeps in the kernel until each peer's byte arrives.

How it works:

* Each ordered pair of ranks ``(a, b)`` has one FIFO (``os.mkfifo``), written by ``a`` and read by ``b``.
  At a barrier a rank first writes one byte to every peer, then reads one byte from every peer. Bytes
  from one writer arrive in order and each barrier adds exactly one per pair, so the ``k``-th byte a rank
  reads from a peer is that peer's arrival at barrier ``k``: no counting, no rounds to tell apart.
* The pipe's system calls take kernel locks on both sides, so what a rank wrote to shared memory before
  its barrier is visible to every peer after theirs, on any architecture.
* Set-up is collective over the group (three small gloo all-reduces): every rank creates the FIFOs it
  reads, opens them, then opens those it writes; once all are open the files are unlinked, so nothing
  stays in ``/dev/shm``. If any rank fails at any step, every rank gets ``None`` and keeps gloo's barrier.
* A peer that exits closes its end: the read sees end-of-file (or the write a broken pipe) and the barrier
  raises ``RuntimeError`` naming the rank. (Decode workers forked by a rank hold copies of its ends, so a
  dead rank is seen once its workers have gone too.) A peer that hangs is caught by the group's timeout,
  the same one gloo would apply.
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import Callable, Optional

import torch
import torch.distributed as dist

#: the byte a rank writes to each peer at each barrier
_ARRIVED = b"\x01"


class PipeBarrier:
    """A barrier over the ranks of one host: one FIFO per ordered pair of ranks (see the module doc)."""

    def __init__(self, rank: int, readers: dict[int, int], writers: dict[int, int], timeout_s: float) -> None:
        self.rank = rank
        self._readers = readers  # peer rank -> fd of the FIFO it writes to this rank
        self._writers = writers  # peer rank -> fd of the FIFO this rank writes to it
        self._polls: dict[int, select.poll] = {}
        for peer, fd in readers.items():
            self._polls[peer] = select.poll()
            self._polls[peer].register(fd, select.POLLIN)
        self.timeout_ms = max(1, int(timeout_s * 1000))

    def wait(self) -> None:
        """Return once every rank of the group has called ``wait`` as often as this one."""
        for peer, fd in self._writers.items():
            try:
                os.write(fd, _ARRIVED)
            except BrokenPipeError:
                raise RuntimeError(f"rank {peer} of the group has exited (rank {self.rank} was at a barrier)") from None
        for peer, fd in self._readers.items():
            self._read_one(peer, fd)

    def _read_one(self, peer: int, fd: int) -> None:
        while True:
            try:
                if os.read(fd, 1):
                    return
                raise RuntimeError(f"rank {peer} of the group has exited (rank {self.rank} was waiting for it at a barrier)")
            except BlockingIOError:
                if not self._polls[peer].poll(self.timeout_ms):
                    raise RuntimeError(
                        f"rank {peer} did not reach the barrier within {self.timeout_ms / 1000:.0f} s "
                        f"(the process group's timeout; rank {self.rank} was waiting)"
                    ) from None

    def close(self) -> None:
        for fd in [*self._readers.values(), *self._writers.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._readers, self._writers = {}, {}

    def __del__(self) -> None:
        self.close()


def connect(group: dist.ProcessGroup, directory: str, token: int) -> Optional[PipeBarrier]:
    """Set up a `PipeBarrier` for ``group`` (collectively), with FIFOs named after ``token`` (the same on every
    rank) in ``directory``; ``None`` on every rank if any rank could not."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    peers = [p for p in range(size) if p != rank]

    def path(writer: int, reader: int) -> str:
        return os.path.join(directory, f"tp-siglip-{token}-barrier-{writer}-{reader}")

    readers: dict[int, int] = {}
    writers: dict[int, int] = {}
    made: list[str] = []
    try:
        ok = _attempt(lambda: made.extend(_make_fifo(path(p, rank)) for p in peers))
        ok = _everyone(ok, group) and _attempt(lambda: readers.update((p, _open(path(p, rank), os.O_RDONLY)) for p in peers))
        ok = _everyone(ok, group) and _attempt(lambda: writers.update((p, _open(path(rank, p), os.O_WRONLY)) for p in peers))
        ok = _everyone(ok, group)
    finally:
        for name in made:  # every rank has opened its ends (or given up) once the last agreement is through
            os.unlink(name)
    barrier = PipeBarrier(rank, readers, writers, group_timeout_s(group))
    if not ok:
        barrier.close()
        return None
    return barrier


def group_timeout_s(group: dist.ProcessGroup) -> float:
    """The timeout ``group`` was made with (gloo's own), or ``TP_SIGLIP_PG_TIMEOUT_S`` (600 s) if it cannot be read."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return float(os.environ.get("TP_SIGLIP_PG_TIMEOUT_S", "600"))


def _make_fifo(name: str) -> str:
    os.mkfifo(name, 0o600)
    return name


def _open(name: str, mode: int) -> int:
    # non-blocking: opening the read end does not wait for a writer, and reads poll with a timeout;
    # a write end opens only once its reader has, which the agreement before it ensures
    return os.open(name, mode | os.O_NONBLOCK | os.O_CLOEXEC)


def _attempt(step: Callable[[], object]) -> bool:
    try:
        step()
        return True
    except OSError:
        return False


def _everyone(ok: bool, group: dist.ProcessGroup) -> bool:
    """Whether ``ok`` holds on every rank of ``group`` (one gloo all-reduce)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag[0])
