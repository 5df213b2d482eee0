"""The encode job's input pipeline: uint8 decoding in worker processes, the per-batch exchange of each rank's portion, and
normalisation on the model's device giving exactly what transformers' processors give.

Speed is measured in ``benchmarks/pipeline.py``, not here; these tests check what can be wrong: values,
order, portions, reasons, and what happens when a worker dies.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tp_siglip import encode, pipeline, processing, processing_naflex
from tp_siglip.lockstep import collect_rows, gather_reasons

from checkpoints import tiny_job_inputs
from corpus import BAD, GOOD, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "corpus"
    make_corpus(folder)
    return folder, processing.find_images(folder)


@given(count=st.integers(0, 70), parts=st.integers(1, 8))
def test_portion_bounds_cut_a_batch_into_contiguous_near_equal_portions(count, parts):
    bounds = [pipeline.portion_bounds(count, parts, r) for r in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_levels_then_table_equal_preprocess_bit_for_bit(corpus):
    """decode_files + to_pixel_values (the job's two halves) == preprocess, in float32 and bfloat16."""
    _, files = corpus
    good = [f for f in files if f.relative_to(corpus[0]).as_posix() in GOOD]
    levels, reasons = processing.decode_files(good, 40)
    assert levels.dtype == torch.uint8 and reasons == [None] * len(good)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(processing.to_pixel_values(levels, dtype), processing.preprocess(good, 40, dtype=dtype))
    every_level = torch.arange(256, dtype=torch.uint8)
    assert np.array_equal(processing.to_pixel_values(every_level).numpy(), processing._LOOKUP)
    odd = every_level.flip(0)[:255]  # a length that ends in torch's scalar tail
    assert np.array_equal(processing.to_pixel_values(odd).numpy(), processing._LOOKUP[odd.numpy()])
    with pytest.raises(TypeError, match="uint8"):
        processing.to_pixel_values(every_level.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_pixel_values_into_out_and_by_table(monkeypatch, dtype):
    """``out=`` is written and returned, with the values of a fresh call; the table fallback gives the same."""
    levels = torch.randint(0, 256, (3, 3, 17, 19), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fresh = processing.to_pixel_values(levels, dtype)
    out = torch.full(levels.shape, 7.0, dtype=dtype)
    assert processing.to_pixel_values(levels, dtype, out=out) is out and torch.equal(out, fresh)
    expected = torch.from_numpy(processing._LOOKUP[levels.numpy()]).to(dtype)
    assert torch.equal(fresh, expected)
    monkeypatch.setattr(processing, "_ARITHMETIC_EXACT", False)
    assert torch.equal(processing.to_pixel_values(levels, dtype), expected)
    with pytest.raises(ValueError, match=r"out must be a torch.* tensor of shape \(3, 3, 17, 19\)"):
        processing.to_pixel_values(levels, dtype, out=out[:2])


def test_naflex_levels_then_table_equal_preprocess_naflex(corpus):
    _, files = corpus
    good = [f for f in files if f.relative_to(corpus[0]).as_posix() in GOOD]
    levels, shapes, reasons = processing_naflex.decode_naflex_files(good, patch_size=8, max_num_patches=30)
    assert levels.dtype == torch.uint8 and reasons == [None] * len(good)
    ours = processing_naflex.naflex_inputs(levels, shapes, torch.bfloat16)
    theirs = processing_naflex.preprocess_naflex([str(f) for f in good], patch_size=8, max_num_patches=30)
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"].to(torch.bfloat16))
    assert torch.equal(ours["pixel_attention_mask"], theirs["pixel_attention_mask"])
    assert torch.equal(ours["spatial_shapes"], theirs["spatial_shapes"])


def test_workers_give_what_the_main_process_gives_in_order_with_reasons(corpus):
    folder, files = corpus
    batches = [files[i : i + 3] for i in range(0, len(files), 3)]
    for rank in (0, 1):
        decoder = pipeline.PortionDecoder(batches, rank, 2, functools.partial(pipeline.decode_fixed, image_size=32))
        inline = list(pipeline.decoded_portions(decoder, 0))
        parallel = list(pipeline.decoded_portions(decoder, 2))
        assert [d.batch for d in parallel] == list(range(len(batches)))
        for a, b in zip(inline, parallel):
            assert torch.equal(a.levels, b.levels) and a.reasons == b.reasons
            assert a.count == len(decoder.portion(a.batch))
        reasons = {str(f): r for d in parallel for f, r in zip(decoder.portion(d.batch), d.reasons)}
        for path, reason in reasons.items():
            name = Path(path).relative_to(folder).as_posix()
            assert (reason is None) == (name in GOOD), (name, reason)
            if name in BAD:
                assert BAD[name] in reason.lower()


def test_a_rank_with_nothing_to_decode_gets_empty_portions_with_workers(corpus):
    """More ranks than images in a batch (3 images over 4 ranks): rank 3's portions are empty, workers or not."""
    _, files = corpus
    decoder = pipeline.PortionDecoder([files[:3], files[3:6]], 3, 4, functools.partial(pipeline.decode_fixed, image_size=32))
    portions = list(pipeline.decoded_portions(decoder, 1))
    assert [(d.batch, d.count) for d in portions] == [(0, 0), (1, 0)]


def _dies_on(target: str, sources, image_size, out=None):
    if any(str(s) == target for s in sources):
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    return pipeline.decode_fixed(sources, image_size, out=out)


def test_a_dead_worker_is_an_error_naming_the_batch(corpus):
    _, files = corpus
    batches = [[f] for f in files[:4]]
    decoder = pipeline.PortionDecoder(batches, 0, 1, functools.partial(_dies_on, str(files[2]), image_size=16))
    got = []
    with pytest.raises(pipeline.DecodeWorkerDied, match=r"batch (\d) of 4 never arrived: .*(exited unexpectedly|killed by signal)") as caught:
        for portion in pipeline.decoded_portions(decoder, 1):
            got.append(portion.batch)
    missing = int(caught.value.args[0].split("batch ")[1].split()[0])
    assert got == list(range(missing - 1)) and 1 <= missing <= 3  # batches in order, up to the one the dead worker owed


def test_the_job_stops_after_writing_what_it_encoded_when_a_worker_dies(tmp_path, monkeypatch):
    checkpoint, images = tiny_job_inputs(tmp_path, 6)
    killer = str(images / "4.png")
    real = pipeline.decode_fixed
    monkeypatch.setattr(pipeline, "decode_fixed", lambda sources, image_size, opener=None, out=None: (
        os.kill(os.getpid(), signal.SIGKILL) if killer in (str(getattr(s, "key", s)) for s in sources) else real(sources, image_size, opener, out)))
    output = tmp_path / "out.safetensors"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = encode.main([str(images), "--model", str(checkpoint), "--output", str(output), "--batch-size", "2", "--workers", "1"])
    logging.getLogger().handlers.clear()
    assert code == encode.EXIT_FAILED, err.getvalue()
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a decode worker died; batch" in errors[0] and "of 3 never arrived" in errors[0], err.getvalue()
    assert not output.exists()  # written only once every shard is complete: never a partial file


def _exchange(rank: int, world_size: int) -> tuple:
    """Uneven portions (3 + 2 rows) of two dtypes; rank 1 says it failed in a second exchange."""
    sizes = [3, 2]
    rows = {"pixels": torch.full((sizes[rank], 2, 2), rank + 1, dtype=torch.uint8),
            "grid": torch.arange(sizes[rank] * 2, dtype=torch.int64).view(-1, 2) + 100 * rank}
    specs = {"pixels": ((2, 2), torch.uint8), "grid": ((2,), torch.int64)}
    first = collect_rows(rows, specs, sizes, None, dist_group())
    pixels, grid = first.rows("pixels"), first.rows("grid")  # copies: the parts are read before the next exchange
    second = collect_rows(None if rank else rows, specs, sizes, "worker died" if rank else None, dist_group())
    failed = second.failures
    # the same shared-memory slots as the first exchange's: a failed rank's rows must read as zeros, not as
    # what its slot held before
    third = collect_rows(None if rank else rows, specs, sizes, "worker died" if rank else None, dist_group())
    stale = [int(third.parts[name][1].abs().sum()) for name in specs] + [int(third.parts["pixels"][0].sum())]
    reasons = gather_reasons([f"r{rank}"] * sizes[rank], dist_group())
    return pixels, grid, first.failures, failed, reasons, stale


def dist_group():
    import torch.distributed as dist

    return dist.group.WORLD


def test_collect_rows_over_two_ranks(rank_pools):
    results = rank_pools[1](2).run(_exchange, timeout=120)
    for pixels, grid, failures, failed, reasons, stale in results:
        assert stale == [0, 0, 3 * 2 * 2], stale  # rank 1's rows zeroed; rank 0's are its own
        assert pixels[:, 0, 0].tolist() == [1, 1, 1, 2, 2]
        assert grid.tolist() == [[0, 1], [2, 3], [4, 5], [100, 101], [102, 103]]
        assert failures == [None, None] and failed == [None, "worker died"]
        assert reasons == ["r0"] * 3 + ["r1"] * 2


@pytest.mark.parametrize(
    "cores, local_ranks, expected",
    [(2, 1, 2), (2, 2, 1), (1, 1, 1), (3, 4, 1), (16, 2, 8), (64, 1, pipeline.MAX_DEFAULT_WORKERS)],
)
def test_default_workers_are_the_cores_per_rank(monkeypatch, cores, local_ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert pipeline.default_workers() == expected


def test_main_threads_follow_how_busy_the_workers_keep_the_cores(monkeypatch):
    """Workers decoding ~2 of 2 cores' worth leave the model one thread; workers that are mostly idle give
    it back every thread; the first batch is not counted, and restore() puts the original count back."""
    now = [0.0]
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: now[0])
    full = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = pipeline.MainThreads(active=True)

        def batch(wall: float, decoding: float) -> int:
            now[0] += wall
            threads.update(decoding)
            return torch.get_num_threads()

        assert batch(1.0, 0.1) == 2  # the first batch: not counted
        assert [batch(0.1, 0.19) for _ in range(3)] == [1, 1, 1]  # decode-bound: 1.9 cores busy decoding
        assert [batch(1.0, 0.1) for _ in range(pipeline.MainThreads.WINDOW)][-1] == 2  # model-bound
        threads.restore()
        assert torch.get_num_threads() == 2
        assert pipeline.MainThreads(active=False).active is False
    finally:
        torch.set_num_threads(full)
