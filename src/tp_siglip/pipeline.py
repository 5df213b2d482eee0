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

from tp_siglip import processing, processing_naflex
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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # not Linux
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
    """One rank's decoded portion of one batch."""

    batch: int
    levels: torch.Tensor  # uint8: (n, 3, H, W), or NaFlex (n, N, 3*p*p)
    spatial_shapes: Optional[torch.Tensor]  # NaFlex (n, 2) int64, else None
    reasons: list[Optional[str]]
    seconds: float  # decode time in the worker

    @property
    def count(self) -> int:
        return len(self.reasons)


class PortionDecoder(torch.utils.data.Dataset):
    """Item ``b`` = this rank (``rank`` of ``group_size``)'s portion of batch ``b``, decoded.

    ``batches``: each batch's sources, the same on every rank. ``decode(sources, out=None) -> (levels,
    spatial_shapes or None, reasons)`` writes the levels into ``out`` (uint8, one row per source) when given;
    with workers it must be picklable (a module-level function or a ``functools.partial`` of one).
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


class _Pieces(torch.utils.data.Dataset):
    """Item ``i`` = piece ``i % parts`` of portion ``i // parts`` (contiguous, near-equal): the workers split
    every portion between them, so they all start on the first batch at once (the queue fills in a piece's
    time, not a portion's) and none sits idle while another decodes the last batch alone. A worker decodes
    its piece straight into the portion's rows of ``ring`` and sends back only its grids (numpy: pickled
    inline, no shared segment of their own), reasons and seconds."""

    def __init__(self, decoder: PortionDecoder, parts: int, ring: DecodeRing) -> None:
        self.decoder, self.parts, self.ring = decoder, parts, ring

    def __len__(self) -> int:
        return len(self.decoder) * self.parts

    def __getitem__(self, item: int) -> tuple[Optional[np.ndarray], list[Optional[str]], float]:
        index, part = divmod(item, self.parts)
        sources = self.decoder.portion(index)
        start, stop = portion_bounds(len(sources), self.parts, part)
        decoded = self.decoder.decode_sources(index, sources[start:stop], out=self.ring.piece(index, part, start, stop))
        shapes = None if decoded.spatial_shapes is None else decoded.spatial_shapes.numpy()
        return shapes, decoded.reasons, decoded.seconds


class MainThreads:
    """The main process's intra-op threads while decode workers share its CPU cores with a model on the CPU.

    The model gets the cores the workers leave free, measured by the workers' own decode seconds over the
    wall-clock seconds of the last ``WINDOW`` batches, not by the model's waits: an OpenMP region with a
    thread behind a busy worker costs several times its work, so a model slowed that way looks model-bound.
    """

    WINDOW = 8

    def __init__(self, active: bool) -> None:
        self.full = torch.get_num_threads()
        self.active = active and self.full > 1
        self.clock: Optional[float] = None  # when the last batch ended
        self.recent: deque[tuple[float, float]] = deque(maxlen=self.WINDOW)

    def update(self, decode_seconds: float) -> None:
        """Count one batch (``decode_seconds``: the workers' time decoding it); set the thread count."""
        now = time.perf_counter()
        if self.active and self.clock is not None:  # the first batch (workers starting, queue empty) is not counted
            self.recent.append((decode_seconds, now - self.clock))
            busy = sum(d for d, _ in self.recent) / max(sum(w for _, w in self.recent), 1e-9)  # the cores they occupy
            wanted = int(min(self.full, max(1, round(self.full - busy))))
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)
        self.clock = now

    def restore(self) -> None:
        """Give the model back the threads it had before the job."""
        if self.active:
            torch.set_num_threads(self.full)


def decoded_portions(
    decoder: PortionDecoder, workers: int, *, pin_memory: bool = False, borrowed: bool = False
) -> Iterator[Decoded]:
    """Yield :class:`Decoded` portions in batch order; ``workers`` processes decode ahead (0: in this process).

    With workers, levels are decoded into a `decode_ring.DecodeRing` in shared memory and copied out of it
    (into page-locked memory when ``pin_memory``), unless ``borrowed`` and not ``pin_memory``: then they are
    a view into the ring, valid until the next portion is asked for (saving a copy per batch).

    Raises:
        DecodeWorkerDied: a worker process died; names the first batch that did not arrive (a worker may
            die while decoding a later one: what it had finished but not yet sent is lost with it).
        DecodeFailed: ``/dev/shm`` is too small for the ring (the message says what to change).
    """
    if workers and multiprocessing.current_process().daemon:
        raise ValueError(f"workers={workers}: this is a daemonic process, which cannot start decode workers; use 0")
    largest = max((len(decoder.portion(index)) for index in range(len(decoder))), default=0)
    if workers == 0 or largest == 0:  # no workers, or nothing for this rank to decode (more ranks than images)
        yield from (decoder[index] for index in range(len(decoder)))
        return
    parts = max(1, min(workers, largest))
    ring = _ring_for(decoder, workers, parts, largest)
    loader = torch.utils.data.DataLoader(  # items are pieces already; a portion is pinned below, in one copy
        _Pieces(decoder, parts, ring), batch_size=None, num_workers=workers, prefetch_factor=PREFETCH_PER_WORKER,
        worker_init_fn=_worker_init, collate_fn=_as_is,
    )
    iterator = _iterate_without_sigchld_handler(loader)
    try:
        for index in range(len(decoder)):
            if borrowed and index:
                ring.check(index - 1)  # the portion the caller has just given back was intact while it read it
            try:
                shapes, reasons, seconds = zip(*[next(iterator) for _ in range(parts)])
            except (RuntimeError, OSError, EOFError) as err:  # "worker (pid N) exited unexpectedly", a pipe cut mid-item
                text = " ".join(f"{type(err).__name__}: {err}".split())
                lost = f"batch {index + 1} of {len(decoder)} never arrived"
                raise DecodeWorkerDied(f"a decode worker died; {lost}: {text}") from None
            levels = ring.portion(index, len(decoder.portion(index)))
            if pin_memory:
                levels = torch.empty(levels.shape, dtype=levels.dtype, pin_memory=True).copy_(levels)
            elif not borrowed:
                levels = levels.clone()
            ring.check(index)  # no worker began on this buffer before its rows were read (or copied)
            grids = None if shapes[0] is None else torch.from_numpy(np.concatenate(shapes))
            yield Decoded(index, levels, grids, [reason for piece in reasons for reason in piece], sum(seconds))
        if borrowed:
            ring.check(len(decoder) - 1)
    finally:
        del iterator  # stops the workers now, not whenever the garbage collector gets to it


def _ring_for(decoder: PortionDecoder, workers: int, parts: int, largest: int) -> DecodeRing:
    """The ring for ``decoder``'s portions; an item's shape and dtype: those of its answer for no sources."""
    empty = decoder.decode([])[0]
    return DecodeRing(slots_needed(PREFETCH_PER_WORKER * workers, parts), largest, parts, tuple(empty.shape[1:]), empty.dtype)


def _iterate_without_sigchld_handler(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """``iter(loader)``, without the SIGCHLD handler that torch installs for it: that handler raises in the main
    thread wherever it is (in the middle of a collective, say); without it a dead worker is noticed inside
    ``next()`` (the DataLoader polls its workers while it waits), where the job stops in order and the other
    ranks learn of it."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGCHLD) if main and hasattr(signal, "SIGCHLD") else None
    iterator = iter(loader)
    if previous is not None:
        signal.signal(signal.SIGCHLD, previous)
    return iterator


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers together already use every core this rank has


def _as_is(item: Any) -> Any:
    return item  # not the default collate, which would turn a piece's numpy grids into a tensor in shared memory


def decode_fixed(
    sources: Sequence[Any], image_size: int, opener: Any = None, out: Optional[torch.Tensor] = None, preprocessing: Any = None
) -> tuple[torch.Tensor, None, list[Optional[str]]]:
    """A fixed-resolution tower's portion: uint8 ``(n, 3, S, S)`` levels (`processing.decode_files`; ``preprocessing``:
    a timm / open_clip checkpoint's own resize and crop)."""
    levels, reasons = processing.decode_files(sources, image_size, opener=opener, out=out, preprocessing=preprocessing)
    return levels, None, reasons


def decode_naflex(
    sources: Sequence[Any], patch_size: int, max_num_patches: int, opener: Any = None, out: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, list[Optional[str]]]:
    """A NaFlex tower's portion: uint8 patches and grids (`processing_naflex.decode_naflex_files`)."""
    return processing_naflex.decode_naflex_files(
        sources, patch_size=patch_size, max_num_patches=max_num_patches, opener=opener, out=out
    )
