"""Byte exchanges on a group's CPU side group: the status rows of the agreements, and the encode job's rows.

Nothing here touches a device group or reads a device tensor back: every buffer is a CPU tensor on the
gloo side group (`groups.side_group`), read as bytes. Ranks of one host may exchange through shared
memory (``shared_memory=True``: each rank writes its bytes into its slot and reads the others' where they
lie); elsewhere gloo's all-gather carries them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from tp_siglip import shm_allreduce
from tp_siglip.parallel.communicator import all_gather_into
from tp_siglip.parallel.groups import ProcessGroup, side_group

#: bytes each rank contributes to a status exchange (a status byte, then UTF-8 text)
STATUS_WIDTH = 1024


def status_row(failed: bool, text: str, width: int = STATUS_WIDTH) -> bytes:
    """One rank's status as ``width`` bytes: a flag byte, then ``text`` in UTF-8 (cut to fit), then zeros."""
    data = text.encode()[: width - 1]
    return bytes([1 if failed else 0]) + data + bytes(width - 1 - len(data))


def read_status(row: bytes) -> tuple[bool, str]:
    """``(failed, text)`` from a `status_row`."""
    return row[0] != 0, row[1:].rstrip(b"\0").decode(errors="replace")


def exchange_status(group: ProcessGroup, failed: bool, text: str, width: int = STATUS_WIDTH) -> list[tuple[bool, str]]:
    """All-gather one ``(failed, text)`` pair per rank in one fixed-size collective on ``group``'s CPU side
    group; by rank. ``text`` (UTF-8) is cut to ``width - 1`` bytes. No pickling, and no device tensor: the
    pairs travel as bytes in CPU tensors and are read back as bytes."""
    side = side_group(group)
    size = dist.get_world_size(side)
    everyone = torch.empty(size * width, dtype=torch.uint8)
    all_gather_into(everyone, torch.frombuffer(bytearray(status_row(failed, text, width)), dtype=torch.uint8), side)
    table = everyone.numpy().tobytes()
    return [read_status(table[r * width : (r + 1) * width]) for r in range(size)]



def all_gather_bytes(
    nbytes: int,
    fill: Callable[[torch.Tensor], object],
    group: ProcessGroup,
    *,
    shared_memory: bool = False,
) -> list[torch.Tensor]:
    """All-gather ``nbytes`` bytes per rank on ``group``'s side group, written by ``fill`` into a CPU uint8
    buffer (of stale bytes: ``fill`` writes every byte it means); every rank's bytes as uint8 views, in
    rank order (side-group buffers live on the CPU).

    With ``shared_memory=True`` on one host the views are the shared segment's slots: read them (or copy
    them) before this rank's next exchange on the group. Elsewhere they view a fresh buffer.
    """
    side = side_group(group)
    if shared_memory and shm_allreduce.enabled():
        reducer = shm_allreduce.for_group(side)
        if reducer is not None:
            return reducer.gather_in_place(nbytes, fill)
    size = dist.get_world_size(side)
    mine = torch.empty(nbytes, dtype=torch.uint8)
    fill(mine)
    everyone = torch.empty(size * nbytes, dtype=torch.uint8)
    all_gather_into(everyone, mine, side)
    return list(everyone.view(size, nbytes))
