"""What a forward asks of the transport and of the host: every collective with its group and bytes, and
every op that would make a CUDA device wait for the host.

* `CollectiveLog` wraps ``torch.distributed``'s collectives for as long as it is entered and records each
  call: its name, its group (``None`` reads as the default group) and the bytes of its tensor (an
  all-gather's output, a reduce-scatter's input, an all-reduce's tensor). `ring_bytes` turns a record into
  the bytes one rank sends on a ring, NCCL's usual algorithm: an all-reduce of ``S`` bytes sends
  ``2 (n-1)/n S``, an all-gather or reduce-scatter of ``S`` sends ``(n-1)/n S``.
* `SyncOpLog` is a ``TorchDispatchMode`` that records the ops ``torch.cuda.set_sync_debug_mode("error")``
  would refuse on a GPU: reading a scalar (``.item()``, ``bool(tensor)``), ``nonzero``, boolean-mask
  selection, ``torch.equal``. A forward that records none of them on the CPU has none on a GPU.

The tests (``tests/test_gpu_path.py``), ``benchmarks/collectives.py`` and the GPU check use both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

#: the ops that synchronise a CUDA device with the host (what set_sync_debug_mode("error") raises on)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal")

#: collective name -> (index of the tensor whose bytes count, kind for `ring_bytes`)
_COLLECTIVES = {
    "all_reduce": (0, "all_reduce"),
    "all_gather_into_tensor": (0, "all_gather"),
    "all_gather_single": (0, "all_gather"),
    "reduce_scatter_tensor": (1, "reduce_scatter"),
    "reduce_scatter_single": (1, "reduce_scatter"),
    "broadcast": (0, "broadcast"),
    "all_gather": (1, "all_gather"),
    "reduce_scatter": (0, "reduce_scatter"),
    "all_to_all_single": (0, "all_to_all"),
    "barrier": (None, "barrier"),
    "all_gather_object": (None, "object"),
    "broadcast_object_list": (None, "object"),
}


@dataclass(frozen=True)
class Call:
    """One collective call: its kind, its group (``None``: the default group), the bytes it carried and
    whether they were floating point (activations) or not (bookkeeping: status bytes, flags, counts)."""

    kind: str
    group: Any
    nbytes: int
    floating: bool = False

    def on(self, group: Any) -> bool:
        """Whether the call ran on ``group`` (the default group counts as ``dist.group.WORLD``)."""
        mine = dist.group.WORLD if self.group is None else self.group
        return mine is group


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveLog:
    """Records every ``torch.distributed`` collective made while entered (see the module docstring)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CollectiveLog:
        for name, (index, kind) in _COLLECTIVES.items():
            original = getattr(dist, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(dist, name, self._wrap(original, index, kind))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()

    def _wrap(self, original: Any, index: Optional[int], kind: str) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tensor = args[index] if index is not None and len(args) > index else None
            floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            self.calls.append(Call(kind, kwargs.get("group"), _nbytes(tensor), floating))
            return original(*args, **kwargs)

        return wrapped

    def on(self, group: Any) -> list[Call]:
        """The calls made on ``group``."""
        return [c for c in self.calls if c.on(group)]


def ring_bytes(call: Call, ranks: int) -> float:
    """Bytes one rank sends for ``call`` on a ring of ``ranks``."""
    share = (ranks - 1) / ranks * call.nbytes
    return 2 * share if call.kind == "all_reduce" else share


class SyncOpLog(TorchDispatchMode):
    """Records the host-sync ops (`SYNC_OPS`) that run while entered, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
