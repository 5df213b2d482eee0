"""``from_pretrained``: the one entry point that composes the layers below it.

    arguments -> process group (parallel) -> local files (hub) -> config + tensor headers (loader)
              -> meta-device model (model) -> this rank's slices (loader) -> data-parallel wrapper

Choices:

* **Every argument is checked before any work**, with a message naming the value.
* **No rank is left behind.** Whatever fails on one rank (a missing file, a corrupt header, a shape
  mismatch) is shared with every rank in one collective (`parallel.agree_on_failure`) before anyone
  runs a forward: all ranks raise, the healthy ones naming the rank that failed.
* **Nothing half-loaded.** The model is built on the meta device (no random init), materialised on the
  target device and filled from the checkpoint; only a model whose every tensor was read is returned.
* **Half precision on a CPU without native support is warned about** (once per process, naming the
  cost and the fix: float32), not silently several times slower; see ``hardware.py``.

Arguments of ``from_pretrained`` / `load_pretrained`:

    repo_or_dir: a Hub repo id (``"google/siglip-so400m-patch14-384"``) or a directory with
        ``config.json`` and safetensors weights (one file, or shards with
        ``model.safetensors.index.json``); vision-only, full SigLIP or VLM layouts.
    world_size: number of ranks; must equal the process group's size.
    process_group: the group to shard over. Default: the default group if one exists; else, for
        ``world_size > 1`` under torchrun, a default group created here (gloo on CPU, NCCL on GPU).
    dtype: ``None``/``"auto"`` keeps the stored dtype; or e.g. ``torch.bfloat16``/``"bf16"``.
    device: default: this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU.
        ``"meta"``: the checkpoint is checked, but nothing is read: an unloaded skeleton for `load_weights`.
    prefix: the tower's key prefix (e.g. ``"vision_tower.vision_model."``); found automatically.
    num_hidden_layers: run only the first k encoder layers (early exit); the skipped layers'
        weights are never read. ``post_layernorm`` and the head then apply to layer k's output.
    use_head: ``False`` skips the pooling head (``pooler_output`` is ``None``) even if the
        checkpoint has one; default: the config's ``vision_use_head``, or where the config does not
        say, whether the checkpoint holds a head.
    attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
    revision, cache_dir, token, local_files_only: as in huggingface_hub / transformers, for repo ids.
    download: for repo ids not yet cached: ``"tower"`` (default) fetches only the vision tower's
        byte ranges into tp-siglip's own cache; ``"files"`` downloads whole safetensors files
        into the plain Hugging Face cache.
    parallel: ``"tensor"`` (default) shards every layer over the ranks; ``"data"`` replicates the
        weights and splits each batch over the ranks (a `DataParallelEncoder`), gathering the
        outputs so every rank still returns the full result.
    config: the tower's config (a `SiglipVisionConfig`, or a dict read like a config.json), used
        instead of the repo's config.json. Either way it must agree with the tensors' shapes.
    hidden_act: the MLPs' activation instead of the checkpoint's: ``"gelu"`` (exact, what timm and open_clip
        run) or ``"gelu_pytorch_tanh"`` (the tanh approximation of transformers and big_vision), ...
    global_pool: ``"avg"``: ``pooler_output`` is the mean of ``last_hidden_state``'s tokens (timm's GAP
        towers), the head is not read; ``"map"``: the pooling head (required). Default: the checkpoint's.

The checkpoint may also be a timm or open_clip folder or repo, or a big_vision ``.npz`` (``formats.py``):
the same call, the tensors mapped onto transformers' names, each rank still reading only its slice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from tp_siglip import formats, hub, loader
from tp_siglip.activations import get_activation
from tp_siglip.checks import check_choice
from tp_siglip.config import SiglipVisionConfig
from tp_siglip.data_parallel import DataParallelEncoder
from tp_siglip.hardware import warn_if_emulated_half
from tp_siglip.model import ATTN_IMPLEMENTATIONS, Siglip2VisionTransformer, SiglipVisionTransformer
from tp_siglip.parallel import ProcessGroup, agree_on_failure, backend_for, resolve_group

logger = logging.getLogger(__name__)

PARALLEL_MODES = ("tensor", "data")


def load_pretrained(
    cls: type[SiglipVisionTransformer],
    repo_or_dir: Union[str, os.PathLike[str]],
    *,
    world_size: Optional[int] = None,
    process_group: Optional[ProcessGroup] = None,
    dtype: loader.DtypeLike = None,
    device: Union[torch.device, str, int, None] = None,
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
    """Load a SigLIP-family vision tower from a Hub repo or a directory, each rank reading only its slice.

    Returns a `SiglipVisionTransformer`, a `Siglip2VisionTransformer` for SigLIP2 NaFlex checkpoints, or a
    `DataParallelEncoder` around one (``parallel="data"``). If any rank fails while loading, every rank
    raises (the healthy ones name the failed rank). The arguments are described atop this module.
    """
    _check_arguments(repo_or_dir, prefix, num_hidden_layers, use_head, attn_implementation, parallel)
    _check_overrides(hidden_act, global_pool, use_head)
    config = _resolve_config(config)
    want_dtype = loader.resolve_dtype(dtype)
    target = loader.resolve_device(device)
    group = resolve_group(world_size, process_group, backend=backend_for(target))  # a CPU model gets gloo on a GPU machine
    options = dict(dtype=want_dtype, device=target, prefix=prefix, num_hidden_layers=num_hidden_layers,
                   use_head=use_head, attn_implementation=attn_implementation, config=config,
                   overrides={"hidden_act": hidden_act, "global_pool": global_pool})
    model: Optional[SiglipVisionTransformer] = None
    error: Optional[BaseException] = None
    try:
        directory = hub.resolve_checkpoint(repo_or_dir, revision=revision, cache_dir=cache_dir, token=token,
                                           local_files_only=local_files_only, download=download, prefix=prefix)
        model = load_checkpoint(cls, directory, group if parallel == "tensor" else None, **options)
    except Exception as err:  # every rank must hear about it, see agree_on_failure
        error = err
    try:
        agree_on_failure(error, group)  # on the group's CPU side group
    finally:
        del error  # a kept exception (and its frames) would keep the process group alive at exit
    assert model is not None
    return DataParallelEncoder(model, group) if parallel == "data" else model


def _check_arguments(
    repo_or_dir: object,
    prefix: object,
    num_hidden_layers: object,
    use_head: object,
    attn_implementation: str,
    parallel: str,
) -> None:
    if not isinstance(repo_or_dir, (str, os.PathLike)):
        raise TypeError(f"repo_or_dir must be a path or repo id string, got {type(repo_or_dir).__name__}")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
    if num_hidden_layers is not None and (isinstance(num_hidden_layers, bool) or not isinstance(num_hidden_layers, int)):
        raise TypeError(f"num_hidden_layers must be an int, got {num_hidden_layers!r}")
    if isinstance(num_hidden_layers, int) and num_hidden_layers < 1:
        raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
    if use_head is not None and not isinstance(use_head, bool):
        raise TypeError(f"use_head must be a bool or None, got {use_head!r}")
    check_choice("attn_implementation", attn_implementation, ATTN_IMPLEMENTATIONS)
    check_choice("parallel", parallel, PARALLEL_MODES)


def _check_overrides(hidden_act: object, global_pool: object, use_head: object) -> None:
    if hidden_act is not None:
        if not isinstance(hidden_act, str):
            raise TypeError(f"hidden_act must be a string or None, got {type(hidden_act).__name__}")
        get_activation(hidden_act)  # ValueError naming the known ones
    if global_pool is not None:
        check_choice("global_pool", global_pool, ("map", "avg"))
    if global_pool == "avg" and use_head:
        raise ValueError("global_pool='avg' pools by the token mean without the head; drop use_head=True")
    if global_pool == "map" and use_head is False:
        raise ValueError("global_pool='map' is the pooling head; drop use_head=False")


def _resolve_config(config: object) -> Optional[SiglipVisionConfig]:
    if config is None or isinstance(config, SiglipVisionConfig):
        return config
    if isinstance(config, dict):
        return SiglipVisionConfig.from_dict(config)
    raise TypeError(f"config must be a SiglipVisionConfig, a dict or None, got {type(config).__name__}")


def load_checkpoint(
    cls: type[SiglipVisionTransformer],
    directory: Union[str, os.PathLike[str]],
    group: Optional[ProcessGroup],
    *,
    dtype: Optional[torch.dtype],
    device: torch.device,
    prefix: Optional[str],
    num_hidden_layers: Optional[int],
    use_head: Optional[bool],
    attn_implementation: str,
    config: Optional[SiglipVisionConfig] = None,
    overrides: Optional[dict[str, Optional[str]]] = None,
) -> SiglipVisionTransformer:
    """Build ``cls`` (or its NaFlex sibling) on the meta device for a local checkpoint of any format (`formats`);
    fill this rank's slices. ``overrides``: ``hidden_act`` / ``global_pool`` replacing the checkpoint's."""
    checkpoint = formats.scan(Path(directory), prefix, config)
    config = _effective_config(checkpoint, num_hidden_layers, use_head, overrides or {})
    dtype = dtype or checkpoint.stored_dtype()
    if config.variant == "naflex" and not issubclass(cls, Siglip2VisionTransformer):
        cls = Siglip2VisionTransformer
    model = cls(config, group, attn_implementation=attn_implementation, device="meta", dtype=dtype)
    layout = model.checkpoint_layout()
    key_map = loader.map_keys(
        checkpoint.shapes(),
        layout,
        checkpoint.prefix,
        num_layers=config.num_hidden_layers,
        use_head=config.use_head,
        where=str(checkpoint.directory),
    )
    model.to_empty(device=device)
    if device.type != "meta":  # a meta skeleton holds no values: it stays unloaded until load_weights fills it
        loader.read_tensors(dict(model.named_parameters()), layout, key_map, checkpoint.tensors, checkpoint.opener)
    model._weights_ready = device.type != "meta"
    model.checkpoint_dir = Path(checkpoint.directory)
    model.eval()
    _log_loaded(model, checkpoint, key_map, device, dtype)
    warn_if_emulated_half(device, dtype)  # bf16/fp16 on a CPU without them (slow: docs/benchmarks.md), said once
    return model


def _effective_config(
    checkpoint: loader.Checkpoint, num_hidden_layers: Optional[int], use_head: Optional[bool],
    overrides: dict[str, Optional[str]],
) -> SiglipVisionConfig:
    """The stored config with the caller's early exit, head, activation and pooling choices applied."""
    stored = checkpoint.config
    if num_hidden_layers is not None and num_hidden_layers > stored.num_hidden_layers:
        raise ValueError(
            f"num_hidden_layers={num_hidden_layers} but the checkpoint has only {stored.num_hidden_layers} layers"
        )
    head = checkpoint.has_head() if stored.vision_use_head is None else stored.vision_use_head
    if use_head and not head:
        raise ValueError(f"use_head=True but the tower has no head ({checkpoint.config_source}, {checkpoint.directory})")
    keep_head = head if use_head is None else use_head
    pool = overrides.get("global_pool") or stored.global_pool
    if overrides.get("global_pool") == "map" and not head:
        raise ValueError(f"global_pool='map' but the tower has no pooling head ({checkpoint.config_source})")
    if pool == "avg":
        keep_head = False  # the token mean is the pooled output; the head is not read
    elif pool == "map" and not keep_head:
        pool = None  # use_head=False on a tower with a head: no pooled output
    changes = {"num_hidden_layers": num_hidden_layers or stored.num_hidden_layers, "vision_use_head": keep_head,
               "global_pool": pool, "hidden_act": overrides.get("hidden_act") or stored.hidden_act}
    return SiglipVisionConfig(**{**stored.to_dict(), **changes})


def _log_loaded(
    model: SiglipVisionTransformer, checkpoint: loader.Checkpoint, key_map: loader.KeyMap, device: torch.device, dtype: torch.dtype
) -> None:
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info(
        "%s %d tensors of %s (prefix %r, %d skipped) as rank %d of %d: %.1f MB on %s in %s",
        "checked (nothing read on meta)" if device.type == "meta" else "loaded",
        len(key_map.keys),
        Path(checkpoint.directory),
        checkpoint.prefix,
        len(key_map.skipped),
        model.rank,
        model.world_size,
        local / 1e6,
        device,
        dtype,
    )
