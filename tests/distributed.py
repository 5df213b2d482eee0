"""Run a function on N spawned CPU ranks joined by gloo, the way the tests need it.

Each rank gets one intra-op thread (so N ranks share the machine's cores fairly), a ``file://`` store in
the test's temporary directory (no TCP ports to clash) and a process-group timeout, so a broken rank
makes the others fail instead of hanging the suite.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load, save

TIMEOUT = timedelta(seconds=120)


def _pack(value: Any) -> Any:
    """``value`` with every tensor replaced by its safetensors bytes (no shared memory, no tensor pickling)."""
    if isinstance(value, torch.Tensor):
        return ("__tensor__", save({"t": value.detach().contiguous()}))
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pack(v) for v in value)
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__tensor__":
        return load(value[1])["t"]
    if isinstance(value, dict):
        return {k: _unpack(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_unpack(v) for v in value)
    return value


def _entry(rank: int, world_size: int, store: str, fn: Callable[..., Any], args: tuple[Any, ...], results: Any) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        results.put((rank, _pack(fn(rank, world_size, *args))))
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, workdir: Path, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return each rank's result.

    Raise if any rank fails. Results (tensors, dicts and lists of them, plain values) come back through a
    queue, drained while the ranks run so that a large result never blocks its sender.
    """
    store = Path(workdir) / f"store-{os.getpid()}-{id(args)}-{world_size}"
    if store.exists():
        store.unlink()
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(
        _entry, args=(world_size, str(store), fn, args, results), nprocs=world_size, join=False, start_method="spawn"
    )
    got: dict[int, Any] = {}
    done = False
    while not done:
        done = context.join(timeout=0.1)
        while not results.empty():
            rank, value = results.get()
            got[rank] = _unpack(value)
    return [got[rank] for rank in range(world_size)]


def _pool_entry(rank: int, world_size: int, store: str, inbox: Any, outbox: Any) -> None:
    import traceback

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        while True:
            task = inbox.get()
            if task is None:
                break
            fn, args = task
            try:
                outbox.put((rank, fn(rank, world_size, *args), None))
            except BaseException:  # report, keep serving: the test decides
                outbox.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankPool:
    """``world_size`` long-lived gloo ranks that run one task after another (saves a spawn per task)."""

    def __init__(self, world_size: int, workdir: Path) -> None:
        ctx = mp.get_context("spawn")
        store = Path(workdir) / f"pool-store-{world_size}"
        if store.exists():
            store.unlink()
        self.world_size = world_size
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.outbox = ctx.Queue()
        self.procs = [
            ctx.Process(target=_pool_entry, args=(r, world_size, str(store), self.inboxes[r], self.outbox), daemon=True)
            for r in range(world_size)
        ]
        for proc in self.procs:
            proc.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; return the results by rank or raise."""
        for inbox in self.inboxes:
            inbox.put((fn, args))
        results: list[Any] = [None] * self.world_size
        errors = []
        for _ in range(self.world_size):
            rank, value, error = self.outbox.get(timeout=timeout)
            results[rank] = value
            if error:
                errors.append(f"rank {rank}:\n{error}")
        if errors:
            raise AssertionError("\n".join(errors))
        return results

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def encode_main_captured(argv: list[str]) -> tuple[int, str, str]:
    """``tp_siglip.encode.main(argv)`` in a rank of a pool: ``(exit status, stdout, stderr)`` (logging's handlers
    cleared before and after, so each run installs its own, writing to the captured stderr)."""
    import contextlib
    import io
    import logging

    from tp_siglip import encode

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    root.handlers.clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = encode.main(argv)
    finally:
        root.handlers.clear()
    return code, out.getvalue(), err.getvalue()
