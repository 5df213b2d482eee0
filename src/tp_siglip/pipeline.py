"""The encode job's input pipeline: images decoded in worker processes, ahead of the forward that needs them.

The job walks its images in batches; every rank that deals out a batch walks the same batches. Rank ``r``
of ``G`` decodes only its portion of each batch (`portion_bounds`: contiguous, near-equal slices), so each
image is decoded once. What a worker hands back is uint8: the resized ``(n, 3, H, W)`` levels of a
fixed-resolution tower, or a NaFlex tower's ``(n, N, 3*p*p)`` patches and ``(n, 2)`` grids, plus one reason
per unreadable image. Normalising to the model's dtype happens later, on the model's device
(`processing.to_pixel_values`), by the rank that decoded the images: in a tensor group too, as the group
runs each batch split by rows (`parallel.split_batch`).

Choices made:

* **torch's own machinery**: a ``torch.utils.data.DataLoader`` with ``num_workers`` processes (PIL holds
  the GIL between its calls, so threads alone would not decode in parallel), each decoding whole portions,
  ``prefetch_factor`` of them queued per worker (a bounded queue: memory stays flat), sent back through
  torch's shared-memory transport (into pinned memory for a CUDA model). Each worker runs one intra-op
  thread. ``workers=0`` decodes in the main process, batch by batch, as a plain generator. (A ring of
  shared buffers that the workers decoded into did not pay 5 % on a quiet machine:
  ``benchmarks/results/2026-12-07-encode-machinery-ab.md``.)
* **A bad image is a reason, never a dead worker**: decoding goes through `processing.read_files`,
  which turns every per-file failure into a one-line reason. A worker that dies anyway (killed for
  memory, a crash inside a decoder) surfaces as :class:`DecodeWorkerDied` naming the batch, so the job
  can stop every rank cleanly.
* **Threads of a CPU model** (`MainThreads`): the cores the decode workers leave free (measured from
  their own decode seconds), at least one, so workers and model do not fight over the same cores.
* **Default worker count** (`default_workers`): the CPU cores this process may use, divided by the ranks
  on this node (``LOCAL_WORLD_SIZE``), 1 to 16; none in a daemonic process (it may not have children).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

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


class DecodeFailed(RuntimeError):
    """The decode workers cannot deliver a portion (a bad image is never this: it is a reason)."""


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

    def pin_memory(self) -> Decoded:
        """The levels in page-locked memory (what DataLoader's ``pin_memory`` thread calls, for a CUDA model)."""
        return dataclasses.replace(self, levels=self.levels.pin_memory())


class PortionDecoder(torch.utils.data.Dataset):
    """Item ``b`` = this rank's portion of batch ``b``, decoded (a map-style dataset over batch indices).

    Args:
        batches: Each batch's sources (paths, or whatever ``opener`` opens), the same on every rank.
        rank, group_size: This rank's place among the ranks that deal out each batch.
        decode: ``decode(sources) -> (levels, spatial_shapes or None, reasons)``; must be picklable (a
            module-level function or a ``functools.partial`` of one) when workers are used.
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
        """This rank's portion of batch ``index``, decoded and timed."""
        start = time.perf_counter()
        levels, shapes, reasons = self.decode(self.portion(index))
        return Decoded(index, levels, shapes, reasons, time.perf_counter() - start)


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


def decoded_portions(decoder: PortionDecoder, workers: int, *, pin_memory: bool = False) -> Iterator[Decoded]:
    """Yield :class:`Decoded` portions in batch order; ``workers`` processes decode ahead (0: in this process),
    into page-locked memory when ``pin_memory``.

    Raises:
        DecodeWorkerDied: a worker process died; names the first batch that did not arrive (a worker may
            die while decoding a later one: what it had finished but not yet sent is lost with it).
    """
    if workers and multiprocessing.current_process().daemon:
        raise ValueError(f"workers={workers}: this is a daemonic process, which cannot start decode workers; use 0")
    if workers == 0 or not any(decoder.portion(index) for index in range(len(decoder))):
        for index in range(len(decoder)):  # no workers, or nothing for this rank to decode (more ranks than images)
            yield decoder[index]
        return
    loader = torch.utils.data.DataLoader(
        decoder, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=PREFETCH_PER_WORKER,
        pin_memory=pin_memory, worker_init_fn=_worker_init, collate_fn=_as_is,
    )  # fmt: skip
    iterator = _iterate_without_sigchld_handler(loader)
    try:
        for index in range(len(decoder)):
            try:
                yield next(iterator)
            except (RuntimeError, OSError, EOFError) as err:  # "worker (pid N) exited unexpectedly", a pipe cut mid-item
                text = " ".join(f"{type(err).__name__}: {err}".split())
                raise DecodeWorkerDied(f"a decode worker died; batch {index + 1} of {len(decoder)} never arrived: {text}") from None
    finally:
        del iterator  # stops the workers now, not whenever the garbage collector gets to it


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
