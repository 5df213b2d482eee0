"""The SigLIP vision tower's modules, written once for any tensor-parallel world size.

This file only models: embeddings, attention, MLP, encoder layer, encoder, pooling head and the
transformer that holds them. It imports nothing but the config, the parallel layers and torch; loading
(``from_pretrained``, ``load_weights``) is delegated to ``pretrained.py`` and ``loader.py``, and the
data-parallel mode is a wrapper (``data_parallel.py``).

Choices:

* Module and parameter names are transformers' ``SiglipVisionModel`` ones, except that each attention's
  q, k and v projections are one fused column-parallel GEMM (``qkv_proj``; the pooling head's
  ``in_proj``). ``state_dict()`` and loading still use transformers' names (``q_proj.weight``,
  ``in_proj_weight``), so a checkpoint key maps to a parameter piece by stripping the tower's prefix.
* The model code is TP-agnostic: attention reshapes with ``view(B, T, 3, -1, head_dim)`` and so works for
  whatever number of heads this rank holds (16 heads over 3 ranks = 6/5/5); the parallel layers do the
  splitting and the all-reduces. Every rank ends each layer with the full activation.
* The patch embedding, position table, layer norms and the probe are small and replicated.
* Softmax runs in fp32 (eager path) or inside SDPA's fused kernel, which accumulates in fp32.
* ``SiglipVisionTransformer(config)`` random-initialises like transformers (the same numbers at every
  world size for a seed); ``device="meta"`` builds the skeleton without allocating, for the loader.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from tp_siglip.activations import get_activation
from tp_siglip.checks import check_batch_sizes, check_choice, check_flag, check_naflex_inputs, check_pixel_values, check_ready
from tp_siglip.config import SiglipVisionConfig
from tp_siglip.embeddings import NaFlexEmbeddings, SiglipVisionEmbeddings
from tp_siglip.initialization import default_flax_embed_init, lecun_normal_
from tp_siglip.parallel import (
    Block,
    ColumnParallelLinear,
    Layout,
    ProcessGroup,
    RowParallelLinear,
    TensorParallelPlan,
    agree_on_inputs,
    checkpoint_layout,
    copy_piece,
    feeds_by_source,
    gather_rows,
    join_blocks,
    split_batch,
)

if TYPE_CHECKING:  # the loading layers sit above this file; imported lazily by the two entry points
    from tp_siglip.loader import LoadReport

DeviceLike = Union[torch.device, str, int, None]
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


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


def as_asked(out: SiglipVisionOutput, kwargs: dict[str, Any]) -> Union[SiglipVisionOutput, tuple[Any, ...]]:
    """``out``, or for ``return_dict=False`` its tuple, as transformers returns it (so unpacking gives tensors,
    not field names)."""
    return out.to_tuple() if kwargs.get("return_dict") is False else out


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    implementation: str,
    key_mask: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Softmax attention on ``(B, heads, T, head_dim)`` tensors, softmax accumulated in fp32.

    ``key_mask`` (bool, broadcastable to ``(B, 1, 1, T)``, True = attend) hides padded keys.
    """
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=dropout, scale=scale)
    weights = torch.matmul(query, key.transpose(-1, -2)) * scale
    if key_mask is not None:
        weights = weights.masked_fill(~key_mask, torch.finfo(weights.dtype).min)
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    return torch.matmul(weights, value)


class SiglipAttention(nn.Module):
    """Multi-head self-attention; this rank computes its own heads (fused q/k/v column-, out row-parallel)."""

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
        cols = plan.head_columns
        blocks = [Block(name, dim, *cols) for name in ("q_proj", "k_proj", "v_proj")]
        self.qkv_proj = ColumnParallelLinear(dim, blocks, group=plan.group, device=device, dtype=dtype)
        self.out_proj = RowParallelLinear(dim, dim, cols, plan.group, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens = hidden_states.shape[1]
        qkv = self.qkv_proj(hidden_states)  # the whole batch's rows, also when the ranks split it
        qkv = qkv.view(qkv.shape[0], tokens, 3, -1, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, local heads, T, head_dim)
        out = attention(
            query,
            key,
            value,
            scale=self.scale,
            implementation=self.attn_implementation,
            key_mask=key_mask,
            dropout=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


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
        self.activation_fn = get_activation(config.hidden_act)
        self.fc1 = ColumnParallelLinear.shard(config.hidden_size, config.intermediate_size, plan.mlp_columns, group=plan.group, **kw)
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

    def forward(self, hidden_states: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # residual adds land in place in the freshly made branch outputs: one allocation less per add
        hidden_states = self.self_attn(self.layer_norm1(hidden_states), key_mask).add_(hidden_states)
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
        self, hidden_states: torch.Tensor, key_mask: Optional[torch.Tensor] = None, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, key_mask)
            if states is not None:
                states.append(hidden_states)
        return hidden_states, None if states is None else tuple(states)


class SiglipPoolingAttention(nn.Module):
    """The pooling head's ``nn.MultiheadAttention``, split by heads like the encoder's attention.

    The checkpoint stores q, k and v stacked in one ``in_proj_weight`` (3D, D); ``in_proj`` keeps this
    rank's rows of each third (one fused column-parallel layer), ``out_proj`` the matching columns. The
    query is the learned probe ``(1, Q, D)``, the same for every image: projected once, not per image.
    """

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
        self.attn_implementation = attn_implementation
        start, end = plan.head_columns
        blocks = [Block("in_proj", 3 * dim, i * dim + start, i * dim + end, flat=True) for i in range(3)]
        self.in_proj = ColumnParallelLinear(dim, blocks, group=plan.group, device=device, dtype=dtype)
        self.out_proj = RowParallelLinear(dim, dim, plan.head_columns, plan.group, device=device, dtype=dtype)

    def forward(
        self, query: torch.Tensor, hidden_states: torch.Tensor, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        queries, tokens = query.shape[1], hidden_states.shape[1]
        kv = self.in_proj(hidden_states, slice(1, 3))  # the whole batch's rows, also when the ranks split it
        k, v = kv.view(kv.shape[0], tokens, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.in_proj(query, slice(0, 1), shared=True)  # one probe for every image: projected once
        q = q.view(1, queries, -1, self.head_dim).transpose(1, 2).expand(k.shape[0], -1, -1, -1)
        out = attention(q, k, v, scale=self.head_dim**-0.5, implementation=self.attn_implementation, key_mask=key_mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


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

    def forward(self, hidden_states: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pooled = self.attention(self.probe, hidden_states, key_mask)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class _PretrainedTower(nn.Module):
    """What both tower classes have besides their layers and ``forward``: where they run (group, rank, device,
    dtype), how their weights come (random init, the checkpoint layout, the two loading entry points) and the
    checks of ``forward`` arguments they share. The subclass's ``__init__`` sets the attributes below.
    """

    config: SiglipVisionConfig
    plan: TensorParallelPlan
    embeddings: nn.Module
    _weights_ready: bool
    #: the checkpoint directory (or ``.npz`` file) ``from_pretrained`` read, for provenance; None otherwise
    checkpoint_dir: Optional[Path] = None

    @property
    def world_size(self) -> int:
        """Number of tensor-parallel ranks."""
        return self.plan.world_size

    @property
    def rank(self) -> int:
        """This process's rank in the model's group."""
        return self.plan.rank

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
        check_choice("attn_implementation", implementation, ATTN_IMPLEMENTATIONS)
        for module in self.modules():
            if hasattr(module, "attn_implementation"):
                module.attn_implementation = implementation

    def checkpoint_layout(self) -> Layout:
        """For every parameter, the pieces of checkpoint tensors (names relative to the tower) it holds."""
        return checkpoint_layout(self)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Random init as transformers does it, drawn on full-size checkpoint tensors then sliced, one at a
        time, so every world size gets the same model for the same ``seed``."""
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for source, targets in feeds_by_source(self.checkpoint_layout(), dict(self.named_parameters())).items():
                full = torch.empty(targets[0][1].full_shape, dtype=torch.float32)
                _init_full(source, full, self.config.hidden_size)
                for view, piece in targets:
                    copy_piece(view, piece, full)
        finally:
            torch.random.set_rng_state(generator_state)
        self._weights_ready = True

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: Union[str, os.PathLike[str]],
        *,
        world_size: Optional[int] = None,
        process_group: Optional[ProcessGroup] = None,
        dtype: Union[torch.dtype, str, None] = None,
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
        config: Union[SiglipVisionConfig, dict[str, Any], None] = None,
        hidden_act: Optional[str] = None,
        global_pool: Optional[str] = None,
    ) -> nn.Module:
        """Load a tower from a Hub repo id or a directory, each rank reading only its slice.

        Every argument is described atop `tp_siglip.pretrained` (and in docs/vlm-server.md). Returns this class (its
        NaFlex sibling `Siglip2VisionTransformer` for SigLIP2 NaFlex checkpoints), or with
        ``parallel="data"`` a `DataParallelEncoder` around it.
        """
        from tp_siglip.pretrained import load_pretrained  # the loading layers sit above the modules

        return load_pretrained(
            cls, repo_or_dir, world_size=world_size, process_group=process_group, dtype=dtype, device=device,
            prefix=prefix, num_hidden_layers=num_hidden_layers, use_head=use_head, attn_implementation=attn_implementation,
            revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only, download=download,
            parallel=parallel, config=config, hidden_act=hidden_act, global_pool=global_pool,
        )  # fmt: skip

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        *,
        prefix: Optional[str] = None,
        device: DeviceLike = None,
        strict: bool = True,
    ) -> LoadReport:
        """Fill the model from ``(checkpoint name, full tensor)`` pairs; each rank keeps only its slice.

        Names may carry any known tower prefix (found from the first matching name) or the given
        ``prefix``; tensors of other towers are ignored. A model built on the meta device is first
        materialised on ``device`` (default as in `from_pretrained`) in its construction dtype. With
        ``strict`` (default) a missing tensor, a wrong shape or an unknown tensor under the prefix raises
        ``ValueError``; the report lists them either way.
        """
        from tp_siglip.loader import load_pairs_into  # the loading layers sit above the modules

        return load_pairs_into(self, weights, prefix=prefix, device=device, strict=strict)

    def model_signature(self) -> str:
        """What ranks compare about the model itself before each forward: its dtype and config. Ranks that
        loaded other layers, head or dtype would pair their collectives wrongly (garbage or a hang). Empty
        while ``torch.compile`` traces (no agreement runs there)."""
        if torch.compiler.is_compiling():
            return ""
        digest = self.__dict__.get("_config_digest")  # the config is fixed once built: hashed once, not per forward
        if digest is None:
            digest = hashlib.blake2b(self.config.model_dump_json().encode(), digest_size=6).hexdigest()
            self.__dict__["_config_digest"] = digest
        layers = len(self.encoder.layers)  # type: ignore[attr-defined]
        return f"{self.dtype}, {layers} layers, head {self.head is not None}, config {digest}"

    def _check_ready(self, kwargs: dict[str, Any]) -> None:
        """Refuse to run unloaded weights or unknown keywords (`check_ready`)."""
        check_ready(self._weights_ready, kwargs)

    def _check_batch_sizes(self, batch_sizes: object, rows: int) -> Optional[tuple[int, ...]]:
        """``batch_sizes`` as a tuple (``None`` stays ``None``): one count per rank, this rank's = ``rows``."""
        return check_batch_sizes(batch_sizes, rows, self.world_size, self.rank)


class SiglipVisionTransformer(_PretrainedTower):
    """SigLIP vision encoder, tensor-parallel over ``process_group`` (or a single rank without one).

    Build it with `from_pretrained` to load a checkpoint. ``SiglipVisionTransformer(config)`` gives a
    randomly initialised model (transformers' init; the same numbers at every world size for a given
    ``seed``); ``device="meta"`` gives an unallocated skeleton to fill with `load_weights`. Its properties,
    random init and loading entry points are shared with the NaFlex sibling (`_PretrainedTower`).
    """

    #: how the model splits work over its group (``DataParallelEncoder`` says ``"data"``)
    parallel = "tensor"

    def __init__(
        self,
        config: SiglipVisionConfig,
        process_group: Optional[ProcessGroup] = None,
        *,
        attn_implementation: str = "sdpa",
        device: DeviceLike = None,
        dtype: Optional[torch.dtype] = None,
        seed: int = 0,
    ):
        super().__init__()
        if not isinstance(config, SiglipVisionConfig):
            raise TypeError(f"config must be a SiglipVisionConfig, got {type(config).__name__}")
        check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
        self.config = config
        self.process_group = process_group
        #: read input values to refuse NaN/inf pixels and malformed masks: ``None`` (default) for inputs on the
        #: CPU only (free there; on a GPU it would be a device sync per forward), ``True`` always, ``False`` never
        self.check_finite: Optional[bool] = None
        #: what ranks compare before each forward (on the CPU side group): "shapes" (shapes, dtypes, flags;
        #: no tensor data read), "checksum" (also the bytes: a device sync) or "off"
        self.check_inputs_agree = "shapes"
        self.plan = TensorParallelPlan.for_group(
            process_group, config.num_attention_heads, config.head_dim, config.intermediate_size
        )
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        parts: dict[str, Any] = {"attn_implementation": attn_implementation, **kw}
        self.embeddings = self._make_embeddings(config, **kw)
        self.encoder = SiglipEncoder(config, self.plan, **parts)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
        self.use_head = config.use_head
        self.head = SiglipMultiheadAttentionPoolingHead(config, self.plan, **parts) if self.use_head else None
        self._weights_ready = False
        self._register_load_state_dict_pre_hook(join_blocks, with_module=True)  # checkpoint names in
        if not self.is_meta:
            self.init_weights(seed)

    @staticmethod
    def _make_embeddings(config: SiglipVisionConfig, **kw: Any) -> nn.Module:
        if config.variant == "naflex":
            raise ValueError("this config is a SigLIP2 NaFlex tower (variant='naflex'): build a Siglip2VisionTransformer")
        return SiglipVisionEmbeddings(config, **kw)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        patch_attention_mask: Optional[torch.Tensor] = None,
        batch_sizes: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> Union[SiglipVisionOutput, tuple[Any, ...]]:
        """Encode ``pixel_values (B, C, H, W)``; every rank returns the full outputs.

        Returns ``last_hidden_state (B, patches, hidden)`` after ``post_layernorm``, ``pooler_output
        (B, hidden)`` (``None`` without a head) and, when ``output_hidden_states``, a tuple of
        ``num_hidden_layers + 1`` tensors: the embeddings, then each layer's output (before
        ``post_layernorm``). ``patch_attention_mask (B, H/p, W/p)`` (bool, as Idefics3 passes it) marks
        the real patches of padded images: padded patches are hidden from attention and positions are
        bucketized like ``Idefics3VisionTransformer``; Idefics3 towers do that even without a mask.
        Every rank must pass the same inputs; `agree_on_inputs` checks that they did
        (``check_inputs_agree``) and that they are valid on every rank before any compute.

        ``batch_sizes`` (one row count per rank, the same list on every rank) splits the batch instead:
        rank ``r`` passes only its ``batch_sizes[r]`` images (none is fine), the next ones after rank
        ``r - 1``'s, and gets back only their outputs. What every rank would compute alike (embeddings,
        norms, residual adds) is then computed once, by the rank holding the image (`split_batch`);
        ranks compare everything but their rows' values and count.
        """
        inputs = agree_on_inputs(
            self.process_group,
            lambda: self.check_inputs(
                pixel_values, output_hidden_states, interpolate_pos_encoding, patch_attention_mask, batch_sizes, **kwargs
            ),
            mode=self.check_inputs_agree,
            rows_split=batch_sizes is not None,
        )
        pixel_values, mask, split = inputs["pixel_values"], inputs["patch_attention_mask"], inputs["batch_sizes"]
        with _rows_split(split):
            embeddings = self.embeddings(pixel_values, interpolate_pos_encoding, mask)
            key_mask = None
            if mask is not None and not _all_true_on_cpu(mask, split):
                key_mask = gather_rows(mask.flatten(1)[:, None, None, :], self.plan.comm)
            return as_asked(self._encode(embeddings, key_mask, inputs["output_hidden_states"]), kwargs)

    def check_inputs(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        interpolate_pos_encoding: bool = False,
        patch_attention_mask: Optional[torch.Tensor] = None,
        batch_sizes: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """This rank's checks of ``forward``'s arguments (no communication); returns them normalised."""
        self._check_ready(kwargs)
        pixel_values, patch_attention_mask = check_pixel_values(
            pixel_values,
            self.config,
            interpolate_pos_encoding=interpolate_pos_encoding,
            patch_attention_mask=patch_attention_mask,
            check_finite=self.check_finite,
            device=self.device,
            allow_empty=batch_sizes is not None,
        )
        return {
            "pixel_values": pixel_values,
            "patch_attention_mask": patch_attention_mask,
            "output_hidden_states": check_flag("output_hidden_states", output_hidden_states),
            "interpolate_pos_encoding": interpolate_pos_encoding,
            "batch_sizes": self._check_batch_sizes(batch_sizes, len(pixel_values)),
            "model loaded": self.model_signature(),
        }

    def _encode(
        self, embeddings: torch.Tensor, key_mask: Optional[torch.Tensor], output_hidden_states: bool
    ) -> SiglipVisionOutput:
        """The encoder, post-layernorm and head on ``(B, T, D)`` embeddings; ``key_mask`` hides padding."""
        hidden_states, all_states = self.encoder(embeddings, key_mask, output_hidden_states=output_hidden_states)
        last_hidden_state = self.post_layernorm(hidden_states)
        pooled = self.head(last_hidden_state, key_mask) if self.head is not None else None
        if self.config.global_pool == "avg":  # timm's GAP towers: the mean of the (unmasked) tokens, no head
            pooled = _token_mean(last_hidden_state, key_mask)
        return SiglipVisionOutput(last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_states)


class Siglip2VisionTransformer(SiglipVisionTransformer):
    """SigLIP2 NaFlex: variable resolution, patches flattened by the processor, padded to ``N`` per image.

    Same layers as `SiglipVisionTransformer`; the embeddings are `NaFlexEmbeddings` and ``forward`` takes
    transformers' ``Siglip2VisionModel`` arguments. ``from_pretrained`` returns this class for NaFlex
    checkpoints.
    """

    @staticmethod
    def _make_embeddings(config: SiglipVisionConfig, **kw: Any) -> nn.Module:
        if config.variant != "naflex":
            raise ValueError(f"Siglip2VisionTransformer needs a NaFlex config (variant='naflex'), got {config.variant!r}")
        return NaFlexEmbeddings(config, **kw)

    def forward(  # type: ignore[override]
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        batch_sizes: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> Union[SiglipVisionOutput, tuple[Any, ...]]:
        """Encode ``pixel_values (B, N, C*p*p)`` whose image ``i`` fills the first ``h*w`` of ``N`` rows.

        ``pixel_attention_mask (B, N)`` (1 for real patches, valid ones first) hides padding from attention
        and from the pooling head; ``spatial_shapes (B, 2)`` gives each image's patch grid ``(h, w)``.
        Outputs as `SiglipVisionTransformer.forward`; rows past ``h*w`` hold what transformers computes
        there (padding tokens that attend to the image), which no consumer should read. ``batch_sizes``
        splits the batch over the ranks as in `SiglipVisionTransformer.forward`.
        """
        inputs = agree_on_inputs(
            self.process_group,
            lambda: self.check_inputs(
                pixel_values, pixel_attention_mask, spatial_shapes, output_hidden_states, batch_sizes, **kwargs
            ),
            mode=self.check_inputs_agree,
            rows_split=batch_sizes is not None,
        )
        pixel_values = inputs["pixel_values"]
        with _rows_split(inputs["batch_sizes"]):
            embeddings = self.embeddings(pixel_values, inputs["spatial_shapes"])
            key_mask = inputs["pixel_attention_mask"].bool()[:, None, None, :]
            key_mask = gather_rows(key_mask, self.plan.comm)
            return as_asked(self._encode(embeddings, key_mask, inputs["output_hidden_states"]), kwargs)

    def check_inputs(  # type: ignore[override]
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        batch_sizes: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """This rank's checks of ``forward``'s arguments (no communication); returns them normalised.

        The image grids themselves (``spatial_shapes``' values) are part of what ranks compare (not when the
        batch is split: each rank has its own images).
        """
        self._check_ready(kwargs)
        check_naflex_inputs(
            pixel_values,
            pixel_attention_mask,
            spatial_shapes,
            num_channels=self.config.num_channels,
            patch_size=self.config.patch_size,
            check_finite=self.check_finite,
            device=self.device,
            allow_empty=batch_sizes is not None,
        )
        split = self._check_batch_sizes(batch_sizes, len(pixel_values))
        return {
            "pixel_values": pixel_values,
            "pixel_attention_mask": pixel_attention_mask,
            "spatial_shapes": spatial_shapes,
            "grids": None if split else [tuple(row) for row in spatial_shapes.tolist()],  # split: each rank its own
            "output_hidden_states": check_flag("output_hidden_states", output_hidden_states),
            "batch_sizes": split,
            "model loaded": self.model_signature(),
        }


def _all_true_on_cpu(mask: torch.Tensor, split: Optional[tuple[int, ...]]) -> bool:
    """Whether a patch mask can be left out of attention: all true, read only on the CPU (on a device the
    read would be a host sync, so the mask is always applied) and only for a whole batch (a split batch's
    ranks must all take the same path)."""
    return split is None and mask.device.type == "cpu" and bool(mask.all())


def _token_mean(tokens: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Each image's mean token ``(B, D)``; with ``key_mask`` ``(B, 1, 1, T)`` only over the tokens it keeps."""
    if key_mask is None:
        return tokens.mean(dim=1)
    if key_mask.shape[0] != tokens.shape[0]:  # a split batch gathers the mask of every rank's rows
        raise ValueError("global_pool='avg' with a patch mask needs the whole batch on every rank (no batch_sizes)")
    keep = key_mask[:, 0, 0, :, None].to(tokens.dtype)
    return (tokens * keep).sum(dim=1) / keep.sum(dim=1)


def _rows_split(sizes: Optional[tuple[int, ...]]) -> Any:
    """`split_batch` over ``sizes``, or nothing to do for a batch every rank holds whole."""
    return contextlib.nullcontext() if sizes is None else split_batch(sizes)


def _init_full(name: str, tensor: torch.Tensor, hidden_size: int) -> None:
    """Transformers' SigLIP init for the full-size checkpoint tensor ``name``."""
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
