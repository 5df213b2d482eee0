"""The collectives of one process group, as the model's parallel layers use them.

One `Communicator` per group, chosen once when the group is first used (`groups.communicator_for`); the
layers call ``comm.all_reduce(x)``, ``comm.all_gather_rows(x, sizes)`` and ``comm.reduce_scatter_rows(x,
sizes)`` and never see the transport. This is the only file that branches on it:

* `Communicator` talks ``torch.distributed``: NCCL on GPUs, gloo across hosts. A split batch's row-parallel
  sums are a real reduce-scatter (rows padded to equal counts), so an all-gather before a column-parallel
  layer and a reduce-scatter after the row-parallel one move the bytes of one all-reduce, as in
  Megatron-LM's sequence parallelism.
* `SharedMemoryCommunicator` serves CPU ranks of one host through a shared segment (``shm_allreduce``),
  several times faster than gloo's TCP loopback.
* `FunctionalCommunicator` is what either becomes inside ``torch.compile``: functional collectives, which a
  graph can trace.

Everything here moves activations only; bookkeeping (input agreement, failures, status) travels on the CPU
side group (`groups.side_group`), never on a device group.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tp_siglip import shm_allreduce

ProcessGroup = dist.ProcessGroup


def all_gather_into(out: torch.Tensor, mine: torch.Tensor, group: ProcessGroup) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name where present
    gather(out, mine, group=group)


def _reduce_scatter_into(out: torch.Tensor, full: torch.Tensor, group: ProcessGroup) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, full, group=group)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` (``x`` itself when it has them)."""
    if x.shape[0] == rows:
        return x.contiguous()
    padded = x.new_zeros((rows, *x.shape[1:]))
    padded[: x.shape[0]] = x
    return padded


def unpad_rows(gathered: torch.Tensor, sizes: Sequence[int], cap: int) -> torch.Tensor:
    """The real rows of ``gathered`` (rank ``r``'s ``sizes[r]`` rows at ``r * cap``), in rank order."""
    if all(n == cap for n in sizes):
        return gathered
    return torch.cat([gathered[r * cap : r * cap + n] for r, n in enumerate(sizes)])


class Communicator:
    """Collectives of one group over ``torch.distributed`` (NCCL, or gloo across hosts)."""

    kind = "torch.distributed"

    def __init__(self, group: ProcessGroup) -> None:
        # a weak reference: a group kept alive past destroy_process_group can make gloo abort at exit
        self._group = weakref.ref(group)
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._traced = FunctionalCommunicator(group) if type(self) is not FunctionalCommunicator else None

    @property
    def group(self) -> ProcessGroup:
        group = self._group()
        if group is None:
            raise RuntimeError("the process group of this communicator no longer exists")
        return group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the group (in place where the transport allows)."""
        if self._traced is not None and torch.compiler.is_compiling():
            return self._traced.all_reduce(x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_gather_rows(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Every rank's rows of ``x`` (rank ``r`` holds ``sizes[r]``), concatenated in rank order."""
        if self._traced is not None and torch.compiler.is_compiling():
            return self._traced.all_gather_rows(x, sizes)
        cap = max(sizes)
        gathered = x.new_empty((cap * self.size, *x.shape[1:]))
        all_gather_into(gathered, pad_rows(x, cap), self.group)
        return unpad_rows(gathered, sizes, cap)

    def reduce_scatter_rows(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """This rank's rows of the sum of ``x`` over the group (``x`` holds every rank's rows, in rank order)."""
        if self._traced is not None and torch.compiler.is_compiling():
            return self._traced.reduce_scatter_rows(x, sizes)
        cap = max(sizes)
        if any(n != cap for n in sizes):  # rank r's rows go to r * cap, zeros after them
            blocks = x.split(list(sizes))
            x = torch.cat([pad_rows(block, cap) for block in blocks])
        out = x.new_empty((cap, *x.shape[1:]))
        _reduce_scatter_into(out, x.contiguous(), self.group)
        return out[: sizes[self.rank]]


class FunctionalCommunicator(Communicator):
    """The same collectives as functional ones, which ``torch.compile`` traces into its graph."""

    kind = "functional"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", self.group)

    def all_gather_rows(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol

        cap = max(sizes)
        return unpad_rows(funcol.all_gather_tensor(pad_rows(x, cap), 0, self.group), sizes, cap)

    def reduce_scatter_rows(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol

        cap = max(sizes)
        x = torch.cat([pad_rows(block, cap) for block in x.split(list(sizes))])
        return funcol.reduce_scatter_tensor(x, "sum", 0, self.group)[: sizes[self.rank]]


class SharedMemoryCommunicator(Communicator):
    """CPU ranks of one host: sums, gathers and reduce-scatters through one shared segment.

    The segment is set up at the group's first collective (every rank reaches it together), not when the
    communicator is made; if any rank cannot map it (ranks on several hosts), every rank keeps
    ``torch.distributed`` from then on.
    """

    kind = "shared memory"

    def __init__(self, group: ProcessGroup) -> None:
        super().__init__(group)
        self._reducer: Optional[shm_allreduce.SharedMemoryAllReduce] = None
        self._decided = False

    def _direct(self, x: torch.Tensor) -> Optional[shm_allreduce.SharedMemoryAllReduce]:
        """The segment, for a CPU tensor outside ``torch.compile``; ``None``: use ``torch.distributed``."""
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        if not self._decided:
            self._reducer, self._decided = shm_allreduce.for_group(self.group), True
        return self._reducer

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        reducer = self._direct(x)
        if reducer is None or not x.is_contiguous():
            return super().all_reduce(x)
        return reducer(x)

    def all_gather_rows(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        reducer = self._direct(x)
        if reducer is None:
            return super().all_gather_rows(x, sizes)
        x = x.contiguous()
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        mine = x.view(-1).view(torch.uint8)
        slots = reducer.gather_in_place(max(sizes) * row_bytes, lambda raw: raw[: len(mine)].copy_(mine))
        return torch.cat([slot[: n * row_bytes].view(x.dtype).view(n, *x.shape[1:]) for slot, n in zip(slots, sizes)])

    def reduce_scatter_rows(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        reducer = self._direct(x)
        if reducer is None:
            return super().reduce_scatter_rows(x, sizes)
        return reducer.sum_rows(x.contiguous(), list(sizes))


def make_communicator(group: ProcessGroup) -> Communicator:
    """The communicator for ``group``: shared memory for a gloo group (when enabled; it falls back by itself
    across hosts), else ``torch.distributed``. Runs no collective."""
    if dist.get_backend(group) == "gloo" and shm_allreduce.enabled():
        return SharedMemoryCommunicator(group)
    return Communicator(group)


__all__ = ["Communicator", "FunctionalCommunicator", "SharedMemoryCommunicator", "make_communicator", "pad_rows", "unpad_rows"]
