"""Tensor parallelism: how weights split, the parallel layers, the collectives and the process groups.

This package is the only place that talks to ``torch.distributed``; the model calls its layers and never
reads a global process group. By concern:

* `sharding`: shard sizes, the checkpoint pieces each local parameter holds, the per-rank plan (no I/O);
* `layers`: column- and row-parallel linear layers and the batch split by rows;
* `communicator`: one object per group that moves activations (NCCL / gloo via ``torch.distributed``,
  shared memory on one host, functional collectives under ``torch.compile``);
* `groups`: which group, its CPU side group for bookkeeping, and its communicator;
* `exchange` and `agreement`: byte exchanges on the side group, and the agreements built on them (every
  rank raises when one fails or the inputs differ).
"""

from tp_siglip.parallel.agreement import (
    AGREEMENT_MODES,
    agree_on_failure,
    agree_on_inputs,
    input_signature,
    tensor_checksum,
)
from tp_siglip.parallel.communicator import Communicator, FunctionalCommunicator, SharedMemoryCommunicator
from tp_siglip.parallel.exchange import STATUS_WIDTH, all_gather_bytes, exchange_status
from tp_siglip.parallel.groups import (
    DEFAULT_TIMEOUT,
    ProcessGroup,
    backend_for,
    communicator_for,
    group_rank,
    group_size,
    init_default_group,
    local_gpu,
    resolve_group,
    side_group,
)
from tp_siglip.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    active_split,
    gather_rows,
    join_blocks,
    split_batch,
    sum_rows,
)
from tp_siglip.parallel.sharding import (
    Block,
    Layout,
    Piece,
    TensorParallelPlan,
    checkpoint_layout,
    copy_piece,
    feeds_by_source,
    piece_targets,
    shard_range,
    split_sizes,
)

__all__ = [
    "AGREEMENT_MODES",
    "DEFAULT_TIMEOUT",
    "STATUS_WIDTH",
    "Block",
    "ColumnParallelLinear",
    "Communicator",
    "FunctionalCommunicator",
    "Layout",
    "Piece",
    "ProcessGroup",
    "RowParallelLinear",
    "SharedMemoryCommunicator",
    "TensorParallelPlan",
    "active_split",
    "agree_on_failure",
    "agree_on_inputs",
    "all_gather_bytes",
    "backend_for",
    "checkpoint_layout",
    "communicator_for",
    "copy_piece",
    "exchange_status",
    "feeds_by_source",
    "gather_rows",
    "group_rank",
    "group_size",
    "init_default_group",
    "input_signature",
    "join_blocks",
    "local_gpu",
    "piece_targets",
    "resolve_group",
    "shard_range",
    "side_group",
    "split_batch",
    "split_sizes",
    "sum_rows",
    "tensor_checksum",
]
