"""The GPU path, proved on the CPU: what a forward puts on the device group, what rides on the side group,
and that it never makes a device wait for the host.

The ranks run gloo with the shared-memory path off (``TP_SIGLIP_SHM_ALLREDUCE=0``): the layers then call
``torch.distributed`` exactly as they would on NCCL. `benchmarks.schedule.CollectiveLog` records every
collective of one forward (after a first one that sets things up) and `SyncOpLog` every host-sync op.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from benchmarks.schedule import CollectiveLog, SyncOpLog, ring_bytes

from distributed import run_ranks

CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
BATCH, TOKENS, HIDDEN = 4, 16, 32
SPLITS = {2: [2, 2], 3: [2, 1, 1]}


def _model(mode: str):
    from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer

    os.environ["TP_SIGLIP_SHM_ALLREDUCE"] = "0"  # the torch.distributed path, as on NCCL
    model = SiglipVisionTransformer(SiglipVisionConfig(**CONFIG), dist.group.WORLD, seed=3).eval()
    model.check_inputs_agree = mode
    model.check_finite = False  # what the default (None) means for inputs on a GPU: no value reads
    return model


def _schedule(rank, world_size, mode):
    from tp_siglip.parallel import side_group

    model = _model(mode)
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sizes = SPLITS[world_size]
    first = sum(sizes[:rank])
    mine = pixels[first : first + sizes[rank]]
    with torch.inference_mode():
        whole = model(pixels)
        model(mine, batch_sizes=sizes)  # set-up (the side group) happens in these first calls
        with CollectiveLog() as plain:
            model(pixels)
        with CollectiveLog() as split:
            rows = model(mine, batch_sizes=sizes)
    device, side = dist.group.WORLD, side_group(dist.group.WORLD)
    assert all(c.on(device) or c.on(side) for c in plain.calls + split.calls), "a collective on a third group"
    describe = lambda log, group: [(c.kind, c.nbytes) for c in log.on(group)]  # noqa: E731
    torch.testing.assert_close(rows.pooler_output, whole.pooler_output[first : first + sizes[rank]], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.last_hidden_state, whole.last_hidden_state[first : first + sizes[rank]], atol=1e-5, rtol=0)
    return {
        "plain": describe(plain, device),
        "split": describe(split, device),
        "plain side": describe(plain, side),
        "split side": describe(split, side),
        "ring": [sum(ring_bytes(c, world_size) for c in log.on(device)) for log in (plain, split)],
    }


def _expected(world_size: int) -> dict[str, list[tuple[str, int]]]:
    tokens, pooled = BATCH * TOKENS * HIDDEN * 4, BATCH * HIDDEN * 4  # fp32 bytes of the batch's activations
    padded = world_size * max(SPLITS[world_size])  # rows a split collective carries (equal counts per rank)
    tokens_pad, pooled_pad = padded * TOKENS * HIDDEN * 4, padded * HIDDEN * 4
    layers = CONFIG["num_hidden_layers"]
    return {
        # plain TP: attention and MLP sum once per layer, then the head's attention and MLP
        "plain": [("all_reduce", tokens)] * 2 * layers + [("all_reduce", pooled)] * 2,
        # split: gather rows before each column-parallel layer, reduce-scatter after each row-parallel one
        "split": [("all_gather", tokens_pad), ("reduce_scatter", tokens_pad)] * 2 * layers
        + [("all_gather", tokens_pad), ("reduce_scatter", pooled_pad), ("all_gather", pooled_pad), ("reduce_scatter", pooled_pad)],
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_device_group_carries_the_minimal_schedule_and_bookkeeping_rides_the_side_group(tmp_path, world_size):
    """Plain TP: 2 all-reduces per layer + the head's 2, nothing else. A split batch: all-gathers and real
    reduce-scatters whose bytes on a ring equal plain TP's, layer for layer (padding aside); the only extra
    is the head's gather of the last hidden state. The input agreement (one 1 KiB all-gather) rides on the
    side group at "shapes", and nothing at all at "off"."""
    expected = _expected(world_size)
    for mode, side in (("shapes", [("all_gather", world_size * 1024)]), ("off", [])):
        for seen in run_ranks(world_size, tmp_path, _schedule, mode):
            assert seen["plain"] == expected["plain"]
            assert seen["split"] == expected["split"]
            assert seen["plain side"] == side and seen["split side"] == side
    plain_ring, split_ring = seen["ring"]
    padding = world_size * max(SPLITS[world_size]) / BATCH
    layers = 4 * CONFIG["num_hidden_layers"]  # ring units of one (B, T, D) all-gather, per forward
    head_gather = (world_size - 1) / world_size * BATCH * TOKENS * HIDDEN * 4
    # the encoder layers' bytes equal plain TP's (times the padding); the head adds its gather
    encoder_split = (world_size - 1) / world_size * BATCH * TOKENS * HIDDEN * 4 * layers * padding
    assert split_ring == pytest.approx(encoder_split + head_gather * padding + 3 * (world_size - 1) / world_size * BATCH * HIDDEN * 4 * padding)
    assert plain_ring == pytest.approx(2 * (world_size - 1) / world_size * (2 * CONFIG["num_hidden_layers"] * BATCH * TOKENS * HIDDEN * 4 + 2 * BATCH * HIDDEN * 4))


def _syncs(rank, world_size):
    model = _model("shapes")
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sizes = SPLITS[world_size]
    mine = pixels[sum(sizes[:rank]) : sum(sizes[: rank + 1])]
    found = {}
    with torch.inference_mode():
        model(pixels)
        model(mine, batch_sizes=sizes)
        for mode in ("shapes", "off"):
            model.check_inputs_agree = mode
            for name, call in (("plain", lambda: model(pixels)), ("split", lambda: model(mine, batch_sizes=sizes))):
                with SyncOpLog() as log:
                    call()
                found[f"{name} {mode}"] = log.seen
        model.check_finite = True  # reads the pixels: a host sync by design (opt-in on a device)
        with SyncOpLog() as log:
            model(pixels)
        found["finite"] = log.seen
    return found


def test_the_forward_has_no_host_sync(tmp_path):
    """No .item(), bool(tensor), nonzero, boolean-mask indexing or torch.equal in the forward, plain or split,
    at agreement "shapes" and "off"; the opt-in finiteness check does read the data (so the log works)."""
    for found in run_ranks(2, tmp_path, _syncs):
        assert {k: v for k, v in found.items() if k != "finite"} == {
            "plain shapes": [], "split shapes": [], "plain off": [], "split off": []
        }
        assert found["finite"], "the finiteness check reads the pixels; the log should have seen it"


def test_value_checks_run_on_cpu_inputs_and_never_on_a_device_by_default():
    """check_finite=None (the default) reads values only of CPU tensors: a NaN is refused on the CPU, while a
    device tensor (the meta device stands in for a GPU here) is never read; True and False force it."""
    from tp_siglip import SiglipVisionConfig, SiglipVisionTransformer
    from tp_siglip.checks import reads_values

    meta = torch.empty(2, device="meta")
    assert reads_values(None, torch.zeros(2)) and not reads_values(None, meta)
    assert reads_values(True, meta) and not reads_values(False, torch.zeros(2))
    model = SiglipVisionTransformer(SiglipVisionConfig(**CONFIG), seed=3).eval()
    assert model.check_finite is None
    bad = torch.zeros(1, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(bad)
    with SyncOpLog() as log:
        model.check_finite = False
        model(bad)
    assert log.seen == []



def test_naflex_takes_spatial_shapes_on_the_cpu_with_the_model_on_a_device():
    """As documented, a NaFlex tower on a GPU takes ``spatial_shapes`` on the CPU (read on the host, as the
    processor makes it) beside device pixels and mask; the meta device stands in for the GPU. The pixels and
    the mask must still be on the model's device."""
    from tp_siglip import SiglipVisionConfig
    from tp_siglip.model import Siglip2VisionTransformer

    config = SiglipVisionConfig(variant="naflex", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, patch_size=4, num_patches=16)
    model = Siglip2VisionTransformer(config, device="meta").eval()
    model._weights_ready = True  # nothing is computed on meta; only shapes and devices are checked
    pixels, mask = torch.zeros(2, 16, 48, device="meta"), torch.ones(2, 16, dtype=torch.int32, device="meta")
    shapes = torch.tensor([[4, 4], [2, 3]])
    with torch.inference_mode():
        out = model(pixels, mask, shapes)
        assert out.last_hidden_state.shape == (2, 16, 32) and out.last_hidden_state.device.type == "meta"
        with pytest.raises(ValueError, match="pixel_values are on cpu but the model is on meta"):
            model(torch.zeros(2, 16, 48), mask, shapes)


def test_the_encode_jobs_copy_to_the_host_waits_on_the_models_gpu_not_the_current_one():
    """``tp-siglip encode --device cuda:1`` in one process leaves the current GPU at 0: the wait before the host
    reads the rows must be recorded on cuda:1's stream, where the copy runs (an event on cuda:0's would be
    passed at once, and the host would read the pinned buffer before the copy landed)."""
    import argparse
    from unittest import mock

    from fake_cuda import FakeCuda, no_cuda_init
    from tp_siglip.encode import StoredRows

    gpu = torch.device("cuda", 1)
    rows = StoredRows(mock.Mock(), argparse.Namespace(), "pooler_output", None)
    values = {"pooler_output": torch.arange(6.0).reshape(2, 3), "last_hidden_state": torch.ones(2, 2, 3)}
    plain_empty = torch.empty
    unpinned = lambda *a, pin_memory=False, **k: plain_empty(*a, **k)  # noqa: E731 (no pinned memory without CUDA)
    with no_cuda_init(), mock.patch("torch.empty", unpinned), mock.patch("torch.cuda.Event") as event, \
            mock.patch("torch.cuda.current_stream", side_effect=lambda device=None: ("stream of", device)):
        host = rows.on_host({name: FakeCuda(t, gpu) for name, t in values.items()})
    done = event.return_value
    assert done.method_calls == [mock.call.record(("stream of", gpu)), mock.call.synchronize()]
    for name, tensor in values.items():
        assert host[name].device.type == "cpu" and torch.equal(host[name], tensor)

def _job_exchanges(rank, world_size):
    from tp_siglip import lockstep
    from tp_siglip.parallel import side_group

    world = dist.group.WORLD
    with CollectiveLog() as log:
        lockstep.agree_on_shards([["a", "files", "", ["a.png"]], ["b", "tar", "b.tar", []]])
        limit = lockstep.broadcast_from_rank0(7 + rank)
        top = lockstep.agree_on_max(rank)
        rows = {"v": torch.full((2, 3), float(rank))}
        shares = lockstep.collect_rows(rows, {"v": ((3,), torch.float32)}, [2] * world_size, None, world)
        reasons = lockstep.gather_reasons([f"bad {rank}", None], world)
        decision = lockstep.broadcast_from_rank0(["resume", [1, 2]] if rank == 0 else None)
    side = side_group(world)
    assert not log.on(world), f"bookkeeping on the device group: {log.on(world)}"
    assert all(c.on(side) for c in log.calls) and not [c for c in log.calls if c.kind == "object"], "pickled objects"
    return limit, top, shares.rows("v").tolist(), reasons, decision


def test_the_encode_jobs_exchanges_ride_the_side_group_without_pickling(tmp_path):
    """Every exchange of the encode job's ranks (the shard list's agreement, rank 0's values, the batch rows, the reasons,
    the resume decision) runs on the CPU side group, none on the device group, and none pickles."""
    for got in run_ranks(2, tmp_path, _job_exchanges):
        limit, top, rows, reasons, decision = got
        assert (limit, top) == (7, 1)
        assert rows == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
        assert reasons == ["bad 0", None, "bad 1", None] and decision == ["resume", [1, 2]]
