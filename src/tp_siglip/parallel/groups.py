"""Process groups: which group a model runs on, the CPU side group made beside it, and its communicator.

* `resolve_group` picks the group (the given one, the default one, or a new default group from torchrun's
  variables). Groups the library creates get ``DEFAULT_TIMEOUT`` and are destroyed at interpreter exit,
  followed by a garbage collection: gloo can abort a process at exit while a group it still references
  is alive.
* `communicator_for` gives each group one `Communicator`, chosen once (shared memory for a gloo group on
  one host, ``torch.distributed`` otherwise); the parallel layers talk through it.
* `side_group` gives each group a gloo group over the same ranks, for bookkeeping: input agreement,
  failures, status and the encode job's metadata. It is made even when the group itself is gloo, so a CPU
  run has the structure a GPU run has, and nothing but activations ever rides on a device group (on
  NCCL, a read of bookkeeping would wait for every queued kernel). It takes its group's timeout, is made
  by the group's ranks alone (``use_local_synchronization``) and is destroyed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import weakref
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from tp_siglip.parallel.communicator import Communicator, make_communicator

logger = logging.getLogger(__name__)

ProcessGroup = dist.ProcessGroup
#: Timeout of process groups this library creates; override with ``TP_SIGLIP_PG_TIMEOUT_S``.
DEFAULT_TIMEOUT = timedelta(seconds=float(os.environ.get("TP_SIGLIP_PG_TIMEOUT_S", "600")))
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def group_size(group: Optional[ProcessGroup]) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank inside ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def resolve_group(
    world_size: Optional[int],
    process_group: Optional[ProcessGroup],
    *,
    backend: Optional[str] = None,
) -> Optional[ProcessGroup]:
    """Pick the process group for a model of ``world_size`` ranks (see ``from_pretrained``).

    Order: the given group; else the default group when one exists; else, when ``world_size > 1`` and
    torchrun's variables are set, a new default group (gloo on CPU, NCCL with CUDA). Returns ``None``
    for a single rank without any group. ``world_size`` must match the group's size (that it does not
    exceed the head count is checked by `TensorParallelPlan`).
    """
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)):
        raise TypeError(f"world_size must be an int, got {world_size!r}")
    if world_size is not None and world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if process_group is not None and not isinstance(process_group, ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")

    group: Optional[ProcessGroup]
    if process_group is not None:
        group = process_group
    elif dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    elif world_size is not None and world_size > 1:
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"world_size={world_size} needs {world_size} processes, but no process group exists and the "
                f"launch variables {missing} are not set; launch with "
                f"`torchrun --nproc-per-node {world_size} your_script.py` or pass process_group="
            )
        env_size = int(os.environ["WORLD_SIZE"])
        if env_size != world_size:
            raise ValueError(
                f"world_size={world_size} but torchrun started WORLD_SIZE={env_size} processes; "
                f"pass world_size={env_size} or launch with --nproc-per-node {world_size}"
            )
        group = init_default_group(backend)
    else:
        group = None

    size = group_size(group)
    if world_size is not None and world_size != size:
        raise ValueError(
            f"world_size={world_size} but the process group has {size} ranks; pass world_size={size}, or "
            f"a process_group of {world_size} ranks (torch.distributed.new_group)"
        )
    if size == 1 and process_group is None:
        return None  # a single rank needs no group; a caller's own group of one is kept as given
    return group


def backend_for(device: Optional[torch.device | str]) -> str:
    """The backend of a default group for a model on ``device``: NCCL for a GPU, gloo otherwise (an NCCL group
    cannot carry CPU tensors). ``None``: the default device's (a GPU when CUDA is available)."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_gpu() -> int:
    """This rank's GPU: ``LOCAL_RANK`` modulo the GPUs this process sees (a launcher that gives each process its
    own GPU through ``CUDA_VISIBLE_DEVICES`` leaves ``LOCAL_RANK`` past the one it sees); without
    ``LOCAL_RANK``, the current GPU."""
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return torch.cuda.current_device()
    count = torch.cuda.device_count()
    return int(local) % count if count else int(local)


def init_default_group(backend: Optional[str] = None) -> ProcessGroup:
    """Initialise the default group from torchrun's variables (``backend`` default: `backend_for` the default
    device); destroyed again at interpreter exit."""
    if backend is None:
        backend = backend_for(None)
    if backend == "nccl":
        torch.cuda.set_device(local_gpu())
    dist.init_process_group(backend=backend, timeout=DEFAULT_TIMEOUT)
    logger.info(
        "initialised the default process group: backend=%s, rank %d of %d, timeout %ss",
        backend,
        dist.get_rank(),
        dist.get_world_size(),
        DEFAULT_TIMEOUT.total_seconds(),
    )
    atexit.register(_destroy_default_group)
    return dist.group.WORLD


def _destroy_default_group() -> None:
    """atexit hook: destroy the group, then free any garbage cycle still holding it (while Python is whole)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


# ----------------------------------------------------------------------------- communicators and side groups

_COMMUNICATORS: weakref.WeakKeyDictionary[ProcessGroup, Communicator] = weakref.WeakKeyDictionary()
_SIDE_GROUPS: weakref.WeakKeyDictionary[ProcessGroup, ProcessGroup] = weakref.WeakKeyDictionary()
#: side groups by their ranks, per default group (a new default group starts afresh)
_SIDE_BY_RANKS: weakref.WeakKeyDictionary[ProcessGroup, dict[tuple[int, ...], ProcessGroup]] = weakref.WeakKeyDictionary()
_MADE_SIDE_GROUPS: list[weakref.ref[ProcessGroup]] = []


def communicator_for(group: Optional[ProcessGroup]) -> Optional[Communicator]:
    """The one communicator of ``group`` (made on first call, without a collective: whatever it sets up
    waits for the group's first collective); ``None`` for no group or one rank."""
    if group is None or group_size(group) == 1:
        return None
    if group not in _COMMUNICATORS:
        _COMMUNICATORS[group] = make_communicator(group)
        logger.debug("communicator for a group of %d ranks: %s", group_size(group), _COMMUNICATORS[group].kind)
    return _COMMUNICATORS[group]


def group_timeout(group: ProcessGroup) -> timedelta:
    """The timeout ``group``'s collectives run under (``DEFAULT_TIMEOUT`` where torch does not say)."""
    device = torch.device("cuda") if dist.get_backend(group) == "nccl" else torch.device("cpu")
    try:
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return DEFAULT_TIMEOUT


def side_group(group: ProcessGroup) -> ProcessGroup:
    """A gloo group over ``group``'s ranks for bookkeeping (cached). Made at the first exchange on it, which
    every rank of ``group`` reaches at the same point: loading's failure agreement, or a forward's input
    agreement, both before any collective on ``group`` itself. Groups over the same ranks share one side
    group (torch names a group made by its own ranks after those ranks)."""
    side = _SIDE_GROUPS.get(group)
    if side is None:
        ranks = tuple(dist.get_process_group_ranks(group))
        by_ranks = _SIDE_BY_RANKS.setdefault(dist.group.WORLD, {})
        side = by_ranks.get(ranks)
        if side is None:
            side = dist.new_group(list(ranks), backend="gloo", timeout=group_timeout(group), use_local_synchronization=True)
            by_ranks[ranks] = side
            if not _MADE_SIDE_GROUPS:
                atexit.register(_destroy_side_groups)
            _MADE_SIDE_GROUPS.append(weakref.ref(side))
        _SIDE_GROUPS[group] = side
    return side


def _destroy_side_groups() -> None:
    """atexit hook: destroy the side groups still alive (before the default group's own hook runs)."""
    for ref in _MADE_SIDE_GROUPS:
        side = ref()
        if side is not None and dist.is_available() and dist.is_initialized():
            with contextlib.suppress(RuntimeError, ValueError):  # already gone with its default group
                dist.destroy_process_group(side)
    _MADE_SIDE_GROUPS.clear()
    gc.collect()
