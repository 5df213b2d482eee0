"""A CPU tensor that says it lives on a CUDA device, for tests of code that branches on ``device.type == "cuda"``.

`FakeCuda` wraps a CPU tensor; every op runs on the CPU data and its tensor results say they are on the
wrapped device again (a copy into a plain tensor stays plain). `no_cuda_init` keeps torch's bindings from
initialising CUDA (which a CPU-only build refuses) when they meet such a tensor. Only what the tests need:
no streams, no pinned memory (mock those).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch.utils._pytree import tree_leaves, tree_map


class FakeCuda(torch.Tensor):
    """``inner`` (a CPU tensor) presented as a tensor on ``device`` (e.g. ``cuda:1``)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, device: torch.device) -> FakeCuda:
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype, device=device)

    def __init__(self, inner: torch.Tensor, device: torch.device) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        device = next(a.device for a in tree_leaves((args, kwargs)) if isinstance(a, FakeCuda))

        def unwrap(a: Any) -> Any:
            if isinstance(a, FakeCuda):
                return a.inner
            return torch.device("cpu") if isinstance(a, torch.device) and a.type == "cuda" else a

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func is torch.ops.aten.copy_.default and not isinstance(args[0], FakeCuda):
            return args[0]  # a copy to the host stays on the host
        return tree_map(lambda o: FakeCuda(o, device) if isinstance(o, torch.Tensor) else o, out)


@contextlib.contextmanager
def no_cuda_init() -> Iterator[None]:
    """Within the block, torch's lazy CUDA initialisation does nothing (a CPU-only build would refuse it)."""
    with mock.patch("torch.cuda._lazy_init", lambda: None):
        yield
