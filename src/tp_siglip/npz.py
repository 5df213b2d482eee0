"""big_vision's ``.npz`` checkpoints, read safely and one member at a time, with transformers' names.

big_vision (and PaliGemma / OpenPI after it) saves a tower as a numpy ``.npz``: a zip of ``.npy`` members
named like ``params/img/Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel``. Layers come one member per
layer (``encoderblock_{i}``) or scan-stacked (``encoderblock/...`` with a leading layer axis, often float16).

Choices:

* **No pickle, ever.** Member headers are parsed with ``numpy.lib.format`` and an object dtype is refused;
  a member that must be read whole goes through ``np.load(..., allow_pickle=False)``.
* **Only this rank's bytes.** A stored (uncompressed, ``np.savez``) member is memory-mapped at its offset
  inside the zip, so a rank's slice of one layer of a stacked kernel reads just those elements. A compressed
  member (``np.savez_compressed``) cannot be sliced in place: it is decompressed whole, one member at a time
  (the last one is kept while consecutive reads need it).
* **Geometry from the tensors** (an ``.npz`` has no config): width and patch from the patch kernel, heads
  from the ``(D, heads, head_dim)`` attention kernels, layers from the members; big_vision's activation
  (tanh GELU, as transformers') and layer-norm epsilon (1e-6).
* **Kernels are transposed** into transformers' ``(out, in)`` layout as views of the mapped member, never
  copies of it: flax Dense ``(in, out)``, attention ``(D, heads, head_dim)`` and ``(heads, head_dim, D)``,
  the patch conv ``(P, P, C, D)``.
"""

from __future__ import annotations

import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from tp_siglip.remap import Concat, Leading, Mapped, Tensor

NPZ_DTYPES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}


@dataclass(frozen=True)
class Member:
    """One ``.npy`` member: its key (the name without ``.npy``), header, and data offset when memory-mappable."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: Optional[int]  # absolute offset of the array data in the .npz; None if compressed or Fortran-ordered
    order: int  # position in the archive (reads go in this order)


class NpzArchive:
    """The members of an ``.npz`` file, their headers read and checked up front, their data read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cached: tuple[str, Any] = ("", None)
        try:
            with zipfile.ZipFile(self.path) as archive, open(self.path, "rb") as raw:
                infos = [i for i in archive.infolist() if i.filename.endswith(".npy")]
                self.members = {m.key: m for m in (self._member(archive, raw, info, n) for n, info in enumerate(infos))}
        except (zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"{self.path} is not a readable .npz archive ({err})") from None
        if not self.members:
            raise ValueError(f"{self.path} holds no .npy members; expected a big_vision .npz checkpoint")

    def _member(self, archive: zipfile.ZipFile, raw: Any, info: zipfile.ZipInfo, order: int) -> Member:
        key = info.filename[: -len(".npy")]
        with archive.open(info) as fh:
            try:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
            except ValueError as err:
                raise ValueError(f"{self.path}: member {key!r} is not a valid .npy array ({err})") from None
            header = fh.tell()
        if dtype.hasobject:
            raise ValueError(f"{self.path}: member {key!r} holds Python objects (a pickle); tp-siglip never unpickles")
        stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1 and not fortran
        offset = self._data_start(raw, info) + header if stored else None
        return Member(key, tuple(shape), dtype, offset, order)

    @staticmethod
    def _data_start(raw: Any, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin: after its local header (30 bytes, name and extra field)."""
        raw.seek(info.header_offset)
        local = raw.read(30)
        return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")

    def array(self, key: str) -> Any:
        """Member ``key``: a read-only memory map when stored uncompressed, else the array read whole (cached)."""
        member = self.members[key]
        if member.offset is not None:
            return np.memmap(self.path, dtype=member.dtype, mode="r", offset=member.offset, shape=member.shape)
        if self._cached[0] != key:
            self._cached = ("", None)  # the previous member is released before the next one is read
            with np.load(self.path, allow_pickle=False) as archive:
                self._cached = (key, archive[key])
        return self._cached[1]

    def release(self) -> None:
        self._cached = ("", None)


# ----------------------------------------------------------------------------- big_vision's names

_BLOCK = re.compile(r"Transformer/encoderblock(?:_(\d+))?/")


def find_npz_prefix(keys: Mapping[str, Any], prefix: Optional[str], where: str) -> str:
    """The image tower's prefix (``params/img/``, ``img/``, ...): what precedes ``embedding/kernel`` beside a
    ``pos_embedding``; or ``prefix`` checked."""
    if prefix is not None:
        if prefix + "embedding/kernel" not in keys:
            raise ValueError(f"{where}: no member {prefix + 'embedding/kernel'!r}; prefix={prefix!r} names no image tower")
        return prefix
    found = sorted(k[: -len("embedding/kernel")] for k in keys if k.endswith("embedding/kernel")
                   and k[: -len("embedding/kernel")] + "pos_embedding" in keys)
    if len(found) != 1:
        what = f"several image towers {found}" if found else "no big_vision image tower (embedding/kernel + pos_embedding)"
        raise ValueError(f"{where} holds {what}; pass prefix= naming one, e.g. 'params/img/'")
    return found[0]


def npz_config(members: Mapping[str, Member], prefix: str, where: str) -> dict[str, Any]:
    """`SiglipVisionConfig` fields from the tower's member shapes (an ``.npz`` has no config)."""
    patch, channels, hidden = _patch(members, prefix, where)
    positions = members[prefix + "pos_embedding"].shape
    side = math.isqrt(positions[-2])
    if len(positions) != 3 or side * side != positions[-2]:
        raise ValueError(f"{where}: pos_embedding {positions} is not a square (1, N, D) grid")
    layers, block = _layers(members, prefix, where)
    query = members[block(0) + "MultiHeadDotProductAttention_0/query/kernel"].shape[-2:]
    dense = members[block(0) + "MlpBlock_0/Dense_0/kernel"].shape[-1]
    head = any(k.startswith(prefix + "MAPHead_0/") for k in members)
    return dict(hidden_size=hidden, num_channels=channels, patch_size=patch, image_size=_image_size(side, patch),
                num_hidden_layers=layers, num_attention_heads=query[0], intermediate_size=dense,
                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=head)


def _image_size(side: int, patch: int) -> int:
    """The image size of a ``side`` x ``side`` grid of ``patch`` px patches: big_vision trains at multiples of 32
    (224, 256, 384, ...) and the conv drops the remainder, so the smallest multiple of 32 that gives the grid
    (27 patches of 14 px: 384, as transformers' converted so400m-384 says), else ``side * patch``."""
    rounded = -(-side * patch // 32) * 32
    return rounded if rounded // patch == side else side * patch


def _patch(members: Mapping[str, Member], prefix: str, where: str) -> tuple[int, int, int]:
    shape = members[prefix + "embedding/kernel"].shape
    if len(shape) != 4 or shape[0] != shape[1]:
        raise ValueError(f"{where}: {prefix}embedding/kernel {shape} is not a square conv kernel (P, P, C, D)")
    return shape[0], shape[2], shape[3]


def _layers(members: Mapping[str, Member], prefix: str, where: str) -> tuple[int, Callable[[int], str]]:
    """How many layers, and the member prefix of layer ``i`` (stacked: one prefix for all)."""
    stacked = prefix + "Transformer/encoderblock/"
    if stacked + "LayerNorm_0/scale" in members:
        return members[stacked + "LayerNorm_0/scale"].shape[0], lambda i: stacked
    numbered = {int(m.group(1)) for k in members if k.startswith(prefix) and (m := _BLOCK.match(k[len(prefix):])) and m.group(1)}
    if not numbered or numbered != set(range(len(numbered))):
        raise ValueError(f"{where}: encoder layers {sorted(numbered)} under {prefix}Transformer/ are not 0..n-1")
    return len(numbered), lambda i: f"{prefix}Transformer/encoderblock_{i}/"


# flax layout -> transformers layout, as views (``x`` is the member, or one layer of a stacked member)
def _same(x: Any) -> Any:
    return x


def _dense(x: Any) -> Any:  # (in, out) -> (out, in)
    return x.T


def _qkv_kernel(x: Any) -> Any:  # (D, heads, head_dim) -> (heads * head_dim, D)
    return x.reshape(x.shape[0], -1).T


def _qkv_bias(x: Any) -> Any:  # (heads, head_dim) -> (heads * head_dim,)
    return x.reshape(-1)


def _out_kernel(x: Any) -> Any:  # (heads, head_dim, D) -> (D, heads * head_dim)
    return x.reshape(-1, x.shape[-1]).T


def _conv(x: Any) -> Any:  # (P, P, C, D) -> (D, C, P, P)
    return x.transpose(3, 2, 0, 1)


#: each transform's output shape from its input shape (computed without touching any data)
_SHAPES: dict[Callable[[Any], Any], Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    _same: lambda s: s,
    _dense: lambda s: (s[1], s[0]),
    _qkv_kernel: lambda s: (s[1] * s[2], s[0]),
    _qkv_bias: lambda s: (s[0] * s[1],),
    _out_kernel: lambda s: (s[-1], s[0] * s[1]),
    _conv: lambda s: (s[3], s[2], s[0], s[1]),
}
_NORM = {"scale": ("weight", _same), "bias": ("bias", _same)}
_DENSE = {"kernel": ("weight", _dense), "bias": ("bias", _same)}
_ATTENTION = {"kernel": ("weight", _qkv_kernel), "bias": ("bias", _qkv_bias)}
_OUT = {"kernel": ("weight", _out_kernel), "bias": ("bias", _same)}


class _Mapper:
    """Builds the `Mapped` entries of one tower, remembering which members it used."""

    def __init__(self, members: Mapping[str, Member]) -> None:
        self.members, self.used = members, set[str]()
        self.out: dict[str, Mapped] = {}
        self.order: dict[str, int] = {}  # read order: by member, then layer (a compressed member is read once)

    def view(self, ours: str, key: str, fn: Callable[[Any], Any], layer: Optional[int]) -> None:
        """``ours`` = ``fn`` of member ``key`` (of its ``layer``-th slice when stacked)."""
        self.used.add(key)
        shape = _SHAPES[fn](self.members[key].shape[0 if layer is None else 1 :])
        pick = (lambda x: x) if layer is None else (lambda x: x[layer])
        self.out[ours] = Mapped((key,), tuple(shape), lambda b: Tensor(fn(pick(b[0]))))
        self.order[ours] = self.members[key].order * (1 << 20) + (layer or 0)

    def module(self, ours: str, theirs: str, leaves: Mapping[str, tuple[str, Callable[[Any], Any]]], layer: Optional[int]) -> None:
        for leaf, (name, fn) in leaves.items():
            self.view(f"{ours}.{name}", f"{theirs}/{leaf}", fn, layer)

    def in_proj(self, ours: str, theirs: str) -> None:
        """The pooling head's fused ``in_proj`` = its query, key and value kernels (and biases) stacked."""
        for leaf, (name, fn) in _ATTENTION.items():
            keys = tuple(f"{theirs}/{part}/{leaf}" for part in ("query", "key", "value"))
            self.used.update(keys)
            shapes = [_SHAPES[fn](self.members[k].shape) for k in keys]
            sizes = [shape[0] for shape in shapes]
            self.out[f"{ours}_{name}"] = Mapped(keys, (sum(sizes), *shapes[0][1:]),
                                                lambda b, fn=fn, sizes=sizes: Concat([Tensor(fn(x)) for x in b], sizes))
            self.order[f"{ours}_{name}"] = self.members[keys[0]].order * (1 << 20)


def npz_tensors(
    members: Mapping[str, Member], prefix: str, where: str
) -> tuple[dict[str, Mapped], list[str], dict[str, int]]:
    """transformers tower name -> how to read it from the members under ``prefix``; the ignored members; and
    each name's place in the read order."""
    layers, block = _layers(members, prefix, where)
    stacked = block(0) == block(1)
    m = _Mapper(members)
    try:
        m.view("embeddings.patch_embedding.weight", prefix + "embedding/kernel", _conv, None)
        m.view("embeddings.patch_embedding.bias", prefix + "embedding/bias", _same, None)
        key = prefix + "pos_embedding"
        m.used.add(key)
        m.out["embeddings.position_embedding.weight"] = Mapped((key,), members[key].shape[1:], lambda b: Leading(b[0]))
        m.order["embeddings.position_embedding.weight"] = members[key].order * (1 << 20)
        m.module("post_layernorm", prefix + "Transformer/encoder_norm", _NORM, None)
        for i in range(layers):
            ours, theirs, at = f"encoder.layers.{i}.", block(i), i if stacked else None
            m.module(ours + "layer_norm1", theirs + "LayerNorm_0", _NORM, at)
            m.module(ours + "layer_norm2", theirs + "LayerNorm_1", _NORM, at)
            for part, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                m.module(ours + "self_attn." + name, theirs + "MultiHeadDotProductAttention_0/" + part, _ATTENTION, at)
            m.module(ours + "self_attn.out_proj", theirs + "MultiHeadDotProductAttention_0/out", _OUT, at)
            m.module(ours + "mlp.fc1", theirs + "MlpBlock_0/Dense_0", _DENSE, at)
            m.module(ours + "mlp.fc2", theirs + "MlpBlock_0/Dense_1", _DENSE, at)
        if any(k.startswith(prefix + "MAPHead_0/") for k in members):
            head = prefix + "MAPHead_0/"
            m.view("head.probe", head + "probe", _same, None)
            m.in_proj("head.attention.in_proj", head + "MultiHeadDotProductAttention_0")
            m.module("head.attention.out_proj", head + "MultiHeadDotProductAttention_0/out", _OUT, None)
            m.module("head.layernorm", head + "LayerNorm_0", _NORM, None)
            m.module("head.mlp.fc1", head + "MlpBlock_0/Dense_0", _DENSE, None)
            m.module("head.mlp.fc2", head + "MlpBlock_0/Dense_1", _DENSE, None)
    except KeyError as err:
        raise ValueError(f"{where}: member {err.args[0]!r} is missing; not a complete big_vision image tower") from None
    rest = sorted(k for k in members if k.startswith(prefix) and k not in m.used)
    ignored = [k for k in rest if k in (prefix + "head/kernel", prefix + "head/bias")]  # a projection after the pooling
    unknown = [k for k in rest if k not in ignored]
    if unknown:
        raise ValueError(f"{where}: members under {prefix!r} that are not part of a big_vision SigLIP tower: {unknown[:8]}")
    return m.out, ignored, m.order
