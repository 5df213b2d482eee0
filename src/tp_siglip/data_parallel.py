"""Data-parallel mode: every rank holds the whole tower and encodes its share of the batch.

`DataParallelEncoder` wraps a single-rank `SiglipVisionTransformer` (weights replicated, no tensor
parallelism inside): it splits each batch over the ranks of its group, runs the local model on its share
and all-gathers the outputs, so every rank returns the full result, like tensor mode. The model itself
knows nothing about it.

Choices:

* **Every rank passes the whole batch** (as in tensor mode); the split is deterministic, so ranks agree
  on it without talking. Before splitting, one small collective checks that every rank got the same,
  valid batch (`agree_on_inputs`): a wrong batch on one rank would otherwise hang the gather or mix
  images of different batches.
* **Shares are balanced by cost, not by count**: ``costs`` (patches per image) go to the least-loaded
  rank, largest first. Images of one fixed size cost the same, which gives contiguous, near-equal
  shares. Outputs are put back in input order.
* **A rank with nothing to do** (fewer images than ranks) encodes one image to learn the shapes of the
  outputs and sends none of it: no extra collective, and it costs no wall time (the busy ranks take
  at least as long).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from tp_siglip.model import SiglipVisionOutput
from tp_siglip.parallel import ProcessGroup, agree_on_inputs, all_gather_batch, group_rank, group_size


def balanced_shares(costs: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``costs`` for each of ``parts`` ranks, so that the largest total cost is small.

    Greedy longest-processing-time: the costliest item first, each to the least-loaded rank (ties: the
    lower rank); each share in ascending order. Equal costs give contiguous, near-equal shares.
    """
    if parts < 1:
        raise ValueError(f"cannot split a batch over {parts} ranks; expected at least 1")
    loads = [0] * parts
    shares: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(parts), key=lambda r: (loads[r], r))
        shares[target].append(index)
        loads[target] += costs[index]
    for share in shares:
        share.sort()
    if len(set(costs)) <= 1:  # one cost: keep each share contiguous (cheaper slicing, same balance)
        sizes = [len(s) for s in shares]
        starts = [sum(sizes[:r]) for r in range(parts)]
        shares = [list(range(start, start + size)) for start, size in zip(starts, sizes)]
    return shares


class DataParallelEncoder(nn.Module):
    """Runs ``module`` on this rank's share of each batch and gathers every rank's outputs.

    ``module`` must be an unsharded model (built without a process group); ``group`` is the set of
    ranks the batch is split over (``None``: one rank, the wrapper is a pass-through).
    """

    parallel = "data"

    def __init__(self, module: nn.Module, group: Optional[ProcessGroup]) -> None:
        super().__init__()
        if getattr(module, "world_size", 1) != 1:
            raise ValueError("DataParallelEncoder needs an unsharded model (built without a process group)")
        self.module = module
        self.group = group

    # the model's descriptive attributes, so callers can treat both modes alike
    config = property(lambda self: self.module.config)
    use_head = property(lambda self: self.module.use_head)
    dtype = property(lambda self: self.module.dtype)
    device = property(lambda self: self.module.device)
    world_size = property(lambda self: group_size(self.group))
    rank = property(lambda self: group_rank(self.group))

    @property
    def check_finite(self) -> bool:
        return self.module.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self.module.check_finite = value

    @property
    def check_inputs_agree(self) -> str:
        return self.module.check_inputs_agree

    @check_inputs_agree.setter
    def check_inputs_agree(self, value: str) -> None:
        self.module.check_inputs_agree = value

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> SiglipVisionOutput:
        """``module(pixel_values, ...)`` on this rank's images; the full outputs, in input order, on every rank.

        Every rank must pass the whole, same batch: the ranks first check that they did, and that it is
        valid everywhere (`agree_on_inputs` over the module's ``check_inputs``).
        """
        size = group_size(self.group)
        if size == 1:
            return self.module(pixel_values, *args, **kwargs)
        check = lambda: self.module.check_inputs(pixel_values, *args, **kwargs)  # noqa: E731
        agree_on_inputs(self.group, check, mode=self.check_inputs_agree)
        shares = balanced_shares([1] * pixel_values.shape[0], size)
        mine = shares[group_rank(self.group)]
        # an idle rank (fewer images than ranks) encodes one image to learn the output shapes, sends none
        local = self.module(pixel_values[mine or [0]], *args, **kwargs)
        return gather_outputs(local, [len(share) for share in shares], shares, self.group)


def gather_outputs(
    local: SiglipVisionOutput, sizes: list[int], shares: list[list[int]], group: ProcessGroup
) -> SiglipVisionOutput:
    """All-gather each output over ``group`` (rank ``r`` sends its first ``sizes[r]`` rows) in input order."""
    order = torch.tensor([i for share in shares for i in share]).argsort()
    mine = sizes[group_rank(group)]

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return all_gather_batch(tensor[:mine].contiguous(), sizes, group)[order.to(tensor.device)]

    return SiglipVisionOutput(
        last_hidden_state=gather(local.last_hidden_state),
        pooler_output=None if local.pooler_output is None else gather(local.pooler_output),
        hidden_states=None if local.hidden_states is None else tuple(gather(h) for h in local.hidden_states),
    )
