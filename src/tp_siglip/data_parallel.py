"""Data-parallel mode: every rank holds the whole tower and encodes its portion of the batch.

`DataParallelEncoder` wraps a single-rank `SiglipVisionTransformer` (weights replicated, no tensor
parallelism inside): it splits each batch over the ranks of its group, runs the local model on its portion
and all-gathers the outputs, so every rank returns the full result, like tensor mode. The model itself
knows nothing about it.

Choices:

* **Every rank passes the whole batch** (as in tensor mode); the split is deterministic, so ranks agree
  on it without talking. Before splitting, one small collective checks that every rank got the same,
  valid batch (`agree_on_inputs` over the model's own ``check_inputs``): a wrong batch on one rank would
  otherwise hang the gather or mix images of different batches.
* **Shares are balanced by cost, not by count** (`balance_by_cost`): a NaFlex image costs its valid
  patches, and each rank trims the padding none of its images needs, so one big image and many small
  ones spread evenly; images of one fixed size cost the same and get contiguous, near-equal portions
  (`split_by_count`). Outputs are put back in input order. Greedy longest-processing-time is within 4/3
  of the best split (Graham's bound) and deterministic, so ranks agree on it without talking.
* **A rank with nothing to do** (fewer images than ranks) encodes one image to learn the shapes of the
  outputs and sends none of it: no extra collective, and it costs no wall time (the busy ranks take
  at least as long).
"""

from __future__ import annotations

import heapq
import inspect
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from tp_siglip.model import SiglipVisionOutput, as_asked
from tp_siglip.parallel import Communicator, ProcessGroup, agree_on_inputs, communicator_for, group_rank, group_size


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_costs(costs: object, parts: object) -> tuple[list[int], int]:
    if isinstance(costs, (str, bytes)) or not isinstance(costs, Sequence):
        raise TypeError(f"costs must be a sequence of non-negative ints, got {type(costs).__name__}")
    values = list(costs)
    for index, cost in enumerate(values):
        if not _is_int(cost):
            raise TypeError(f"costs[{index}] must be an int, got {cost!r}")
        if cost < 0:
            raise ValueError(f"costs[{index}] must be non-negative, got {cost}")
    if not _is_int(parts):
        raise TypeError(f"parts must be a positive int, got {parts!r}")
    if parts < 1:  # type: ignore[operator]
        raise ValueError(f"parts must be a positive int, got {parts!r}")
    return values, int(parts)  # type: ignore[arg-type]


def balance_by_cost(costs: Sequence[int], parts: int) -> list[list[int]]:
    """Share item indices out to ``parts`` ranks so the largest per-rank total cost is small.

    Greedy longest-processing-time: items by cost descending (ties: lower index first), each to the part
    with the least load so far (ties: lower part number). Every index appears exactly once. Each part's
    indices are sorted ascending, and a part may be empty when there are fewer items than parts.
    """
    values, count = _check_costs(costs, parts)
    heap = [(0, part) for part in range(count)]
    assignment: list[list[int]] = [[] for _ in range(count)]
    for index in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        load, part = heapq.heappop(heap)
        assignment[part].append(index)
        heapq.heappush(heap, (load + values[index], part))
    return [sorted(members) for members in assignment]


def split_by_count(costs: Sequence[int], parts: int) -> list[list[int]]:
    """Contiguous split by number of items, ignoring cost (the first ``len % parts`` parts get one extra).

    Same signature as :func:`balance_by_cost` so the two can be swapped and compared.
    """
    values, count = _check_costs(costs, parts)
    base, extra = divmod(len(values), count)
    assignment, start = [], 0
    for part in range(count):
        size = base + (1 if part < extra else 0)
        assignment.append(list(range(start, start + size)))
        start += size
    return assignment


class DataParallelEncoder(nn.Module):
    """Runs ``module`` on this rank's portion of each batch and gathers every rank's outputs.

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
        self.comm = communicator_for(group)

    # the model's descriptive attributes, so callers can treat both modes alike
    config = property(lambda self: self.module.config)
    use_head = property(lambda self: self.module.use_head)
    dtype = property(lambda self: self.module.dtype)
    device = property(lambda self: self.module.device)
    world_size = property(lambda self: group_size(self.group))
    rank = property(lambda self: group_rank(self.group))

    @property
    def check_finite(self) -> Optional[bool]:
        return self.module.check_finite

    @check_finite.setter
    def check_finite(self, value: Optional[bool]) -> None:
        self.module.check_finite = value

    @property
    def check_inputs_agree(self) -> str:
        return self.module.check_inputs_agree

    @check_inputs_agree.setter
    def check_inputs_agree(self, value: str) -> None:
        self.module.check_inputs_agree = value

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Union[SiglipVisionOutput, tuple[Any, ...]]:
        """``module(pixel_values, ...)`` on this rank's images; the full outputs, in input order, on every rank.

        Every rank must pass the whole, same batch: the ranks first check that they did, and that it is
        valid everywhere (`agree_on_inputs` over the module's ``check_inputs``). Every tensor argument with
        one row per image is then split like ``pixel_values``. With a NaFlex ``pixel_attention_mask``
        images cost their valid patches, and each rank drops the padding columns none of its images needs
        (rows past an image's patches then come back as zeros).
        """
        size = group_size(self.group)
        if size == 1:
            return self.module(pixel_values, *args, **kwargs)
        agree_on_inputs(self.group, lambda: self._check_inputs(pixel_values, *args, **kwargs), mode=self.check_inputs_agree)
        asked = {"return_dict": kwargs.pop("return_dict", None)}  # checked with the rest; the tuple is made here
        bound = inspect.signature(self.module.forward).bind(pixel_values, *args, **kwargs)
        batch, tokens = pixel_values.shape[0], pixel_values.shape[1]
        mask = bound.arguments.get("pixel_attention_mask")
        naflex = isinstance(mask, torch.Tensor) and tuple(mask.shape) == (batch, tokens)
        costs = [int(c) for c in mask.sum(1).tolist()] if naflex else [1] * batch
        portions = balance_by_cost(costs, size) if len(set(costs)) > 1 else split_by_count(costs, size)
        # an idle rank (fewer images than ranks) encodes the cheapest image to learn the output shapes, sends none
        mine = portions[group_rank(self.group)] or [min(range(batch), key=lambda i: (costs[i], i))]
        keep = max(costs[i] for i in mine) if naflex else None
        for name, value in bound.arguments.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                value = value[mine]
                if keep is not None and name in ("pixel_values", "pixel_attention_mask"):
                    value = value[:, :keep]
                bound.arguments[name] = value
        local = self.module(*bound.args, **bound.kwargs)
        return as_asked(gather_outputs(local, [len(portion) for portion in portions], portions, self.comm, tokens), asked)

    def _check_inputs(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if kwargs.get("batch_sizes") is not None:
            raise ValueError(
                "batch_sizes splits a batch over tensor-parallel ranks; a DataParallelEncoder splits each batch "
                "itself: pass the whole batch on every rank, without batch_sizes"
            )
        return self.module.check_inputs(pixel_values, *args, **kwargs)


def gather_outputs(
    local: SiglipVisionOutput, sizes: list[int], portions: list[list[int]], comm: Communicator, tokens: int
) -> SiglipVisionOutput:
    """All-gather each output through ``comm`` (rank ``r`` sends its first ``sizes[r]`` rows) in input order.

    Token outputs shorter than ``tokens`` (a rank that dropped padding) are padded back with zeros.
    """
    flat = [i for portion in portions for i in portion]
    order = None if flat == sorted(flat) else torch.tensor(flat).argsort()
    mine = sizes[comm.rank]

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor[:mine]
        if tensor.dim() == 3 and tensor.shape[1] < tokens:
            tensor = F.pad(tensor, (0, 0, 0, tokens - tensor.shape[1]))
        full = comm.all_gather_rows(tensor.contiguous(), sizes)
        return full if order is None else full[order.to(full.device)]

    return SiglipVisionOutput(
        last_hidden_state=gather(local.last_hidden_state),
        pooler_output=None if local.pooler_output is None else gather(local.pooler_output),
        hidden_states=None if local.hidden_states is None else tuple(gather(h) for h in local.hidden_states),
    )
