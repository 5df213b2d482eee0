"""timm's SigLIP towers (and open_clip's, which are timm trunks): geometry, names and preprocessing.

A timm repo holds ``model.safetensors`` with timm's names and a ``config.json`` with ``architecture``,
``model_args`` (what ``timm.create_model`` was given on top of the architecture) and ``pretrained_cfg``. An
open_clip repo holds the same tensors under ``visual.trunk.`` in ``open_clip_model.safetensors``, and an
``open_clip_config.json`` naming the trunk (``model_cfg.vision_cfg.timm_model_name``) and its
``preprocess_cfg``. This module turns those into a `SiglipVisionConfig` and maps timm's names onto
transformers' (`timm_tensors`); ``formats.py`` does the reading.

Choices:

* **Geometry comes from the architecture name**, as timm builds it: `TIMM_ARCHITECTURES` lists timm's SigLIP
  ViTs with the arguments timm's registry gives them (checked against timm itself by the tests), then
  ``model_args`` apply on top. A custom trunk (open_clip cannot pass it arguments) is declared with
  `register_timm_architecture`. The loader then checks the result against the tensors' shapes.
* **The activation is the library's**: exact (erf) GELU for timm's SigLIP v1 towers, the tanh approximation
  where timm's registry says ``act_layer='gelu_tanh'``. transformers and big_vision use tanh everywhere: on
  the same weights the two differ by far more than 1e-4, so a timm checkpoint gives timm's numbers.
* **Only what makes ``pooler_output``**: a classifier ``head.*`` is ignored (``pre_logits``); open_clip's
  ``timm_proj`` other than ``"none"`` (a projection after the trunk) is refused, not silently dropped.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from tp_siglip.config import Preprocessing
from tp_siglip.remap import Leading, Mapped, rows_of, stacked, whole

#: the families of timm's SigLIP ViTs: (embed_dim, depth, num_heads, mlp_ratio)
_FAMILIES = {"base": (768, 12, 12, 4.0), "large": (1024, 24, 16, 4.0), "so400m": (1152, 27, 16, 3.7362),
             "giantopt": (1536, 40, 16, 4.0)}
#: timm's SigLIP ViTs by name (``_gap_`` ones pool by the token mean); the tanh-GELU ones are marked
_MAP_NAMES = {
    "vit_base_patch32_siglip_256": "tanh", "vit_base_patch16_siglip_224": "", "vit_base_patch16_siglip_256": "",
    "vit_base_patch16_siglip_384": "", "vit_base_patch16_siglip_512": "", "vit_large_patch16_siglip_256": "",
    "vit_large_patch16_siglip_384": "", "vit_large_patch16_siglip_512": "tanh", "vit_so400m_patch14_siglip_224": "",
    "vit_so400m_patch14_siglip_378": "", "vit_so400m_patch14_siglip_384": "", "vit_so400m_patch16_siglip_256": "tanh",
    "vit_so400m_patch16_siglip_384": "tanh", "vit_so400m_patch16_siglip_512": "tanh",
    "vit_giantopt_patch16_siglip_256": "tanh", "vit_giantopt_patch16_siglip_384": "tanh",
}
_GAP_ONLY = {"vit_so400m_patch14_siglip_448": "", "vit_so400m_patch14_siglip_896": ""}
_NAME = re.compile(r"vit_(base|large|so400m|giantopt)_patch(\d+)_siglip_(\d+)")


def _stock(name: str, act: str, pool: str) -> dict[str, Any]:
    family, patch, size = _NAME.fullmatch(name).groups()  # type: ignore[union-attr]
    dim, depth, heads, ratio = _FAMILIES[family]
    return dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=ratio, patch_size=int(patch), img_size=int(size),
                global_pool=pool, act_layer="gelu_tanh" if act else None)


#: timm architecture name -> the ``create_model`` arguments timm's registry gives it (what matters here)
TIMM_ARCHITECTURES: dict[str, dict[str, Any]] = {
    **{name: _stock(name, act, "map") for name, act in _MAP_NAMES.items()},
    **{name.replace("_siglip_", "_siglip_gap_"): _stock(name, act, "avg") for name, act in {**_MAP_NAMES, **_GAP_ONLY}.items()},
}
#: ``act_layer`` names -> ``hidden_act`` (None: timm's default, ``nn.GELU``, exact)
_ACTIVATIONS = {None: "gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
#: ``model_args`` that change nothing here, or only what the checks above cover
_ARGS = {"embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size", "global_pool", "act_layer",
         "in_chans", "num_classes", "class_token", "fc_norm", "no_embed_class", "pretrained_strict"}


def register_timm_architecture(name: str, **timm_kwargs: Any) -> None:
    """Declare a custom timm trunk by the ``create_model`` arguments that build it (``embed_dim``, ``depth``,
    ``num_heads``, ``mlp_ratio``, ``patch_size``, ``img_size``, ``global_pool``, ``act_layer``), so that
    checkpoints naming it (timm's ``architecture``, open_clip's ``timm_model_name``) load."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    _check_args(timm_kwargs, f"register_timm_architecture({name!r})")
    TIMM_ARCHITECTURES[name] = dict(timm_kwargs)


def _check_args(args: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(args) - _ARGS)
    if unknown:
        raise ValueError(f"{where}: timm arguments {unknown} are not reproduced by tp-siglip (it reads {sorted(_ARGS)})")
    if args.get("class_token") or args.get("fc_norm") or args.get("act_layer") not in _ACTIVATIONS:
        raise ValueError(
            f"{where}: class_token={args.get('class_token')!r}, fc_norm={args.get('fc_norm')!r}, act_layer="
            f"{args.get('act_layer')!r}: tp-siglip runs SigLIP towers (no class token, no fc_norm, act_layer one of "
            f"{sorted(k for k in _ACTIVATIONS if k)})"
        )


def timm_config(architecture: str, model_args: Mapping[str, Any], pool: Optional[str], where: str) -> dict[str, Any]:
    """`SiglipVisionConfig` fields of timm's ``architecture`` built with ``model_args`` (and ``global_pool=pool``)."""
    if architecture not in TIMM_ARCHITECTURES:
        raise ValueError(
            f"{where}: timm architecture {architecture!r} is not one of timm's SigLIP ViTs tp-siglip knows "
            f"({len(TIMM_ARCHITECTURES)}, e.g. vit_so400m_patch14_siglip_384); declare a custom trunk with "
            f"tp_siglip.formats.register_timm_architecture(name, **create_model_kwargs), or pass config="
        )
    if not isinstance(model_args, Mapping):
        raise ValueError(f"{where}: model_args must be a JSON object, got {model_args!r}")
    _check_args(model_args, where)
    args = {**TIMM_ARCHITECTURES[architecture], **model_args}
    if pool is not None:
        args["global_pool"] = pool
    size = args.get("img_size", 224)
    sizes = list(size) if isinstance(size, (list, tuple)) else [size, size]
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise ValueError(f"{where}: img_size {size!r} is not square; tp-siglip runs square SigLIP towers")
    if args.get("global_pool", "token") not in ("map", "avg", ""):
        raise ValueError(f"{where}: global_pool {args.get('global_pool')!r}: expected 'map', 'avg' or '' (none)")
    pooling = args.get("global_pool") or None
    return dict(
        hidden_size=args["embed_dim"], num_hidden_layers=args["depth"], num_attention_heads=args["num_heads"],
        intermediate_size=int(args["embed_dim"] * args.get("mlp_ratio", 4.0)), patch_size=args["patch_size"],
        image_size=sizes[0], num_channels=args.get("in_chans", 3), hidden_act=_ACTIVATIONS[args.get("act_layer")],
        layer_norm_eps=1e-6, global_pool=pooling, vision_use_head=pooling == "map",
    )


def timm_preprocessing(cfg: Mapping[str, Any], image_size: int, where: str) -> Preprocessing:
    """timm's eval transform for a ``pretrained_cfg`` (defaults as ``timm.data.resolve_data_config``)."""
    size = cfg.get("input_size", (3, image_size, image_size))
    if list(size)[1:] != [image_size, image_size]:
        raise ValueError(f"{where}: pretrained_cfg input_size {list(size)} does not match the tower's {image_size} px")
    if cfg.get("crop_border_pixels"):
        raise ValueError(f"{where}: pretrained_cfg crop_border_pixels is not reproduced by tp-siglip")
    mode = cfg.get("crop_mode") or "center"
    modes = {"center": "shortest", "squash": "squash", "border": "longest"}
    if mode not in modes:
        raise ValueError(f"{where}: pretrained_cfg crop_mode {mode!r}: expected one of {sorted(modes)}")
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    fill = tuple(round(255 * v) for v in mean) if mode == "border" else (0, 0, 0)
    return Preprocessing(library="timm", resize=modes[mode], crop_pct=cfg.get("crop_pct") or 0.875,  # type: ignore[arg-type]
                         interpolation=cfg.get("interpolation") or "bilinear", mean=mean,  # type: ignore[arg-type]
                         std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), fill=fill)  # type: ignore[arg-type]


#: open_clip's defaults (``PreprocessCfg``): the OpenAI CLIP mean and std, bicubic, shortest side
_OPENAI_MEAN, _OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def open_clip_config(data: Mapping[str, Any], where: str) -> tuple[dict[str, Any], Preprocessing]:
    """`SiglipVisionConfig` fields and preprocessing of an ``open_clip_config.json`` (already parsed)."""
    vision = data.get("model_cfg", {}).get("vision_cfg") if isinstance(data.get("model_cfg"), dict) else None
    if not isinstance(vision, dict) or not vision.get("timm_model_name"):
        raise ValueError(f"{where}: model_cfg.vision_cfg.timm_model_name is missing; tp-siglip reads open_clip's "
                         f"timm-trunk (SigLIP) models, not its own ViT towers")
    if vision.get("timm_proj", "linear") != "none":
        raise ValueError(f"{where}: timm_proj {vision.get('timm_proj', 'linear')!r} adds a projection after the trunk; "
                         f"tp-siglip reads open_clip models with timm_proj 'none' (its SigLIP models)")
    fields = timm_config(vision["timm_model_name"], {}, vision.get("timm_pool", "avg"), where)
    size = vision.get("image_size", fields["image_size"])
    if (list(size) if isinstance(size, (list, tuple)) else [size, size]) != [fields["image_size"]] * 2:
        raise ValueError(f"{where}: vision_cfg image_size {size!r} differs from the trunk's {fields['image_size']} px")
    pre = data.get("preprocess_cfg") or {}
    mode = pre.get("resize_mode") or "shortest"
    if mode not in ("squash", "shortest", "longest"):
        raise ValueError(f"{where}: preprocess_cfg resize_mode {mode!r}: expected squash, shortest or longest")
    fill = int(pre.get("fill_color", 0))
    preprocessing = Preprocessing(
        library="open_clip", resize=mode, interpolation="bilinear" if pre.get("interpolation") == "bilinear" else "bicubic",
        mean=_three(pre.get("mean", _OPENAI_MEAN)), std=_three(pre.get("std", _OPENAI_STD)), fill=(fill, fill, fill))
    return fields, preprocessing


def _three(value: Any) -> tuple[float, float, float]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value, value)  # type: ignore[return-value]


_RENAMES = [(re.compile(a), b) for a, b in (
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"attn_pool\.latent", "head.probe"),
    (r"attn_pool\.proj\.(weight|bias)", r"head.attention.out_proj.\1"),
    (r"attn_pool\.norm\.(weight|bias)", r"head.layernorm.\1"),
    (r"attn_pool\.mlp\.(fc[12])\.(weight|bias)", r"head.mlp.\1.\2"),
)]
_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
#: a classifier after the pooled output (``pre_logits`` is what pooler_output is)
IGNORED = re.compile(r"head\.(weight|bias)")


def timm_tensors(shapes: Mapping[str, tuple[int, ...]], prefix: str, where: str) -> tuple[dict[str, Mapped], list[str]]:
    """transformers tower name -> how to read it from timm's tensors under ``prefix``; and the ignored keys.

    Raises ValueError naming any tensor under ``prefix`` that is neither mapped nor ignored, or a fused tensor
    whose shape does not split.
    """
    out: dict[str, Mapped] = {}
    ignored, unknown = [], []
    for key, shape in shapes.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or name in ("attn_pool.q.weight", "attn_pool.q.bias", "attn_pool.kv.bias"):
            continue
        rename = next((rx.sub(new, name) for rx, new in _RENAMES if rx.fullmatch(name)), None)
        qkv = _QKV.fullmatch(name)
        if rename is not None:
            out[rename] = whole(key, shape)
        elif qkv is not None:
            _split_qkv(out, key, shape, int(qkv.group(1)), qkv.group(2), where)
        elif name == "pos_embed" and len(shape) == 3 and shape[0] == 1:
            out["embeddings.position_embedding.weight"] = Mapped((key,), tuple(shape[1:]), lambda b: Leading(b[0]))
        elif name == "attn_pool.kv.weight":
            _pool_in_proj(out, shapes, prefix, where)
        elif IGNORED.fullmatch(name):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{where}: tensors under prefix {prefix!r} that are not part of a timm SigLIP tower: {unknown[:8]}")
    return out, ignored


def _split_qkv(out: dict[str, Mapped], key: str, shape: tuple[int, ...], layer: int, leaf: str, where: str) -> None:
    if shape[0] % 3:
        raise ValueError(f"{where}: {key} has {shape[0]} rows, not q, k and v of equal size")
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"encoder.layers.{layer}.self_attn.{name}.{leaf}"] = rows_of(key, tuple(shape), part, 3)


def _pool_in_proj(out: dict[str, Mapped], shapes: Mapping[str, tuple[int, ...]], prefix: str, where: str) -> None:
    """The pooling head's ``in_proj_{weight,bias}`` = timm's ``q`` then ``kv`` (k, v) stacked."""
    for leaf in ("weight", "bias"):
        keys = [f"{prefix}attn_pool.q.{leaf}", f"{prefix}attn_pool.kv.{leaf}"]
        if not all(k in shapes for k in keys) or shapes[keys[1]][0] != 2 * shapes[keys[0]][0]:
            raise ValueError(f"{where}: the pooling head needs {keys} with kv twice the rows of q")
        out[f"head.attention.in_proj_{leaf}"] = stacked(keys, [tuple(shapes[k]) for k in keys])
