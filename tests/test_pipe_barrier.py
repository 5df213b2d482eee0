"""The named-pipe barrier that the shared-memory sums and gathers wait at: it holds every rank until all have
arrived, leaves no files behind, falls back on every rank when one cannot make its pipes, and turns a rank
that exited or hangs into an error instead of a hang."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks


def _connect(root, token, rank=None, missing_on=None):
    from tp_siglip import pipe_barrier

    directory = os.path.join(root, "missing") if rank is not None and rank == missing_on else root
    return pipe_barrier.connect(dist.group.WORLD, directory, token)


def _holds_everyone(rank, world_size, root):
    barrier = _connect(root, 1)
    dist.barrier()
    left = [n for n in os.listdir(root) if "barrier" in n]  # every rank has unlinked what it made
    slots = torch.from_file(os.path.join(root, "slots"), shared=True, size=world_size, dtype=torch.int64)
    behind = 0
    for step in range(1, 41):
        if rank == step % world_size:
            torch.ones(20_000).cumsum(0)  # this rank comes late to this barrier
        slots[rank] = step
        barrier.wait()
        behind += int((slots < step).sum())  # a rank let through early sees a slot not yet written
    dist.barrier()
    barrier.close()
    return left, behind


def test_barrier_holds_every_rank_and_leaves_no_files(tmp_path):
    torch.zeros(3, dtype=torch.int64).numpy().tofile(tmp_path / "slots")
    for left, behind in run_ranks(3, tmp_path, _holds_everyone, str(tmp_path)):
        assert left == [] and behind == 0


def _falls_back(rank, world_size, root):
    barrier = _connect(root, 2, rank, missing_on=1)  # rank 1 cannot make its pipes
    dist.barrier()
    return barrier is None, sorted(os.listdir(root))


def test_every_rank_falls_back_when_one_cannot_make_its_pipes(tmp_path):
    for none, names in run_ranks(2, tmp_path, _falls_back, str(tmp_path)):
        assert none and not [n for n in names if "barrier" in n]


def _failures(rank, world_size, root):
    seen = {}
    late = _connect(root, 3)
    if rank == 0:  # the others never come: the group's timeout, here shortened, ends the wait
        late.timeout_ms = 300
        with pytest.raises(RuntimeError, match="rank 1 did not reach the barrier within"):
            late.wait()
        seen["timeout"] = True
    dist.barrier()
    gone = _connect(root, 4)
    if rank == 2:
        gone.close()  # as a rank does that exits
    dist.barrier()
    if rank != 2:
        with pytest.raises(RuntimeError, match="rank 2 of the group has exited"):
            gone.wait()
        seen["exited"] = True
    dist.barrier()
    silent = _connect(root, 5)
    if rank == 1:  # shuts only its write ends, as when a forked decode worker still holds its read ends
        for fd in silent._writers.values():
            os.close(fd)
        silent._writers = {}
    dist.barrier()
    if rank != 1:
        with pytest.raises(RuntimeError, match="rank 1 of the group has exited"):
            silent.wait()
        seen["closed"] = True
    for barrier in (late, gone, silent):
        barrier.close()
    return seen


def test_a_rank_that_exited_or_hangs_is_an_error_not_a_hang(tmp_path):
    seen = run_ranks(3, tmp_path, _failures, str(tmp_path))
    assert seen == [{"timeout": True, "exited": True, "closed": True}, {"exited": True}, {"closed": True}]
