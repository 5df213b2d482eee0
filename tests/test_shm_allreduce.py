"""The shared-memory all-reduce and all-gather that CPU ranks on one host use: exact sums, identical on
every rank, gathers in rank order between sums, growing for big tensors, nothing left in /dev/shm."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from distributed import run_ranks


def _sums(rank, world_size, root):
    from tp_siglip import parallel, shm_allreduce

    group = dist.group.WORLD
    comm = parallel.communicator_for(group)
    assert comm.kind == "shared memory"
    reducer = shm_allreduce.for_group(group)
    assert reducer is not None, "shared-memory all-reduce should be usable on one host"
    for step, (shape, dtype) in enumerate([((8, 5, 7), torch.float32), ((3, 1000), torch.bfloat16),
                                           ((3, 1_200_000), torch.float32), ((4, 4), torch.float32)]):
        parts = [torch.randn(shape, generator=torch.Generator().manual_seed(100 * step + r)).to(dtype)
                 for r in range(world_size)]
        mine = parts[rank].clone()
        before = reducer.step
        gathered = comm.all_gather_rows(parts[rank][None].clone(), [1] * world_size)  # a gather, then a sum, same slots
        assert torch.equal(gathered, torch.stack(parts))
        assert reducer.step in (before + 1, 1), "the gather did not go through shared memory"  # 1: it grew
        out = comm.all_reduce(mine)
        expected = sum(p.float() for p in parts).to(dtype)  # rank order, in fp32, rounded once
        assert torch.equal(out, expected)
        everyone = [torch.empty_like(out) for _ in range(world_size)]
        dist.all_gather(everyone, out)
        assert all(torch.equal(e, out) for e in everyone), "ranks disagree"
    assert reducer.slot_bytes >= 3 * 1_200_000 * 4  # it grew for the 14 MB tensor


def test_shared_memory_sums(tmp_path):
    before = set(os.listdir("/dev/shm"))
    run_ranks(3, tmp_path, _sums, str(tmp_path))
    assert {n for n in os.listdir("/dev/shm") if n.startswith("tp-siglip")} - before == set()



def _in_place(rank, world_size, root):
    from tp_siglip import parallel, shm_allreduce

    group = dist.group.WORLD  # the exchanges ride on the group's side group
    with torch.inference_mode():  # the encode job first uses the segment inside inference_mode
        views = parallel.all_gather_bytes(5, lambda raw: raw.fill_(rank + 1), group, shared_memory=True)
        assert [v.tolist() for v in views] == [[r + 1] * 5 for r in range(world_size)]
    reducer = shm_allreduce.for_group(parallel.side_group(group))
    step = reducer.step
    views = parallel.all_gather_bytes(3, lambda raw: raw.fill_(10 * rank), group, shared_memory=True)  # and after it
    assert reducer.step == step + 1, "the gather did not go through shared memory"
    assert [v.tolist() for v in views] == [[10 * r] * 3 for r in range(world_size)]
    odd = reducer.slot_bytes + 3  # grows the segment; slots stay aligned for views of any dtype
    views = parallel.all_gather_bytes(odd, lambda raw: raw.fill_(rank), group, shared_memory=True)
    assert reducer.slot_bytes % 64 == 0 and [int(v[-1]) for v in views] == list(range(world_size))
    total = parallel.communicator_for(group).all_reduce(torch.full((5,), rank + 1, dtype=torch.float64))
    assert total.tolist() == [world_size * (world_size + 1) / 2] * 5


def test_gather_in_place_hands_back_every_ranks_bytes_inside_and_after_inference_mode(tmp_path):
    run_ranks(2, tmp_path, _in_place, str(tmp_path))



def _split_rows(rank, world_size, root):
    from tp_siglip import parallel

    group, sizes = dist.group.WORLD, [2, 0, 3][:world_size]
    whole = torch.arange(sum(sizes) * 4, dtype=torch.float32).view(-1, 2, 2)
    first = sum(sizes[:rank])
    mine = whole[first : first + sizes[rank]]
    seen = []
    comms = [parallel.communicator_for(group), parallel.Communicator(group)]  # shared memory, then gloo's own
    for comm in comms:
        with parallel.split_batch(sizes):
            gathered = parallel.gather_rows(mine, comm)
            summed = parallel.sum_rows(whole * (rank + 1), comm)  # each rank a different partial sum
        seen.append((torch.equal(gathered, whole), torch.equal(summed, mine * sum(range(1, world_size + 1)))))
    assert [c.kind for c in comms] == ["shared memory", "torch.distributed"]
    outside = parallel.gather_rows(mine, comms[0]) is mine  # no split: nothing to gather
    return seen, outside


def test_split_batch_gathers_and_sums_each_ranks_rows(tmp_path):
    """Inside split_batch a column-parallel input gathers every rank's rows (one rank has none) and a
    row-parallel sum keeps this rank's rows, through shared memory and through gloo alike."""
    for seen, outside in run_ranks(3, tmp_path, _split_rows, str(tmp_path)):
        assert seen == [(True, True), (True, True)] and outside


def _no_segment(rank, world_size, root):
    from tp_siglip import parallel, shm_allreduce

    if rank == 0:  # rank 0 cannot make the segment: every rank must hear so, none may wait for it
        shm_allreduce._segment_path = lambda token: os.path.join(root, "missing", str(token))
    group = dist.group.WORLD
    comm = parallel.communicator_for(group)
    total = comm.all_reduce(torch.full((4,), rank + 1.0))  # gloo's own all-reduce instead
    return shm_allreduce.for_group(group) is None and comm._reducer is None, total.tolist()


def test_every_rank_falls_back_to_gloo_when_rank_0_cannot_make_the_segment(tmp_path):
    for fell_back, total in run_ranks(2, tmp_path, _no_segment, str(tmp_path)):
        assert fell_back and total == [3.0] * 4
