"""The encode job's input pipeline: images decoded in worker processes, ahead of the forward that needs them.

Each rank decodes only its portion of each batch (`portion_bounds`), to uint8, in DataLoader workers that
write straight into a ring of shared buffers (`decode_ring`); a bad image is a reason, a dead worker an
error naming the batch. Why each choice: docs/encode-design.md#decoding-ahead-of-the-model.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from tp_siglip.decode_ring import DecodeFailed, DecodeRing, slots_needed

__all__ = [
    "MAX_DEFAULT_WORKERS",
    "DecodeFailed",
    "DecodeWorkerDied",
    "Decoded",
    "MainThreads",
    "PortionDecoder",
    "decode_fixed",
    "decode_naflex",
    "decoded_portions",
    "default_workers",
    "portion_bounds",
]

#: the most workers `default_workers` picks (more rarely pays: the job is then bound by the model or the disk)
MAX_DEFAULT_WORKERS = 16
#: batches each worker decodes ahead of the forward
PREFETCH_PER_WORKER = 2


class DecodeWorkerDied(DecodeFailed):
    """A decode worker process died (killed for memory, a crash in a decoder); the message names the batch."""


def default_workers() -> int:
    """Decode workers for this rank: its usable cores divided by the ranks on this node, 1 to 16; 0 in a
    daemonic process (e.g. a ``multiprocessing`` pool's worker), which may not start processes."""
    if multiprocessing.current_process().daemon:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_DEFAULT_WORKERS, cores // local_ranks))


def portion_bounds(count: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``count`` items are cut into ``parts`` contiguous portions
    (the first ``count % parts`` portions hold one item more)."""
    base, extra = divmod(count, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass
class Decoded:
    """One rank's decoded portion of one batch (what a worker returns)."""

    batch: int
    levels: torch.Tensor  # uint8: (n, 3, H, W), or NaFlex (n, N, 3*p*p)
    spatial_shapes: Optional[torch.Tensor]  # NaFlex (n, 2) int64, else None
    reasons: list[Optional[str]]
    seconds: float  # decode time in the worker

    @property
    def count(self) -> int:
        return len(self.reasons)


class PortionDecoder(torch.utils.data.Dataset):
    """Item ``b`` = this rank's portion of batch ``b``, decoded (a map-style dataset over batch indices).

    Args:
        batches: Each batch's sources (paths, or whatever ``opener`` opens), the same on every rank.
        rank, group_size: This rank's place among the ranks that deal out each batch.
        decode: ``decode(sources, out=None) -> (levels, spatial_shapes or None, reasons)``, writing the
            levels into ``out`` (uint8, one row per source) when given; must be picklable (a module-level
            function or a ``functools.partial`` of one) when workers are used.
    """

    def __init__(self, batches: Sequence[Sequence[Any]], rank: int, group_size: int, decode: Callable[..., Any]) -> None:
        self.batches, self.rank, self.group_size, self.decode = batches, rank, group_size, decode

    def __len__(self) -> int:
        return len(self.batches)

    def portion(self, index: int) -> Sequence[Any]:
        batch = self.batches[index]
        start, stop = portion_bounds(len(batch), self.group_size, self.rank)
        return batch[start:stop]

    def __getitem__(self, index: int) -> Decoded:
        return self.decode_sources(index, self.portion(index))

    def decode_sources(self, index: int, sources: Sequence[Any], out: Optional[torch.Tensor] = None) -> Decoded:
        """Decode ``sources`` (batch ``index``'s portion, or a piece of it, into ``out`` if given), timed."""
        start = time.perf_counter()
        levels, shapes, reasons = self.decode(sources, out=out)
        return Decoded(index, levels, shapes, reasons, time.perf_counter() - start)


@dataclass
class _Piece:
    """What a worker sends back for one item; its levels are in the item's rows of the `DecodeRing`."""

    spatial_shapes: Optional[np.ndarray]  # NaFlex grids as numpy: pickled inline, no shared segment of their own
    reasons: list[Optional[str]]
    seconds: float


class _Pieces(torch.utils.data.Dataset):
    """Item ``i`` = piece ``i % parts`` of portion ``i // parts`` (contiguous, near-equal): the workers split
    every portion between them, so they all start on the first batch at once (the queue fills in a piece's
    time, not a portion's) and none sits idle while another decodes the last batch alone. A worker decodes
    its piece straight into the portion's rows of ``ring`` and returns a `_Piece`."""

    def __init__(self, decoder: PortionDecoder, parts: int, ring: DecodeRing) -> None:
        self.decoder, self.parts, self.ring = decoder, parts, ring

    def __len__(self) -> int:
        return len(self.decoder) * self.parts

    def __getitem__(self, item: int) -> _Piece:
        index, part = divmod(item, self.parts)
        sources = self.decoder.portion(index)
        start, stop = portion_bounds(len(sources), self.parts, part)
        decoded = self.decoder.decode_sources(index, sources[start:stop], out=self.ring.piece(index, part, start, stop))
        shapes = None if decoded.spatial_shapes is None else decoded.spatial_shapes.numpy()
        return _Piece(shapes, decoded.reasons, decoded.seconds)


def _assemble(index: int, count: int, pieces: list[_Piece], ring: DecodeRing, copy: bool, pin_memory: bool) -> Decoded:
    """Portion ``index`` (``count`` rows) from its pieces: its rows where they lie in ``ring``, or copied out
    (into page-locked memory when ``pin_memory``) when ``copy``; the caller checks the ring after."""
    levels = ring.portion(index, count)
    if copy:
        levels = levels.clone() if not pin_memory else torch.empty(levels.shape, dtype=levels.dtype, pin_memory=True).copy_(levels)
    shapes = None if pieces[0].spatial_shapes is None else torch.from_numpy(np.concatenate([p.spatial_shapes for p in pieces]))
    reasons = [reason for piece in pieces for reason in piece.reasons]
    return Decoded(index, levels, shapes, reasons, sum(piece.seconds for piece in pieces))


class MainThreads:
    """The main process's intra-op threads while decode workers share its CPU cores with a model on the CPU.

    The model gets the cores the workers leave free: one thread while the workers keep the cores busy (a
    decode-bound job), every thread it had while they mostly sit on a full queue (a model-bound job). An
    OpenMP region whose second thread sits behind a busy worker costs several times its work, and a
    model slowed that way looks model-bound by its waits alone, so the measure is the workers' own: the
    seconds they spent decoding over the wall-clock seconds of the last ``WINDOW`` batches is the number
    of cores they occupy. The first batch (workers starting, queue empty) is not counted.
    """

    WINDOW = 8

    def __init__(self, active: bool) -> None:
        self.full = torch.get_num_threads()
        self.active = active and self.full > 1
        self.batches = 0
        self.clock = time.perf_counter()
        self.recent: deque[tuple[float, float]] = deque(maxlen=self.WINDOW)

    def update(self, decode_seconds: float) -> None:
        """Count one batch (``decode_seconds``: the workers' time decoding it); set the thread count."""
        now = time.perf_counter()
        wall, self.clock = now - self.clock, now
        self.batches += 1
        if not self.active or self.batches == 1:
            return
        self.recent.append((decode_seconds, wall))
        busy = sum(d for d, _ in self.recent) / max(sum(w for _, w in self.recent), 1e-9)
        wanted = int(min(self.full, max(1, round(self.full - busy))))
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)

    def restore(self) -> None:
        """Give the model back the threads it had before the job."""
        if self.active:
            torch.set_num_threads(self.full)


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers together already use every core this rank has


def decoded_portions(decoder: PortionDecoder, workers: int, *, pin_memory: bool = False, borrowed: bool = False) -> Iterator[Decoded]:
    """Yield :class:`Decoded` portions in batch order; ``workers`` processes decode ahead (0: in this process).

    With workers, each portion's levels are decoded into a `decode_ring.DecodeRing` in shared memory. They are
    copied out of it (into page-locked memory when ``pin_memory``), unless ``borrowed``: then a portion's
    ``levels`` are a view into the ring, valid until the next portion is asked for (the encode job reads a
    portion once; ``borrowed`` saves it a copy into fresh pages per batch). ``pin_memory`` always copies.

    Raises:
        DecodeWorkerDied: a worker process died; names the first batch that did not arrive (a worker may
            die while decoding a later one: what it had finished but not yet sent is lost with it).
        DecodeFailed: ``/dev/shm`` is too small for the ring (the message says what to change).
    """
    if workers and multiprocessing.current_process().daemon:
        raise ValueError(f"workers={workers}: this is a daemonic process, which cannot start decode workers; use 0")
    largest = max((len(decoder.portion(index)) for index in range(len(decoder))), default=0)
    if workers == 0 or largest == 0:  # no workers, or nothing for this rank to decode (more ranks than images)
        for index in range(len(decoder)):
            yield decoder[index]
        return
    parts = max(1, min(workers, largest))
    ring = _ring_for(decoder, workers, parts, largest)
    iterator = _iterate_without_sigchld_handler(_loader(_Pieces(decoder, parts, ring), workers))
    copy = pin_memory or not borrowed
    try:
        for index in range(len(decoder)):
            if borrowed and index:
                ring.check(index - 1)  # the portion the caller has just given back was intact while it read it
            try:
                pieces = [next(iterator) for _ in range(parts)]
            except (RuntimeError, OSError, EOFError) as err:  # "worker (pid N) exited unexpectedly", a pipe cut mid-item
                text = " ".join(f"{type(err).__name__}: {err}".split())
                raise DecodeWorkerDied(f"a decode worker died; batch {index + 1} of {len(decoder)} never arrived: {text}") from None
            portion = _assemble(index, len(decoder.portion(index)), pieces, ring, copy, pin_memory)
            ring.check(index)  # no worker began on this buffer before its rows were read (or copied)
            yield portion
        if borrowed and len(decoder):
            ring.check(len(decoder) - 1)
    finally:
        del iterator  # stops the workers now, not whenever the garbage collector gets to it


def _loader(pieces: _Pieces, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        pieces,
        batch_size=None,  # items are pieces of portions already
        shuffle=False,
        num_workers=workers,
        prefetch_factor=PREFETCH_PER_WORKER,
        persistent_workers=False,
        pin_memory=False,  # _assemble pins the whole portion, in one copy
        worker_init_fn=_worker_init,
        collate_fn=_as_is,
    )


def _ring_for(decoder: PortionDecoder, workers: int, parts: int, largest: int) -> DecodeRing:
    """The ring for ``workers`` splitting portions of up to ``largest`` items in ``parts`` (see `decode_ring`
    for its size). An item's shape and dtype are those of the decode function's answer for no sources."""
    empty = decoder.decode([])[0]
    slots = slots_needed(PREFETCH_PER_WORKER * workers, parts)
    return DecodeRing(slots, largest, parts, tuple(empty.shape[1:]), empty.dtype)


def _iterate_without_sigchld_handler(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """``iter(loader)``, with the SIGCHLD handler that torch installs for it taken away again.

    That handler raises in the main thread wherever it happens to be (in the middle of a collective, say);
    without it a dead worker is noticed inside ``next()`` (the DataLoader polls its workers every few
    seconds while it waits), where the job turns it into an orderly stop that the other ranks learn of.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGCHLD) if main and hasattr(signal, "SIGCHLD") else None
    iterator = iter(loader)
    if previous is not None:
        signal.signal(signal.SIGCHLD, previous)
    return iterator


def decode_fixed(
    sources: Sequence[Any], image_size: int, opener: Any = None, out: Optional[torch.Tensor] = None, preprocessing: Any = None
) -> tuple[torch.Tensor, None, list[Optional[str]]]:
    """A fixed-resolution tower's portion: uint8 ``(n, 3, S, S)`` levels (`processing.decode_files`; ``preprocessing``:
    a timm / open_clip checkpoint's own resize and crop)."""
    from tp_siglip import processing

    levels, reasons = processing.decode_files(sources, image_size, opener=opener, out=out, preprocessing=preprocessing)
    return levels, None, reasons


def decode_naflex(
    sources: Sequence[Any], patch_size: int, max_num_patches: int, opener: Any = None, out: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, list[Optional[str]]]:
    """A NaFlex tower's portion: uint8 patches and grids (`processing_naflex.decode_naflex_files`)."""
    from tp_siglip import processing_naflex

    return processing_naflex.decode_naflex_files(
        sources, patch_size=patch_size, max_num_patches=max_num_patches, opener=opener, out=out
    )


def _as_is(item: Decoded) -> Decoded:
    return item
