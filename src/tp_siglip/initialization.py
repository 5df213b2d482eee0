"""Random initialisation the way SigLIP's reference (big_vision, and transformers after it) does it.

Only used when a model is built with random weights (fine-tuning from scratch, tests); loading a
checkpoint never runs these. The functions work in place and return their tensor, like ``torch.nn.init``.
"""

from __future__ import annotations

import math

import torch

# std of a standard normal truncated to [-2, 2]; dividing by it makes the truncated draw have unit std
_TRUNCATED_STD = 0.87962566103423978


@torch.no_grad()
def trunc_normal_tf_(
    tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> torch.Tensor:
    """TensorFlow-style truncated normal: draw N(0, 1) truncated to [a, b], then scale by ``std`` and shift.

    (PyTorch's ``trunc_normal_`` truncates after scaling instead, so its bounds are absolute.)
    """
    torch.nn.init.trunc_normal_(tensor, mean=0.0, std=1.0, a=a, b=b)
    return tensor.mul_(std).add_(mean)


def _fans(tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.dim() < 2:
        raise ValueError(f"fan in/out needs a tensor with at least 2 dimensions, got shape {tuple(tensor.shape)}")
    receptive = math.prod(tensor.shape[2:]) if tensor.dim() > 2 else 1
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


@torch.no_grad()
def variance_scaling_(
    tensor: torch.Tensor, scale: float = 1.0, mode: str = "fan_in", distribution: str = "normal"
) -> torch.Tensor:
    """Fill ``tensor`` with variance ``scale / fan`` (``fan_in``, ``fan_out`` or ``fan_avg``).

    ``distribution`` is ``"truncated_normal"``, ``"normal"`` or ``"uniform"``.
    """
    fan_in, fan_out = _fans(tensor)
    fans = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}
    if mode not in fans:
        raise ValueError(f"mode {mode!r} is not one of {sorted(fans)}")
    variance = scale / fans[mode]
    if distribution == "truncated_normal":
        return trunc_normal_tf_(tensor, std=math.sqrt(variance) / _TRUNCATED_STD)
    if distribution == "normal":
        return tensor.normal_(0.0, math.sqrt(variance))
    if distribution == "uniform":
        bound = math.sqrt(3.0 * variance)
        return tensor.uniform_(-bound, bound)
    raise ValueError(f"distribution {distribution!r} is not one of ['normal', 'truncated_normal', 'uniform']")


def lecun_normal_(tensor: torch.Tensor) -> torch.Tensor:
    """LeCun normal: truncated normal with variance 1 / fan_in."""
    return variance_scaling_(tensor, mode="fan_in", distribution="truncated_normal")


def default_flax_embed_init(tensor: torch.Tensor) -> torch.Tensor:
    """Flax's default embedding init: normal with variance 1 / fan_in."""
    return variance_scaling_(tensor, mode="fan_in", distribution="normal")
