"""How the ranks of ``tp-siglip encode`` stay in lockstep: the same shards, the same batches, one decode per image.

A few collectives, each giving the same answer on every rank, all on the CPU side group (never NCCL):
`agree_on_shards`, `broadcast_from_rank0`, `collect_rows` (one all-gather per batch of every rank's status
and stored rows) and `gather_reasons`. Why: docs/encode-design.md#lockstep.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from tp_siglip.parallel import all_gather_bytes
from tp_siglip.parallel.exchange import read_status, status_row

__all__ = [
    "CollectedRows",
    "RanksDisagree",
    "agree_on_checks",
    "agree_on_max",
    "agree_on_shards",
    "agree_on_weights",
    "broadcast_from_rank0",
    "collect_rows",
    "form_groups",
    "gather_counts",
    "gather_reasons",
]

#: bytes of a portion's status: a flag, then UTF-8 text (what failed)
STATUS_BYTES = 512


class RanksDisagree(RuntimeError):
    """The ranks do not see the same files."""


def _distributed() -> bool:
    """Whether there is a default group of several ranks to agree with."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def this_rank() -> str:
    """This rank, its node (torchrun's ``GROUP_RANK``) and host, as errors name it."""
    rank = dist.get_rank() if _distributed() else 0
    return f"rank {rank} (node {os.environ.get('GROUP_RANK', '0')}, host {socket.gethostname()})"


def agree_on_checks(failure: Optional[str]) -> Optional[str]:
    """Every rank's ``failure`` of its own checks (None: passed) reaches every rank of the default group; returns
    another rank's failure, naming that rank and its node (None: every other rank passed). So a check that fails on
    one node only (a path missing there) stops the other nodes at once, instead of at the group's timeout."""
    if not _distributed():
        return None
    gathered = _gather_json([this_rank(), failure], dist.group.WORLD)
    others = [f"{where}: {text}" for rank, (where, text) in enumerate(gathered) if text is not None and rank != dist.get_rank()]
    return f"{others[0]} (this is {this_rank()})" if others else None


def agree_on_shards(shards: Sequence[Any]) -> None:
    """Check that every rank found the same shards (``shards``: JSON-able, one entry per shard); raise
    `RanksDisagree` on every rank when they differ."""
    if not _distributed():
        return
    digest = hashlib.blake2b(json.dumps(list(shards)).encode(), digest_size=16).hexdigest()
    gathered = _gather_json([this_rank(), digest, len(shards)], dist.group.WORLD)
    other = next((entry for entry in gathered if entry[1] != gathered[0][1]), None)
    if other is not None:
        raise RanksDisagree(
            f"the ranks list different image files: {other[0]} found {other[2]} shard(s), rank 0 {gathered[0][2]}, "
            "or other files in them; every rank must see the same files (same inputs, same working directory)"
        )


@dataclass
class CollectedRows:
    """What :func:`collect_rows` returns: every rank's rows, in group-rank order, and each rank's failure.

    ``parts[name][r]`` is rank ``r``'s rows of ``name``. Over a same-host CPU group they are views of the
    exchange's shared memory: read them before the next collective on the group (`rows` copies them).
    """

    parts: dict[str, list[torch.Tensor]]
    failures: list[Optional[str]]

    def rows(self, name: str) -> torch.Tensor:
        """Every rank's rows of ``name``, one tensor (a copy, unless there is only one rank's)."""
        parts = self.parts[name]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def collect_rows(
    rows: Optional[Mapping[str, torch.Tensor]],
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    sizes: Sequence[int],
    failure: Optional[str],
    group: Any,
) -> CollectedRows:
    """All-gather each rank's portion of a batch over ``group`` (the ranks that deal it out; ``None`` for one
    process) in one collective: its status (``failure``: why it has no portion, e.g. a dead decode worker) and
    its ``rows`` (``None`` after a failure: zeros), ``sizes[rank]`` of each name in ``specs`` (one row's shape
    and dtype). ``specs`` and ``sizes`` (every rank's row count) are the same on every rank."""
    if group is None or dist.get_world_size(group) == 1:
        return CollectedRows({name: [rows[name]] for name in specs} if rows is not None else {}, [failure])
    cap, own = max(sizes), sizes[dist.get_rank(group)]
    offsets, width = {}, STATUS_BYTES  # each section 8-byte aligned, so that it can be viewed in its dtype
    for name, (shape, dtype) in specs.items():
        size = cap * math.prod(shape) * dtype.itemsize
        offsets[name], width = width, width + size + (-size % 8)

    def section(buffer: torch.Tensor, name: str) -> torch.Tensor:
        shape, dtype = specs[name]
        start = offsets[name]
        return buffer[start : start + cap * math.prod(shape) * dtype.itemsize].view(dtype).view(cap, *shape)

    def fill(mine: torch.Tensor) -> None:  # every byte that any rank reads: the status and this rank's rows
        status = status_row(failure is not None, failure or "", STATUS_BYTES)
        mine[:STATUS_BYTES] = torch.frombuffer(bytearray(status), dtype=torch.uint8)
        for name in specs:
            if rows is None:
                section(mine, name)[:own].zero_()
            else:
                section(mine, name)[:own].copy_(rows[name], non_blocking=True)

    # same-host CPU ranks: each writes its portion into shared memory and reads the others' where they lie
    everyone = all_gather_bytes(width, fill, group, shared_memory=True)  # on the group's CPU side group
    statuses = [read_status(buffer[:STATUS_BYTES].numpy().tobytes()) for buffer in everyone]
    parts = {name: [section(buffer, name)[:size] for buffer, size in zip(everyone, sizes)] for name in specs}
    return CollectedRows(parts, [text if failed else None for failed, text in statuses])


def gather_counts(count: int, group: Any) -> list[int]:
    """Every rank's ``count``, in group-rank order (one small all-gather; ``[count]`` without a group)."""
    size = 1 if group is None else dist.get_world_size(group)
    return collect_rows({"n": torch.tensor([count])}, {"n": ((), torch.int64)}, [1] * size, None, group).rows("n").tolist()


def gather_reasons(reasons: list[Optional[str]], group: Any) -> list[Optional[str]]:
    """Every rank's per-image reasons, concatenated in group-rank order (call only when some image failed)."""
    if group is None or dist.get_world_size(group) == 1:
        return list(reasons)
    return [reason for portion in _gather_json(list(reasons), group) for reason in portion]


def _gather_json(value: Any, group: Any) -> list[Any]:
    """Every rank's ``value`` (JSON: strings, numbers, lists, None) in group-rank order, on the group's side
    group: the lengths first, then the UTF-8 texts. No pickling."""
    data = json.dumps(value).encode()  # never empty
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    lengths = all_gather_bytes(8, lambda raw: raw.view(torch.int64).fill_(len(data)), group)
    sizes = [int(part.view(torch.int64)) for part in lengths]
    texts = all_gather_bytes(max(sizes), lambda raw: raw.zero_()[: len(data)].copy_(payload), group)
    return [json.loads(part[:n].numpy().tobytes()) for part, n in zip(texts, sizes)]


def agree_on_weights(model: torch.nn.Module, ranks_per_group: int, model_name: str) -> None:
    """Raise `RanksDisagree` on every rank unless the ranks at the same place in their groups hold the same
    weights (16 values of each tensor, compared bit for bit): a node whose copy of the checkpoint differs (not
    synced yet, another Hub commit in its cache) would quietly encode its shards with other weights."""
    if not _distributed():
        return
    samples = []
    for _, tensor in sorted(model.named_parameters()):
        flat = tensor.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // 16)][:16].contiguous().view(torch.uint8).reshape(-1))
    digest = hashlib.blake2b(torch.cat(samples).cpu().numpy().tobytes(), digest_size=16).hexdigest()
    gathered = _gather_json([this_rank(), digest], dist.group.WORLD)
    for rank, (where, mine) in enumerate(gathered):
        first, theirs = gathered[rank % ranks_per_group]
        if mine != theirs:
            raise RanksDisagree(f"{where} loaded other weights from --model {model_name} than {first}: every node must "
                                "see the same checkpoint (a copy not yet synced, or another Hub commit in a node's cache)")


def agree_on_max(value: int) -> int:
    """The largest ``value`` of all ranks of the default group; ``value`` without one."""
    return max(_gather_json(value, dist.group.WORLD)) if _distributed() else value


def form_groups(ranks_per_group: int) -> tuple[Any, int, int]:
    """Cut the default group into groups of ``ranks_per_group`` consecutive ranks (every rank must call this).

    Returns ``(this rank's group, its index, the number of groups)``; ``(None, 0, 1)`` without a default group.
    Groups of one rank are real groups too, so a model built on one never falls back to the default group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    world, rank = dist.get_world_size(), dist.get_rank()
    if ranks_per_group < 1 or world % ranks_per_group:
        raise ValueError(f"--tp {ranks_per_group} does not divide the {world} ranks; pick a divisor of {world}")
    count = world // ranks_per_group
    if count == 1:
        return dist.group.WORLD, 0, 1
    groups = [dist.new_group(list(range(g * ranks_per_group, (g + 1) * ranks_per_group))) for g in range(count)]
    return groups[rank // ranks_per_group], rank // ranks_per_group, count


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (JSON: strings, numbers, lists, None; a tuple comes back as a list) on every rank of
    the default group, through its side group; ``value`` without one. No pickling."""
    return _gather_json(value if dist.get_rank() == 0 else None, dist.group.WORLD)[0] if _distributed() else value
