"""The decode workers' ring of portion buffers (`tp_siglip.decode_ring`) and the pipeline that reads it.

What could go wrong: a buffer reused while its portion is still read (mixed pixels, silently), a ring too
small to be safe or a check that cannot fire, a ``/dev/shm`` too small ending in a bus error instead of
a message, stale pixels of an earlier batch left in the rows of a bad image.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tp_siglip import decode_ring, encode, pipeline, processing, processing_naflex

from checkpoints import tiny_job_inputs
from corpus import GOOD, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ring") / "corpus"
    make_corpus(folder)
    return folder, processing.find_images(folder)


def _first_overwrite(slots: int, ahead: int, parts: int, portions: int) -> int | None:
    """Replay the loader's rule (item k is handed out once item k - ahead is returned) against a reader that
    holds portion j from its last piece until it takes the next item; the first portion whose buffer a worker
    could start writing while it is held, or None."""
    for j in range(portions):
        released_before = (j + 1) * parts  # the first item the reader takes after letting portion j go
        next_writer = (j + slots) * parts  # the first item written into portion j's buffer again
        if next_writer < portions * parts and next_writer - ahead < released_before:
            return j
    return None


@given(workers=st.integers(1, 16), prefetch=st.integers(1, 4), parts=st.integers(1, 16))
def test_slots_needed_is_enough_and_one_fewer_is_not(workers, prefetch, parts):
    parts = min(parts, workers)
    ahead = prefetch * workers
    slots = decode_ring.slots_needed(ahead, parts)
    assert _first_overwrite(slots, ahead, parts, portions=slots + 40) is None
    if slots > 1:
        assert _first_overwrite(slots - 1, ahead, parts, portions=slots + 40) is not None


def test_the_ring_hands_out_rows_stamps_them_and_sees_a_reuse():
    ring = decode_ring.DecodeRing(slots=2, rows=4, parts=2, item_shape=(3, 2, 2))
    ring.piece(5, 0, 0, 2).fill_(7)
    ring.piece(5, 1, 2, 4).fill_(9)
    ring.check(5)
    assert ring.portion(5, 4)[:2].eq(7).all() and ring.portion(5, 4)[2:].eq(9).all()
    ring.piece(7, 0, 0, 2)  # portion 7 lands in portion 5's buffer: the stamp says so
    with pytest.raises(decode_ring.SlotOverwritten, match=r"holds parts of portions \[5, 7\], expected 5"):
        ring.check(5)
    with pytest.raises(ValueError, match="needs rows up to 5; a buffer holds 4"):
        ring.piece(6, 0, 0, 5)


def test_a_small_dev_shm_is_a_message_not_a_bus_error(monkeypatch):
    monkeypatch.setattr(decode_ring, "_free_shared_memory", lambda: 10 * 2**20)
    with pytest.raises(decode_ring.SharedMemoryTooSmall, match=r"need 14 MiB .* has 10 MiB free; .*--shm-size"):
        decode_ring.DecodeRing(slots=3, rows=32, parts=2, item_shape=(3, 224, 224))


def test_the_job_stops_with_that_message(tmp_path, monkeypatch):
    checkpoint, images = tiny_job_inputs(tmp_path, 3)
    monkeypatch.setattr(decode_ring, "_free_shared_memory", lambda: 0)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = encode.main([str(images), "--model", str(checkpoint), "--output", str(tmp_path / "o.safetensors"), "--workers", "1"])
    logging.getLogger().handlers.clear()
    assert code == encode.EXIT_FAILED
    assert "shared memory" in err.getvalue() and "--shm-size" in err.getvalue(), err.getvalue()


@pytest.mark.parametrize("naflex", [False, True])
def test_borrowed_portions_are_the_portions_decoded_in_this_process(corpus, naflex):
    folder, files = corpus
    batches = [files[i : i + 3] for i in range(0, len(files), 3)]
    if naflex:
        decode = functools.partial(pipeline.decode_naflex, patch_size=8, max_num_patches=30)
    else:
        decode = functools.partial(pipeline.decode_fixed, image_size=24)
    decoder = pipeline.PortionDecoder(batches, 1, 2, decode)
    inline = list(pipeline.decoded_portions(decoder, 0))
    seen = 0
    for a, b in zip(inline, pipeline.decoded_portions(decoder, 2, borrowed=True), strict=True):
        assert torch.equal(a.levels, b.levels) and a.reasons == b.reasons and a.batch == b.batch
        if naflex:
            assert torch.equal(a.spatial_shapes, b.spatial_shapes)
        seen += 1
    assert seen == len(batches)


def test_a_ring_too_small_is_caught_not_read(corpus, monkeypatch):
    """With one buffer the workers write the next portion over the one being read: the check must fire."""
    _, files = corpus
    batches = [files[i : i + 2] for i in range(0, 12, 2)]
    decoder = pipeline.PortionDecoder(batches, 0, 1, functools.partial(pipeline.decode_fixed, image_size=16))
    monkeypatch.setattr(pipeline, "slots_needed", lambda ahead, parts: 1)
    rings = []
    real = pipeline._ring_for
    monkeypatch.setattr(pipeline, "_ring_for", lambda *args: rings.append(real(*args)) or rings[-1])
    with pytest.raises(pipeline.DecodeFailed, match="bug in tp_siglip's pipeline"):
        for portion in pipeline.decoded_portions(decoder, 2, borrowed=True):
            # the workers, ahead by 4 items, begin the next portion in this one's (only) buffer: wait for that
            _wait_until(lambda batch=portion.batch: not bool((rings[0].stamps[0] == batch).all()))


def _wait_until(condition, seconds: float = 60.0) -> None:
    """Poll ``condition`` until it holds (the test's outcome is the condition's, not the time's)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.001)


def test_decoding_into_a_used_buffer_leaves_nothing_of_it(corpus):
    """The ring's rows hold an earlier batch's pixels: a bad image's row and NaFlex padding come out zero."""
    folder, files = corpus
    mixed = files[:6]
    assert any(f.relative_to(folder).as_posix() not in GOOD for f in mixed)
    fresh, reasons = processing.decode_files(mixed, 20)
    used = torch.full_like(fresh, 201)
    got, again = processing.decode_files(mixed, 20, out=used)
    assert got is used and torch.equal(got, fresh) and again == reasons
    levels, shapes, reasons = processing_naflex.decode_naflex_files(mixed, patch_size=8, max_num_patches=30)
    used = torch.full_like(levels, 201)
    got, got_shapes, again = processing_naflex.decode_naflex_files(mixed, patch_size=8, max_num_patches=30, out=used)
    assert got is used and torch.equal(got, levels) and torch.equal(got_shapes, shapes) and again == reasons
    with pytest.raises(ValueError, match=r"out must be a contiguous uint8 tensor of shape \(6, 3, 20, 20\)"):
        processing.decode_files(mixed, 20, out=torch.zeros(6, 3, 20, 21, dtype=torch.uint8))
