"""Groups of spawned ranks that run benchmark commands together.

A `RankGroup` is ``world`` processes started with torch.multiprocessing (spawn), each with ``threads``
intra-op threads, joined into one process group (gloo through a ``file://`` store on the CPU, NCCL on
GPUs) when ``world > 1``. They stay alive between commands, so several set-ups can be loaded side by
side and timed in turn. ``group.call(command, *args)`` runs ``command(state, *args)`` on every rank and
returns the per-rank results; ``command`` is a function defined at the top level of a module under
``benchmarks`` (it travels to the ranks by its qualified name), ``state`` a per-rank dict (``rank``,
``world``, ``device``, and whatever commands keep there, e.g. ``model``). A command's exception comes
back to the caller as a ``RuntimeError`` naming the rank.

`forward_rounds` is the timed forward every multi-rank section uses: each forward sits between two
barriers and is timed on each rank, so rank 0's times are the group's wall time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import outputs_of, pixels, sync

Command = Callable[..., Any]


def _rank_main(rank: int, world: int, threads: int, store: str, device_kind: str, inbox: Any, outbox: Any) -> None:
    """A spawned rank: join the group, then serve commands from ``inbox`` until ``None``."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    if world > 1:
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=900)
        )
    state: dict[str, Any] = {"rank": rank, "world": world, "device": device}
    try:
        while True:
            message = inbox.get()
            if message is None:
                break
            command, args = message
            try:
                outbox.put((rank, command(state, *args), None))
            except BaseException:  # reported to the parent, which raises
                outbox.put((rank, None, traceback.format_exc()))
    finally:
        state.clear()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def barrier(state: dict) -> None:
    """Wait for every rank of the group (nothing to do at one rank)."""
    if state["world"] > 1:
        if state["device"].type == "cuda":
            dist.barrier(device_ids=[state["device"].index])
        else:
            dist.barrier()


def forward_rounds(state: dict, model: torch.nn.Module, image: int, batch: int, rounds: int, keep_outputs: bool) -> dict:
    """``rounds`` forwards of one fixed batch, each between two barriers.

    Returns this rank's times and, on rank 0 when ``keep_outputs``, the first forward's outputs as numpy
    arrays (they travel back through a queue)."""
    device = state["device"]
    x = pixels(batch, image, seed=2000 + batch, device=device)
    times, kept = [], None
    with torch.inference_mode():
        for _ in range(rounds):
            barrier(state)
            sync(device)
            start = time.perf_counter()
            out = model(x)
            sync(device)
            barrier(state)
            times.append(time.perf_counter() - start)
            if keep_outputs and kept is None and state["rank"] == 0:
                kept = {k: v.numpy() for k, v in outputs_of(out).items()}
            del out
    return {"times": times, "outputs": kept}


class RankGroup:
    """``world`` spawned processes with ``threads`` intra-op threads each, serving commands together."""

    _ids = itertools.count()

    def __init__(self, world: int, threads: int, workdir: Path, device: torch.device) -> None:
        ctx = mp.get_context("spawn")
        store = workdir / f"store-{os.getpid()}-{next(self._ids)}"
        self.world = world
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the children only
        try:
            self.procs = [
                ctx.Process(
                    target=_rank_main,
                    args=(rank, world, threads, str(store), device.type, self.inboxes[rank], self.outbox),
                    daemon=True,
                )
                for rank in range(world)
            ]
            for proc in self.procs:
                proc.start()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved

    def call(self, command: Command, *args: Any, timeout: float = 1800.0) -> list[Any]:
        """``command(state, *args)`` on every rank; the results in rank order."""
        for inbox in self.inboxes:
            inbox.put((command, args))
        results: list[Any] = [None] * self.world
        errors = []
        for _ in range(self.world):
            rank, value, error = self.outbox.get(timeout=timeout)
            results[rank] = value
            if error:
                errors.append(f"rank {rank} of {self.world}:\n{error}")
        if errors:
            raise RuntimeError(f"{command.__name__} failed:\n" + "\n".join(errors))
        return results

    def close(self) -> None:
        for inbox in self.inboxes:
            with contextlib.suppress(OSError, ValueError):
                inbox.put(None)
        for proc in self.procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
