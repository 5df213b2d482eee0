"""The SigLIP vision tower, written once for any tensor-parallel world size.

Module and parameter names are transformers' ``SiglipVisionModel`` ones, so a checkpoint key maps to a
parameter by stripping the tower's prefix. The model code is TP-agnostic: attention reshapes with
``view(B, T, -1, head_dim)`` and so works for whatever number of heads this rank holds; the parallel
layers (``parallel.py``) do the splitting and the all-reduces.

Choices:

* The patch embedding, position table, layer norms and the probe are small and replicated; every
  q/k/v/fc1 projection is column-parallel and every out_proj/fc2 row-parallel, in the encoder and in the
  pooling head alike. Every rank therefore ends each layer with the full, identical activation and
  returns full outputs.
* Softmax runs in fp32 (eager path) or inside SDPA's fused kernel, which accumulates in fp32.
* ``SiglipVisionTransformer(config)`` random-initialises like transformers; ``device="meta"`` builds
  the skeleton without allocating, which is what the loader starts from.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from tp_siglip.checks import check_pixel_values
from tp_siglip.config import SiglipVisionConfig
from tp_siglip.initialization import default_flax_embed_init, lecun_normal_
from tp_siglip import hub, loader
from tp_siglip.parallel import (
    ColumnParallelLinear,
    ProcessGroup,
    RowParallelLinear,
    ShardSpec,
    TensorParallelPlan,
    agree_on_failure,
    all_gather_batch,
    collective_device,
    group_rank,
    group_size,
    resolve_group,
    split_sizes,
)

logger = logging.getLogger(__name__)

DeviceLike = Union[torch.device, str, int, None]
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
PARALLEL_MODES = ("tensor", "data")
#: transformers-style forward keywords accepted (and ignored) so the model drops into transformers code
_IGNORED_FORWARD_KWARGS = ("return_dict", "output_attentions", "use_cache")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {list(choices)}")


def _gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


#: ``hidden_act`` name -> function; each is the formula transformers uses under that name.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_tanh_formula,
    "gelu_python_tanh": _gelu_tanh_formula,
    "gelu_fast": _gelu_fast,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class SiglipVisionOutput:
    """What the encoder returns; reads like transformers' ``BaseModelOutputWithPooling``.

    Fields are plain attributes (readable and assignable); ``out["last_hidden_state"]``, ``out[0]``,
    ``keys()`` and ``to_tuple()`` work too, skipping fields that are ``None`` the way transformers does.
    """

    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: Union[str, int, slice]) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default


class SiglipVisionEmbeddings(nn.Module):
    """Non-overlapping patches (a "valid" strided conv) plus a learned, replicated position table."""

    def __init__(self, config: SiglipVisionConfig, *, device: DeviceLike = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            padding="valid",
            device=device,
            dtype=dtype,
        )
        # `_weight` skips nn.Embedding's own random init, which on the meta device would pull in torch's
        # compiler stack (a second of imports) for a tensor the loader overwrites anyway
        table = torch.empty(config.num_patches, config.hidden_size, device=device, dtype=dtype)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size, _weight=table)

    def position_table(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a ``rows x cols`` patch grid, ``(1, rows * cols, D)``.

        The native grid uses the table as is; any other grid resizes the square table with bicubic
        interpolation (align_corners=False, no antialiasing), as transformers does.
        """
        table = self.position_embedding.weight
        if (rows, cols) == (self.grid, self.grid):
            return table.unsqueeze(0)
        dim = table.shape[-1]
        square = table.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=(rows, cols), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)
        if interpolate_pos_encoding:
            return embeddings + self.position_table(height // self.patch_size, width // self.patch_size)
        return embeddings + self.position_embedding.weight


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    implementation: str,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Softmax attention on ``(B, heads, T, head_dim)`` tensors, softmax accumulated in fp32."""
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale)
    weights = torch.matmul(query, key.transpose(-1, -2)) * scale
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, value)


class SiglipAttention(nn.Module):
    """Multi-head self-attention; this rank computes its own heads (q/k/v column-, out row-parallel)."""

    def __init__(
        self,
        config: SiglipVisionConfig,
        plan: TensorParallelPlan,
        *,
        attn_implementation: str = "sdpa",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dim = config.hidden_size
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = attn_implementation
        cols = [plan.head_columns]
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.k_proj = ColumnParallelLinear(dim, dim, cols, **kw)
        self.v_proj = ColumnParallelLinear(dim, dim, cols, **kw)
        self.q_proj = ColumnParallelLinear(dim, dim, cols, **kw)
        self.out_proj = RowParallelLinear(dim, dim, plan.head_columns, plan.group, **kw)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        out = attention(
            query,
            key,
            value,
            scale=self.scale,
            implementation=self.attn_implementation,
            dropout=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class SiglipMLP(nn.Module):
    """fc1 (column-parallel) -> activation -> fc2 (row-parallel)."""

    def __init__(
        self,
        config: SiglipVisionConfig,
        plan: TensorParallelPlan,
        *,
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.activation_fn = ACTIVATIONS[config.hidden_act]
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, [plan.mlp_columns], **kw)
        self.fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, plan.mlp_columns, plan.group, **kw)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(
        self,
        config: SiglipVisionConfig,
        plan: TensorParallelPlan,
        *,
        attn_implementation: str = "sdpa",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.self_attn = SiglipAttention(config, plan, attn_implementation=attn_implementation, **kw)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.mlp = SiglipMLP(config, plan, **kw)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # residual adds land in place in the freshly made branch outputs: one allocation less per add
        hidden_states = self.self_attn(self.layer_norm1(hidden_states)).add_(hidden_states)
        return self.mlp(self.layer_norm2(hidden_states)).add_(hidden_states)


class SiglipEncoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(
        self,
        config: SiglipVisionConfig,
        plan: TensorParallelPlan,
        *,
        attn_implementation: str = "sdpa",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            SiglipEncoderLayer(config, plan, attn_implementation=attn_implementation, device=device, dtype=dtype)
            for _ in range(config.num_hidden_layers)
        )

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if states is not None:
                states.append(hidden_states)
        return hidden_states, None if states is None else tuple(states)


class SiglipPoolingAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (stacked ``in_proj_weight`` of q, k, v rows, then
    ``out_proj``), split by heads like the encoder's attention: this rank keeps the q, k and v rows of
    its heads and the matching ``out_proj`` columns."""

    def __init__(
        self,
        config: SiglipVisionConfig,
        plan: TensorParallelPlan,
        *,
        attn_implementation: str = "sdpa",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dim = config.hidden_size
        self.embed_dim = dim
        self.head_dim = config.head_dim
        self.attn_implementation = attn_implementation
        start, end = plan.head_columns
        self.ranges = ((start, end), (dim + start, dim + end), (2 * dim + start, 2 * dim + end))
        local = end - start
        self.in_proj_weight = nn.Parameter(torch.empty(3 * local, dim, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * local, device=device, dtype=dtype))
        self.out_proj = RowParallelLinear(dim, dim, plan.head_columns, plan.group, device=device, dtype=dtype)

    def shard_specs(self) -> dict[str, ShardSpec]:
        dim = self.embed_dim
        return {
            "in_proj_weight": ShardSpec((3 * dim, dim), 0, self.ranges),
            "in_proj_bias": ShardSpec((3 * dim,), 0, self.ranges),
        }

    def forward(self, query: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        local = self.in_proj_weight.shape[0] // 3
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:local], b[:local]).view(batch, query.shape[1], -1, self.head_dim).transpose(1, 2)
        k, v = F.linear(hidden_states, w[local:], b[local:]).view(batch, tokens, 2, -1, self.head_dim).unbind(2)
        out = attention(
            q, k.transpose(1, 2), v.transpose(1, 2), scale=self.head_dim**-0.5, implementation=self.attn_implementation
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, query.shape[1], -1))


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """Attention pooling: a learned probe attends over the tokens, then a residual MLP; one vector out."""

    def __init__(
        self,
        config: SiglipVisionConfig,
        plan: TensorParallelPlan,
        *,
        attn_implementation: str = "sdpa",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size, **kw))
        self.attention = SiglipPoolingAttention(config, plan, attn_implementation=attn_implementation, **kw)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.mlp = SiglipMLP(config, plan, **kw)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(hidden_states.shape[0], -1, -1)
        pooled = self.attention(probe, hidden_states)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVisionTransformer(nn.Module):
    """SigLIP vision encoder, tensor-parallel over ``process_group`` (or a single rank without one).

    Build it with `from_pretrained` to load a checkpoint. ``SiglipVisionTransformer(config)`` gives a
    randomly initialised model (transformers' init; the same numbers at every world size for a given
    ``seed``); ``device="meta"`` gives an unallocated skeleton to fill with `load_weights`.
    """

    def __init__(
        self,
        config: SiglipVisionConfig,
        process_group: Optional[ProcessGroup] = None,
        *,
        attn_implementation: str = "sdpa",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
        seed: int = 0,
        parallel: str = "tensor",
    ):
        super().__init__()
        if not isinstance(config, SiglipVisionConfig):
            raise TypeError(f"config must be a SiglipVisionConfig, got {type(config).__name__}")
        _check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
        _check_choice("parallel", parallel, PARALLEL_MODES)
        self.config = config
        self.parallel = parallel
        #: the group weights are sharded over (tensor mode) and the one batches are split over (data mode)
        self.process_group = process_group if parallel == "tensor" else None
        self.data_group = process_group if parallel == "data" else None
        #: validate that inputs hold no NaN/inf (one device sync per forward); servers may switch it off
        self.check_finite = True
        self.plan = TensorParallelPlan.for_group(
            self.process_group, config.num_attention_heads, config.head_dim, config.intermediate_size
        )
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        parts: dict[str, Any] = {"attn_implementation": attn_implementation, **kw}
        self.embeddings = SiglipVisionEmbeddings(config, **kw)
        self.encoder = SiglipEncoder(config, self.plan, **parts)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.use_head = config.vision_use_head
        self.head = (
            SiglipMultiheadAttentionPoolingHead(config, self.plan, **parts) if self.use_head else None
        )
        self._weights_ready = False
        if not self.is_meta:
            self.init_weights(seed)

    # ------------------------------------------------------------------ properties

    @property
    def world_size(self) -> int:
        """Number of ranks the model runs on (tensor- or data-parallel)."""
        return group_size(self.process_group if self.parallel == "tensor" else self.data_group)

    @property
    def rank(self) -> int:
        """This process's rank in the model's group."""
        return group_rank(self.process_group if self.parallel == "tensor" else self.data_group)

    @property
    def is_meta(self) -> bool:
        """True while any parameter has no storage yet (built on the meta device, not loaded)."""
        return any(p.is_meta for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    def set_attn_implementation(self, implementation: str) -> None:
        """Switch every attention between ``"sdpa"`` (default) and ``"eager"`` (explicit fp32 softmax)."""
        _check_choice("attn_implementation", implementation, ATTN_IMPLEMENTATIONS)
        for module in self.modules():
            if hasattr(module, "attn_implementation"):
                module.attn_implementation = implementation

    def shard_specs(self) -> dict[str, ShardSpec]:
        """For every parameter (full name), how its local tensor is cut from the checkpoint's tensor."""
        specs: dict[str, ShardSpec] = {}
        for module_name, module in self.named_modules():
            custom = module.shard_specs() if hasattr(module, "shard_specs") and module is not self else {}
            for param_name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                specs[full] = custom.get(param_name, ShardSpec(tuple(param.shape)))
        return specs

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Random init as transformers does it, drawn on full-size tensors then sliced, one at a time,
        so every world size gets the same model for the same ``seed``."""
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for name, spec in self.shard_specs().items():
                param = self.get_parameter(name)
                full = torch.empty(spec.full_shape, dtype=torch.float32)
                _init_full(name, full, self.config.hidden_size)
                loader.copy_shard(param, full, spec)
        finally:
            torch.random.set_rng_state(generator_state)
        self._weights_ready = True

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: Union[str, os.PathLike[str]],
        *,
        world_size: Optional[int] = None,
        process_group: Optional[ProcessGroup] = None,
        dtype: loader.DtypeLike = None,
        device: DeviceLike = None,
        prefix: Optional[str] = None,
        num_hidden_layers: Optional[int] = None,
        use_head: Optional[bool] = None,
        attn_implementation: str = "sdpa",
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, os.PathLike[str]]] = None,
        token: Optional[Union[str, bool]] = None,
        local_files_only: bool = False,
        download: str = "tower",
        parallel: str = "tensor",
    ) -> "SiglipVisionTransformer":
        """Load a SigLIP vision tower from a Hub repo or a directory, each rank reading only its slice.

        Args:
            repo_or_dir: a Hub repo id (``"google/siglip-so400m-patch14-384"``) or a directory with
                ``config.json`` and safetensors weights (one file, or shards with
                ``model.safetensors.index.json``); vision-only, full SigLIP or VLM layouts.
            world_size: number of tensor-parallel ranks; must equal the process group's size.
            process_group: the group to shard over. Default: the default group if one exists; else, for
                ``world_size > 1`` under torchrun, a default group created here (gloo on CPU, NCCL on GPU).
            dtype: ``None``/``"auto"`` keeps the stored dtype; or e.g. ``torch.bfloat16``/``"bf16"``.
            device: default: this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU.
            prefix: the tower's key prefix (e.g. ``"vision_tower.vision_model."``); found automatically.
            num_hidden_layers: run only the first k encoder layers (early exit); the skipped layers'
                weights are never read. ``post_layernorm`` and the head then apply to layer k's output.
            use_head: ``False`` skips the pooling head (``pooler_output`` is ``None``) even if the
                checkpoint has one; default: the config's ``vision_use_head``.
            attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
            revision, cache_dir, token, local_files_only: as in huggingface_hub / transformers, for repo ids.
            download: for repo ids not yet cached: ``"tower"`` (default) fetches only the vision tower's
                byte ranges into tp-siglip's own cache; ``"files"`` downloads whole safetensors files
                into the plain Hugging Face cache.
            parallel: ``"tensor"`` (default) shards every layer over the ranks; ``"data"`` replicates the
                weights and splits each batch over the ranks (uneven splits are fine), gathering the
                outputs so every rank still returns the full result.

        If any rank fails while loading, every rank raises (the healthy ones name the failed rank).
        """
        if not isinstance(repo_or_dir, (str, os.PathLike)):
            raise TypeError(f"repo_or_dir must be a path or repo id string, got {type(repo_or_dir).__name__}")
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
        if num_hidden_layers is not None and (isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int)):
            raise TypeError(f"num_hidden_layers must be an int, got {num_hidden_layers!r}")
        if num_hidden_layers is not None and num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
        if use_head is not None and not isinstance(use_head, bool):
            raise TypeError(f"use_head must be a bool or None, got {use_head!r}")
        _check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
        _check_choice("parallel", parallel, PARALLEL_MODES)
        want_dtype = loader.resolve_dtype(dtype)
        target = loader.resolve_device(device)
        group = resolve_group(world_size, process_group)

        model: Optional[SiglipVisionTransformer] = None
        error: Optional[BaseException] = None
        try:
            directory = hub.resolve_checkpoint(
                repo_or_dir,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                download=download,
                prefix=prefix,
            )
            model = cls._load_local(
                directory,
                group,
                dtype=want_dtype,
                device=target,
                prefix=prefix,
                num_hidden_layers=num_hidden_layers,
                use_head=use_head,
                attn_implementation=attn_implementation,
                parallel=parallel,
            )
        except Exception as err:  # every rank must hear about it, see agree_on_failure
            error = err
        agree_on_failure(error, group, collective_device(group))
        assert model is not None
        return model

    @classmethod
    def _load_local(
        cls,
        directory: "os.PathLike[str]",
        group: Optional[ProcessGroup],
        *,
        dtype: Optional[torch.dtype],
        device: torch.device,
        prefix: Optional[str],
        num_hidden_layers: Optional[int],
        use_head: Optional[bool],
        attn_implementation: str,
        parallel: str = "tensor",
    ) -> "SiglipVisionTransformer":
        checkpoint = loader.scan_checkpoint(directory, prefix)
        stored = checkpoint.config
        if num_hidden_layers is not None and num_hidden_layers > stored.num_hidden_layers:
            raise ValueError(
                f"num_hidden_layers={num_hidden_layers} but the checkpoint has only {stored.num_hidden_layers} layers"
            )
        if use_head and not stored.vision_use_head:
            raise ValueError(f"use_head=True but {checkpoint.config_path} says the tower has no head (vision_use_head=false)")
        config = SiglipVisionConfig(
            **{
                **stored.to_dict(),
                "num_hidden_layers": num_hidden_layers or stored.num_hidden_layers,
                "vision_use_head": stored.vision_use_head if use_head is None else use_head,
            }
        )
        if dtype is None:
            dtype = checkpoint.stored_dtype()
        model = cls(config, group, attn_implementation=attn_implementation, device="meta", dtype=dtype, parallel=parallel)
        specs = model.shard_specs()
        plan = loader.plan_load(
            checkpoint.shapes(),
            specs,
            checkpoint.prefix,
            num_layers=config.num_hidden_layers,
            use_head=config.vision_use_head,
            where=str(checkpoint.directory),
        )
        model.to_empty(device=device)
        loader.read_tensors(dict(model.named_parameters()), plan, specs, checkpoint.tensors)
        model._weights_ready = True
        model.eval()
        local = sum(p.numel() * p.element_size() for p in model.parameters())
        logger.info(
            "loaded %d tensors of %s (prefix %r, %d skipped) as rank %d of %d: %.1f MB on %s in %s",
            len(plan.params),
            checkpoint.directory,
            checkpoint.prefix,
            len(plan.skipped),
            model.rank,
            model.world_size,
            local / 1e6,
            device,
            dtype,
        )
        return model

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        prefix: Optional[str] = None,
        device: DeviceLike = None,
        strict: bool = True,
    ) -> "loader.LoadReport":
        """Fill the model from ``(checkpoint name, full tensor)`` pairs; each rank keeps only its slice.

        Names may carry any known tower prefix (found from the first matching name) or the given
        ``prefix``; tensors of other towers are ignored. A model built on the meta device is first
        materialised on ``device`` (default as in `from_pretrained`) in its construction dtype. With
        ``strict`` (default) a missing tensor, a wrong shape or an unknown tensor under the prefix raises
        ``ValueError``; the report lists them either way.
        """
        if self.is_meta:
            self.to_empty(device=loader.resolve_device(device))
        self._weights_ready = False
        report = loader.load_from_pairs(
            dict(self.named_parameters()),
            self.shard_specs(),
            weights,
            prefix=prefix,
            num_layers=self.config.num_hidden_layers,
            use_head=self.use_head,
        )
        if strict:
            report.raise_if_incomplete()
        self._weights_ready = not report.missing
        return report

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> SiglipVisionOutput:
        """Encode ``pixel_values (B, C, H, W)``; every rank returns the full outputs.

        Returns ``last_hidden_state (B, patches, hidden)`` after ``post_layernorm``, ``pooler_output
        (B, hidden)`` (``None`` without a head) and, when ``output_hidden_states``, a tuple of
        ``num_hidden_layers + 1`` tensors: the embeddings, then each layer's output (before
        ``post_layernorm``).
        """
        if not self._weights_ready:
            raise RuntimeError(
                "this model's weights are not loaded (built on the meta device, or a load failed); call "
                "load_weights(...) or build it with SiglipVisionTransformer.from_pretrained(...)"
            )
        unknown = sorted(k for k in kwargs if k not in _IGNORED_FORWARD_KWARGS)
        if unknown:
            raise TypeError(f"forward() got unexpected keyword argument(s) {unknown}")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported: attention weights are never materialised")
        pixel_values = check_pixel_values(
            pixel_values,
            self.config,
            interpolate_pos_encoding=interpolate_pos_encoding,
            check_finite=self.check_finite,
            device=self.device,
        )
        want_states = bool(output_hidden_states)
        if self.data_group is None:
            return self._encode(pixel_values, want_states, interpolate_pos_encoding)
        sizes = split_sizes(pixel_values.shape[0], group_size(self.data_group))
        rank = group_rank(self.data_group)
        start = sum(sizes[:rank])
        if sizes[rank]:
            local = self._encode(pixel_values[start : start + sizes[rank]], want_states, interpolate_pos_encoding)
        else:  # fewer images than ranks: this rank only takes part in the gather
            local = self._empty_output(*pixel_values.shape[-2:], want_states)
        gather = lambda t: all_gather_batch(t, sizes, self.data_group)  # noqa: E731
        return SiglipVisionOutput(
            last_hidden_state=gather(local.last_hidden_state),
            pooler_output=None if local.pooler_output is None else gather(local.pooler_output),
            hidden_states=None if local.hidden_states is None else tuple(gather(h) for h in local.hidden_states),
        )

    def _empty_output(self, height: int, width: int, output_hidden_states: bool) -> SiglipVisionOutput:
        patch = self.config.patch_size
        empty = torch.empty(0, (height // patch) * (width // patch), self.config.hidden_size, device=self.device, dtype=self.dtype)
        return SiglipVisionOutput(
            last_hidden_state=empty,
            pooler_output=empty[:, 0] if self.head is not None else None,
            hidden_states=(empty,) * (len(self.encoder.layers) + 1) if output_hidden_states else None,
        )

    def _encode(self, pixel_values: torch.Tensor, output_hidden_states: bool, interpolate: bool) -> SiglipVisionOutput:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
        hidden_states, all_states = self.encoder(hidden_states, output_hidden_states=output_hidden_states)
        last_hidden_state = self.post_layernorm(hidden_states)
        pooled = self.head(last_hidden_state) if self.head is not None else None
        return SiglipVisionOutput(last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_states)


def _init_full(name: str, tensor: torch.Tensor, hidden_size: int) -> None:
    """Transformers' SigLIP init for the full-size tensor of parameter ``name``."""
    leaf = name.rsplit(".", 1)[-1]
    if "layer_norm" in name or "layernorm" in name:
        nn.init.ones_(tensor) if leaf == "weight" else nn.init.zeros_(tensor)
    elif name == "embeddings.position_embedding.weight":
        nn.init.normal_(tensor, std=1.0 / math.sqrt(hidden_size))
    elif name == "head.probe" or leaf == "in_proj_weight":
        nn.init.xavier_uniform_(tensor)
    elif ".self_attn." in name or leaf == "in_proj_bias":
        nn.init.xavier_uniform_(tensor) if leaf == "weight" else nn.init.zeros_(tensor)
    elif ".mlp." in name:
        nn.init.xavier_uniform_(tensor) if leaf == "weight" else nn.init.normal_(tensor, std=1e-6)
    elif leaf == "weight" and tensor.dim() >= 2:  # patch conv, pooling out_proj: plain Linear/Conv init
        lecun_normal_(tensor)
    elif leaf == "weight":
        default_flax_embed_init(tensor)
    else:
        nn.init.zeros_(tensor)
