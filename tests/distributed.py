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

TIMEOUT = timedelta(seconds=120)


def _entry(rank: int, world_size: int, store: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, workdir: Path, fn: Callable[..., Any], *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; raise if any rank fails."""
    store = Path(workdir) / f"store-{os.getpid()}-{id(args)}-{world_size}"
    if store.exists():
        store.unlink()
    mp.start_processes(_entry, args=(world_size, str(store), fn, args), nprocs=world_size, join=True, start_method="spawn")
