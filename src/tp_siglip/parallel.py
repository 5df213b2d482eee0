"""Tensor parallelism: how weights are split, the parallel linear layers, and every collective.

This is the only file that talks to ``torch.distributed``; the model code calls the layers and helpers
defined here and never reads a global process group.

Choices:

* **Shards follow attention heads and may be uneven.** ``H`` heads over ``W`` ranks give the first
  ``H % W`` ranks one extra head (16 over 3 = 6/5/5). A column-parallel layer keeps the output rows of
  its rank's heads; the row-parallel layer after it keeps the matching input columns and sums partial
  products with one all-reduce, which is exact whatever the shard sizes.
* **The MLP width is split as evenly as possible** (4304 over 3 = 1435/1435/1434), independently of the
  heads: any split is correct, and an even one keeps the slowest rank's share of the largest GEMMs small.
* **Bias once.** A row-parallel layer adds its (replicated) bias after the all-reduce, never per rank.
* **A batch may be split by rows** (`split_batch`, the model's ``batch_sizes``): Megatron-LM's sequence
  parallelism over images. Each rank holds its own images between the parallel layers, so what every
  rank would compute alike (embeddings, norms, residual adds) is computed once; a column-parallel layer
  gathers the rows first and a row-parallel one keeps its rows of the sum, so the GEMMs still see the
  whole batch and each row's arithmetic is the unsplit forward's. It is read from a context variable set for one forward
  (sizes only; the group is still each layer's own).
* **No group, or a group of one, means no communication** and the layers are plain ``nn.Linear`` math.
* **CPU ranks on one host sum through shared memory** (``shm_allreduce.py``), about 4x faster than
  gloo's loopback TCP for activation-sized tensors; other cases use the group's own all-reduce.
* **Groups the library creates** (only when launched by torchrun without a group) get
  ``DEFAULT_TIMEOUT`` and are destroyed at interpreter exit, followed by a garbage collection: gloo can
  abort a process at exit while a group it still references is alive.
* **Failures are shared, never left half-raised.** `agree_on_failure` (loading) and `agree_on_inputs`
  (every forward) each run one fixed-size all-gather of bytes (no pickling): every rank raises when any
  rank failed, and ranks that got different inputs all raise instead of hanging or computing garbage.
  A rank re-raises its own error from a frame that no longer holds it in a local, so no reference
  cycle (error -> traceback -> frame -> error) keeps the process group alive into interpreter exit.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import logging
import math
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tp_siglip import shm_allreduce

logger = logging.getLogger(__name__)

ProcessGroup = dist.ProcessGroup
#: Timeout of process groups this library creates; override with ``TP_SIGLIP_PG_TIMEOUT_S``.
DEFAULT_TIMEOUT = timedelta(seconds=float(os.environ.get("TP_SIGLIP_PG_TIMEOUT_S", "600")))
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- group helpers


def group_size(group: Optional[ProcessGroup]) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank inside ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


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


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum ``x`` over ``group``; the identity without one. Traceable by ``torch.compile``."""
    if group is None or group_size(group) == 1:
        return x
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(x, "sum", group)
    if x.device.type == "cpu" and x.is_contiguous() and shm_allreduce.enabled():
        reducer = shm_allreduce.for_group(group)
        if reducer is not None:
            return reducer(x)
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_gather_batch(
    x: torch.Tensor, sizes: Sequence[int], group: Optional[ProcessGroup], *, shared_memory: bool = False
) -> torch.Tensor:
    """Concatenate along dim 0 the local batches of every rank (rank ``r`` holds ``sizes[r]`` rows).

    ``shared_memory=True`` (a split batch's row gathers): CPU ranks of one host write their rows straight
    into the shared segment and copy everyone's out once (`SharedMemoryAllReduce.gather_in_place`)."""
    if group is None or group_size(group) == 1:
        return x
    if shared_memory and x.device.type == "cpu" and shm_allreduce.enabled() and not torch.compiler.is_compiling():
        reducer = shm_allreduce.for_group(group)
        if reducer is not None:
            x = x.contiguous()
            row_bytes = math.prod(x.shape[1:]) * x.element_size()
            mine = x.view(-1).view(torch.uint8)
            slots = reducer.gather_in_place(max(sizes) * row_bytes, lambda raw: raw[: len(mine)].copy_(mine))
            return torch.cat([slot[: n * row_bytes].view(x.dtype).view(n, *x.shape[1:]) for slot, n in zip(slots, sizes)])
    biggest = max(sizes)
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol

        gathered = funcol.all_gather_tensor(padded.contiguous(), 0, group)
    else:
        gathered = x.new_empty((biggest * len(sizes), *x.shape[1:]))
        all_gather_flat(gathered, padded.contiguous(), group)
    return torch.cat([gathered[r * biggest : r * biggest + n] for r, n in enumerate(sizes)])


# ----------------------------------------------------------------------------- a batch split by rows

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


def gather_rows(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Inside `split_batch`: every rank's rows of ``x`` (dim 0), in rank order; elsewhere ``x`` itself."""
    sizes = active_split()
    return x if sizes is None else all_gather_batch(x, sizes, group, shared_memory=True)


def sum_rows(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Inside `split_batch`: the sum of ``x`` over the group, this rank's rows only (a reduce-scatter);
    elsewhere the whole sum (`all_reduce_sum`)."""
    sizes = active_split()
    if sizes is None or group is None or group_size(group) == 1:
        return all_reduce_sum(x, group)
    x = x.contiguous()
    if x.device.type == "cpu" and shm_allreduce.enabled():
        reducer = shm_allreduce.for_group(group)
        if reducer is not None:
            return reducer.sum_rows(x, list(sizes))
    # elsewhere (NCCL, gloo across hosts): the whole sum, then this rank's rows. A reduce-scatter would move
    # half the bytes; it waits for a multi-GPU machine to be tested on
    first = sum(sizes[: group_rank(group)])
    return all_reduce_sum(x, group)[first : first + sizes[group_rank(group)]]


def all_gather_flat(out: torch.Tensor, mine: torch.Tensor, group: ProcessGroup, *, shared_memory: bool = False) -> None:
    """All-gather ``mine`` from every rank into ``out`` (rank order along dim 0).

    ``shared_memory=True`` goes through the same-host segment of
    `all_reduce_sum` for contiguous CPU tensors. The status exchanges stay on gloo's own all-gather: a
    distinct collective, so ranks that fall out of step fail loudly there instead of pairing one rank's
    gather with another's sum (both are a barrier in shared memory).
    """
    if shared_memory and mine.device.type == "cpu" and mine.is_contiguous() and out.is_contiguous() and shm_allreduce.enabled():
        reducer = shm_allreduce.for_group(group)
        if reducer is not None:
            reducer.all_gather(out, mine)
            return
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name, where present
    gather(out, mine, group=group)


def all_gather_bytes(
    nbytes: int, fill: Callable[[torch.Tensor], object], group: ProcessGroup, device: torch.device, *, shared_memory: bool = False
) -> list[torch.Tensor]:
    """All-gather ``nbytes`` bytes per rank, written by ``fill`` into a uint8 buffer (of stale bytes: ``fill``
    writes every byte it means); returns every rank's bytes as uint8 views, in rank order.

    With ``shared_memory=True`` on a CPU group of one host (the encode job's exchanges) this is
    `SharedMemoryAllReduce.gather_in_place`: ``fill`` writes into this rank's slot and the views are the
    slots themselves, one copy in all instead of three. Read them before this rank's next collective on
    ``group`` (or copy them). Elsewhere the views are of a fresh buffer, valid for as long as they live.
    """
    if shared_memory and device.type == "cpu" and shm_allreduce.enabled():
        reducer = shm_allreduce.for_group(group)
        if reducer is not None:
            return reducer.gather_in_place(nbytes, fill)
    mine = torch.empty(nbytes, dtype=torch.uint8, device=device)
    fill(mine)
    everyone = torch.empty(group_size(group) * nbytes, dtype=torch.uint8, device=device)
    all_gather_flat(everyone, mine, group)
    return list(everyone.view(group_size(group), nbytes))


def agree_on_failure(error: Optional[BaseException], group: Optional[ProcessGroup], device: torch.device) -> None:
    """Collective check-point: raise on every rank if ``error`` is set on any rank.

    Each rank contributes a status code and up to 1 KiB of its error message (UTF-8 bytes in a tensor; no
    pickling). A rank with its own error re-raises it; a healthy rank raises ``RuntimeError`` naming the
    rank that failed and why. Without a group it simply re-raises ``error``.
    """
    try:
        if group is None or group_size(group) == 1:
            if error is not None:
                raise error
            return
        message = "" if error is None else f"{type(error).__name__}: {error}"
        rows = exchange_status(group, error is not None, message, device)
        if error is not None:
            raise error
        failed = [r for r, (status, _) in enumerate(rows) if status]
        if failed:
            reasons = "; ".join(f"rank {r}: {rows[r][1]}" for r in failed)
            raise RuntimeError(
                f"loading failed on rank(s) {failed} of {len(rows)} (this is rank {group_rank(group)}): {reasons}"
            )
    finally:
        error = None  # the raised error's traceback holds this frame: a kept local would form a cycle


#: bytes each rank contributes to a status exchange (a status byte, then UTF-8 text)
STATUS_WIDTH = 1024


def exchange_status(
    group: ProcessGroup, failed: bool, text: str, device: torch.device, width: int = STATUS_WIDTH
) -> list[tuple[bool, str]]:
    """All-gather one ``(failed, text)`` pair per rank in one fixed-size collective; by rank.

    ``text`` (UTF-8) is cut to ``width - 1`` bytes. No pickling: the pairs travel as bytes in a tensor.
    """
    size = group_size(group)
    row = bytearray(width)
    row[0] = 1 if failed else 0
    data = text.encode()[: width - 1]
    row[1 : 1 + len(data)] = data
    mine = torch.frombuffer(row, dtype=torch.uint8).to(device)
    everyone = torch.empty(size * width, dtype=torch.uint8, device=device)
    all_gather_flat(everyone, mine, group)
    table = everyone.cpu().numpy().tobytes()
    rows = [table[r * width : (r + 1) * width] for r in range(size)]
    return [(row[0] != 0, row[1:].rstrip(b"\0").decode(errors="replace")) for row in rows]


# ----------------------------------------------------------------------------- input agreement

#: ``check_inputs_agree`` values: compare shapes, dtypes and flags (default); also compare a pixel checksum
AGREEMENT_MODES = ("shapes", "checksum")
_FIELD_SEPARATOR, _VALUE_SEPARATOR = "\n", "\t"


def agree_on_inputs(
    group: Optional[ProcessGroup], check: Callable[[], Mapping[str, Any]], *, mode: str = "shapes", rows_split: bool = False
) -> dict[str, Any]:
    """Run one forward's local input ``check`` and make sure every rank of ``group`` got the same inputs.

    ``check()`` validates this rank's inputs (raising ``TypeError``/``ValueError`` as usual) and returns
    them by name, normalised (``output_hidden_states=None`` -> ``False``). Its error is not raised at once:
    one fixed-size all-gather (`exchange_status`) shares every rank's verdict and an inputs signature
    (each tensor's shape and dtype, every other value's ``repr``; with ``mode="checksum"`` also a checksum
    of each tensor's bytes, see `tensor_checksum`). Then, if any rank failed its check, that rank raises its
    own error and every other rank a ``ValueError`` naming it; if the signatures differ, every rank raises
    a ``ValueError`` naming what differs on which ranks. Returns ``check()``'s inputs.

    Without a group, with a group of one or inside ``torch.compile`` it only runs ``check()`` (raising at
    once): a compiled graph cannot branch on what the other ranks sent. ``rows_split``: each rank passes
    its own rows of a batch (`split_batch`), so tensors' first dimensions and checksums are not compared.
    """
    if torch.compiler.is_compiling() or group is None or group_size(group) == 1:
        _check_mode(mode)
        return dict(check())
    inputs: dict[str, Any] = {}
    error: Optional[BaseException] = None
    text = ""
    try:
        _check_mode(mode)
        inputs = dict(check())
        text = input_signature(inputs, checksum=mode == "checksum" and not rows_split, rows_split=rows_split)
    except Exception as err:  # shared with every rank below, then raised here
        error = err
        text = f"{type(err).__name__}: {err}"
    try:
        verdict = _input_verdict(exchange_status(group, error is not None, text, collective_device(group)), group)
        if error is not None:
            raise error
        if verdict:
            raise ValueError(verdict)
    finally:
        error = None  # the raised error's traceback holds this frame: a kept local would form a cycle
    return inputs


def _check_mode(mode: object) -> None:
    if mode not in AGREEMENT_MODES:
        raise ValueError(f"check_inputs_agree {mode!r} is not one of {list(AGREEMENT_MODES)}")


def input_signature(inputs: Mapping[str, Any], *, checksum: bool = False, rows_split: bool = False) -> str:
    """What ranks compare: one ``field<TAB>value`` line per field of ``inputs``.

    A tensor ``x`` gives fields ``x shape`` and ``x dtype`` (and with ``checksum`` ``x checksum``, its
    `tensor_checksum`), anything else its ``repr``; with ``rows_split`` a tensor's first dimension reads
    ``rows``. Text too long for a status row keeps its first whole
    fields and ends with a ``signature digest`` field computed over all of them.
    """
    fields = []
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            shape = ("rows", *value.shape[1:]) if rows_split and value.dim() else tuple(value.shape)
            fields.append((f"{name} shape", str(shape)))
            fields.append((f"{name} dtype", str(value.dtype)))
            if checksum:
                fields.append((f"{name} checksum", str(tensor_checksum(value))))
        else:
            fields.append((name, repr(value)))
    lines = [f"{k}{_VALUE_SEPARATOR}{v}".replace(_FIELD_SEPARATOR, " ") for k, v in fields]
    text = _FIELD_SEPARATOR.join(lines)
    if len(text.encode()) <= STATUS_WIDTH - 1:
        return text
    # too long for a row: keep the first whole fields, and a digest that sees all of them
    digest = f"signature digest{_VALUE_SEPARATOR}{hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}"
    kept, used = [], len(digest) + 1
    for line in lines:
        used += len(line.encode()) + 1
        if used > STATUS_WIDTH - 1:
            break
        kept.append(line)
    return _FIELD_SEPARATOR.join([*kept, digest])


def tensor_checksum(x: torch.Tensor) -> int:
    """An exact checksum of ``x``'s bytes that also sees the order of its rows (images).

    Each row ``x[i]`` is read as 32-bit integers (bytes when its size is not a multiple of 4) and summed
    modulo 2**32 (a wrapping sum: vectorised, about as fast as ``x.sum()``); the row sums are weighted by
    ``i + 1``. Integer sums do not depend on the order of summation, so equal tensors give equal
    checksums on any device and thread count. Any single changed element, or two swapped images, changes
    it; a reordering of values inside one image does not. Reads the whole tensor (one device sync).
    """
    if x.numel() == 0:
        return 0
    rows = x.detach().contiguous().reshape(x.shape[0] if x.dim() else 1, -1).view(torch.uint8)
    if rows.shape[1] % 4 == 0:
        sums = rows.view(torch.int32).sum(dim=1, dtype=torch.int32)  # wraps around: exact modulo 2**32
    else:
        sums = rows.sum(dim=1, dtype=torch.int64)
    return sum((i + 1) * (int(s) % 2**32) for i, s in enumerate(sums.tolist())) % 2**64


def _input_verdict(rows: list[tuple[bool, str]], group: ProcessGroup) -> str:
    """The error message for this rank given every rank's ``(failed, text)``; ``""`` when all agree."""
    size, rank = len(rows), group_rank(group)
    where = f"(this is rank {rank} of {size}); every rank must pass the same, valid inputs"
    failed = [r for r, (bad, _) in enumerate(rows) if bad]
    if failed:
        reasons = "; ".join(f"rank {r}: {rows[r][1]}" for r in failed)
        return f"the input check failed on rank(s) {failed} {where}: {reasons}"
    if all(text == rows[0][1] for _, text in rows):
        return ""
    tables = [dict((*f.split(_VALUE_SEPARATOR, 1), "")[:2] for f in text.split(_FIELD_SEPARATOR)) for _, text in rows]
    names = list(dict.fromkeys(name for table in tables for name in table))
    problems = []
    for name in names:
        values = [table.get(name, "<not given>") for table in tables]
        if len(set(values)) > 1:
            by_value: dict[str, list[int]] = {}
            for r, value in enumerate(values):
                by_value.setdefault(value, []).append(r)
            ranks = ", ".join(
                f"{'rank' if len(rs) == 1 else 'ranks'} {rs[0] if len(rs) == 1 else rs} {value}"
                for value, rs in by_value.items()
            )
            problems.append(f"{name} differs across ranks: {ranks}")
    return f"{'; '.join(problems)} {where}"


# ----------------------------------------------------------------------------- group resolution


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


def collective_device(group: Optional[ProcessGroup]) -> torch.device:
    """The device a collective on ``group`` needs its tensors on (CUDA for NCCL, else the CPU)."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_default_group(backend: Optional[str] = None) -> ProcessGroup:
    """Initialise the default group from torchrun's variables; destroyed again at interpreter exit."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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


# ----------------------------------------------------------------------------- layers


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
        self.group = group if group_size(group) > 1 else None
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
            x = gather_rows(x, self.group)
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
        self.group = group if group_size(group) > 1 else None  # a group of one needs no all-reduce
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
        if self.group is None:
            return F.linear(x, self.weight, self.bias)
        y = sum_rows(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, in_range={self.in_range}"


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
    """The group a model is sharded over, and which heads and MLP columns this rank owns."""

    group: Optional[ProcessGroup]
    world_size: int
    rank: int
    num_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def for_group(cls, group: Optional[ProcessGroup], num_heads: int, head_dim: int, intermediate_size: int):
        size = group_size(group)
        if size > num_heads:
            raise ValueError(
                f"world_size {size} is larger than num_attention_heads {num_heads}: every rank needs at "
                f"least one head; use at most {num_heads} ranks"
            )
        return cls(group, size, group_rank(group), num_heads, head_dim, intermediate_size)

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
