"""Reading a checkpoint's vision tower into a (tensor-parallel) model, strictly.

Steps, each with an error that names the file or tensor at fault:

1. **Find the weights** in a directory: ``model.safetensors.index.json`` + shards, else
   ``model.safetensors``, else any ``*.safetensors``. Pickle formats (``pytorch_model.bin``, ``*.pt``)
   are refused, never opened.
2. **Check every header ourselves** before safetensors maps the file: known dtypes, sane shapes,
   byte ranges inside the file and consistent with shape x dtype. A header that lies is an error.
3. **Find the tower's prefix** from the key ending in ``embeddings.patch_embedding.weight`` (or take
   ``prefix=``), then require every parameter the model expects, with its full shape, under it. Other
   towers (``text_model.*``, ``language_model.*``) are ignored; an unknown tensor under the prefix is an
   error, except layers and the head that the caller chose to skip.
4. **Read only this rank's slice** of each tensor through safetensors' slice API and copy it into memory
   the parameter owns. The file is opened per tensor, so no mapping (and none of its pages) outlives
   the copy of one tensor: per-rank memory stays at this rank's share of the weights.

timm, open_clip and big_vision checkpoints (``formats.py``) reuse steps 3 and 4: they present their tensors
under transformers' names (a `Checkpoint` with an ``opener`` that reads them through `remap` sources).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open

from tp_siglip.config import SiglipVisionConfig, find_vision_config
from tp_siglip.parallel import Layout, copy_piece, feeds_by_source, local_gpu

logger = logging.getLogger(__name__)

#: every SigLIP vision tower has exactly one tensor with this name ending
ANCHOR = "embeddings.patch_embedding.weight"
#: the same tensor in timm's names (timm checkpoints, open_clip's ``visual.trunk.``)
TIMM_ANCHOR = "patch_embed.proj.weight"
#: prefixes of the vision tower in the checkpoint layouts we know (see README)
KNOWN_PREFIXES = (
    "",
    "vision_model.",
    "vision_tower.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "model.vision_tower.vision_model.",
    "model.vision_model.",
    "vlm.vision_tower.",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

DtypeLike = Union[torch.dtype, str, None]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, corrupt, pickled, or not a SigLIP tower."""


# ----------------------------------------------------------------------------- argument parsing


def resolve_dtype(dtype: DtypeLike) -> Optional[torch.dtype]:
    """``None``/``"auto"`` (as stored) or a floating dtype, given as ``torch.dtype`` or name."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; expected 'auto' or one of {sorted(DTYPE_NAMES)}")
        return DTYPE_NAMES[key]
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point type; expected e.g. torch.float32 or torch.bfloat16")
        return dtype
    raise TypeError(f"dtype must be a torch.dtype, a string or None, got {type(dtype).__name__}: {dtype!r}")


def resolve_device(device: Union[torch.device, str, int, None]) -> torch.device:
    """The given device, or this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_gpu())
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a valid torch device: {err}") from None
    problem = gpu_problem(chosen)
    if problem is not None:
        raise ValueError(f"device {device!r}: {problem}; pass device='cpu' or a GPU that is there")
    return chosen


def gpu_problem(device: torch.device) -> Optional[str]:
    """Why the GPU ``device`` cannot be used on this machine (no CUDA, an index past the visible GPUs), or None."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"CUDA is not available: this torch ({torch.__version__}) is built without CUDA (a CUDA build has it)"
        return "CUDA is not available: no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} GPU(s) are visible"
    return None


# ----------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header; ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    file: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def parse_header(raw: bytes, file_size: int, source: str) -> dict[str, TensorInfo]:
    """Validate a safetensors header (``raw`` = the JSON bytes) for a file of ``file_size`` bytes."""
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{source}: the safetensors header is not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: the safetensors header is not a JSON object; the file is corrupt")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{source}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} has a malformed header entry {entry!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype!r}; expected one of {sorted(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if numel * itemsize != offsets[1] - offsets[0]:
            raise CheckpointError(
                f"{where}: shape {shape} x {dtype} is {numel * itemsize} bytes but its data_offsets "
                f"{offsets} span {offsets[1] - offsets[0]}; the header is inconsistent"
            )
        if data_start + offsets[1] > file_size:
            raise CheckpointError(
                f"{where} ends at byte {data_start + offsets[1]} but the file has only {file_size} bytes; "
                f"the file is truncated or its header is wrong"
            )
        infos[name] = TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1], source)
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (_, end_a, name_a), (start_b, _, name_b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise CheckpointError(f"{source}: tensors {name_a!r} and {name_b!r} overlap; the header is corrupt")
    return infos


def header_length(prefix8: bytes, file_size: int, source: str) -> int:
    """Length of the JSON header announced by a safetensors file's first 8 bytes."""
    if len(prefix8) < 8:
        raise CheckpointError(f"{source}: only {file_size} bytes, too short to be a safetensors file (truncated?)")
    n = int.from_bytes(prefix8[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointError(
            f"{source}: announces a {n}-byte header but the file has {file_size} bytes; not a valid "
            f"safetensors file (truncated or corrupt)"
        )
    return n


def read_header(path: Union[str, os.PathLike[str]]) -> dict[str, TensorInfo]:
    """Read and validate the header of a local safetensors file."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        n = header_length(fh.read(8), size, path)
        raw = fh.read(n)
    return parse_header(raw, size, path)


# ----------------------------------------------------------------------------- locating files


#: pickle weight files, and the safetensors file that their library writes beside them in the same repo
SAFETENSORS_TWIN = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def pickle_refusal(where: str, pickles: Iterable[str]) -> CheckpointError:
    """The error for pickle-only weights ``pickles`` at ``where``, naming the safetensors file to use instead."""
    pickles = sorted(pickles)
    twins = sorted({SAFETENSORS_TWIN[Path(p).name] for p in pickles if Path(p).name in SAFETENSORS_TWIN})
    twin = f" (its library's safetensors file is {' / '.join(twins)}: a copy of the repo that has it loads)" if twins else ""
    return CheckpointError(
        f"{where} holds only pickle weights ({', '.join(pickles)}); tp-siglip never unpickles a checkpoint "
        f"because loading a pickle can run arbitrary code. Convert it to safetensors (e.g. save_pretrained(..., "
        f"safe_serialization=True)) or use a repo that ships *.safetensors{twin}."
    )


def _refuse_pickle(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise pickle_refusal(str(directory), pickles)


def parse_index(raw: bytes, source: str) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json`` (local or fetched), checked."""
    try:
        weight_map = json.loads(raw)["weight_map"]
    except (KeyError, TypeError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{source} is not a valid safetensors index ({err!r})") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{source}: weight_map must map tensor names to file names")
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{source} names an unexpected shard file {name!r}")
    return weight_map


def weight_files(directory: Path) -> tuple[list[Path], Optional[dict[str, str]]]:
    """The safetensors files of a checkpoint directory, and the index's weight map when sharded."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = parse_index(index.read_bytes(), str(index))
        return [directory / n for n in sorted(set(weight_map.values()))], weight_map
    single = directory / "model.safetensors"
    if single.is_file():
        return [single], None
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files, None
    _refuse_pickle(directory)
    raise CheckpointError(f"{directory} has no *.safetensors weights (looked for model.safetensors and an index)")


def _candidates(names: Iterable[str], anchor: str) -> list[str]:
    found = sorted({n[: -len(anchor)] for n in names if n.endswith(anchor)})
    return [c for c in found if c == "" or c.endswith(".")]


def find_prefix(names: Iterable[str], where: str) -> str:
    """The vision tower's key prefix: what precedes ``embeddings.patch_embedding.weight`` (transformers), else
    ``patch_embed.proj.weight`` (timm; ``visual.trunk.`` in open_clip)."""
    names = list(names)
    candidates = _candidates(names, ANCHOR) or _candidates(names, TIMM_ANCHOR)
    if not candidates:
        raise CheckpointError(
            f"{where} has no SigLIP vision tensors: no key ends in {ANCHOR!r} (transformers) or {TIMM_ANCHOR!r} "
            f"(timm, open_clip). Is this a SigLIP (or a VLM with a SigLIP tower) checkpoint?"
        )
    if len(candidates) > 1:
        raise CheckpointError(f"{where} holds several vision towers with prefixes {candidates}; pass prefix= to choose one")
    return candidates[0]


def tower_prefix(names: Mapping[str, Any], prefix: Optional[str], where: str) -> str:
    """``prefix`` checked against the tensor ``names``, or detected with `find_prefix` when ``None``."""
    if prefix is None:
        return find_prefix(names, where)
    if prefix + ANCHOR not in names and prefix + TIMM_ANCHOR not in names:
        found = _candidates(names, ANCHOR) or _candidates(names, TIMM_ANCHOR)
        hint = f"; the checkpoint's tower prefixes are {found}" if found else ""
        raise CheckpointError(f"{where}: no tensor {prefix + ANCHOR!r}; prefix={prefix!r} does not name a vision tower{hint}")
    return prefix


# ----------------------------------------------------------------------------- what to load


def expected_tensors(layout: Layout) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors (names relative to the tower) a model with ``layout`` reads, with full shapes."""
    return {piece.source: piece.full_shape for pieces in layout.values() for piece in pieces}


@dataclass
class KeyMap:
    """Which checkpoint key feeds which tower tensor, and which keys are deliberately skipped."""

    prefix: str
    keys: dict[str, str]  # tower tensor name -> checkpoint key
    skipped: list[str] = field(default_factory=list)


def skippable(name: str, num_layers: int, use_head: bool) -> bool:
    """Whether tower tensor ``name`` belongs to a layer at index >= ``num_layers`` or to a disabled head."""
    match = re.match(r"encoder\.layers\.(\d+)\.", name)
    if match and int(match.group(1)) >= num_layers:
        return True
    return not use_head and name.startswith("head.")


@dataclass
class LoadReport:
    """What matching a checkpoint's tensors to a model found; `SiglipVisionTransformer.load_weights` returns it."""

    prefix: Optional[str]
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    wrong_shapes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """One line per kind of mismatch (empty when the checkpoint fits)."""
        if self.prefix is None:
            return [f"no name is a tower tensor under a known prefix {list(KNOWN_PREFIXES)}; pass prefix= (what "
                    f"precedes 'embeddings.patch_embedding.weight' in the names)"]
        problems = []
        if self.missing:
            no_head = self.loaded and any(m.startswith(self.prefix + "head.") for m in self.missing)
            hint = " (the checkpoint has no pooling head: pass use_head=False)" if no_head else ""
            problems.append(f"missing tensors{hint}: {_short(self.missing)}")
        if self.wrong_shapes:
            problems.append(f"wrong shapes: {_short(self.wrong_shapes)}")
        if self.unexpected:
            problems.append(f"unexpected tensors under prefix {self.prefix!r}: {_short(self.unexpected)}")
        return problems

    def raise_if_incomplete(self, where: str = "load_weights") -> None:
        problems = self.problems()
        if problems:
            raise CheckpointError(f"{where}: " + "; ".join(problems))


def match_tensors(
    available: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    prefix: str,
    *,
    num_layers: int,
    use_head: bool,
    source: str = "checkpoint",
) -> LoadReport:
    """Compare checkpoint keys (key -> full shape) under ``prefix`` with the tower tensors a model reads.

    ``source`` names where the shapes come from in messages ("checkpoint", or "given" for a caller's tensors).
    """
    report = LoadReport(prefix)
    for name, shape in expected.items():
        key = prefix + name
        if key not in available:
            report.missing.append(key)
        elif tuple(available[key]) != tuple(shape):
            report.wrong_shapes.append(f"{key}: {source} {list(available[key])} vs model {list(shape)}")
        else:
            report.loaded.append(name)
    for key in available:
        rest = key[len(prefix) :]
        if key.startswith(prefix) and rest not in expected:
            (report.skipped if skippable(rest, num_layers, use_head) else report.unexpected).append(key)
    return report


def map_keys(
    available: Mapping[str, tuple[int, ...]],
    layout: Layout,
    prefix: str,
    *,
    num_layers: int,
    use_head: bool,
    where: str,
) -> KeyMap:
    """Match checkpoint keys (name -> full shape) to the model's tensors, strictly."""
    report = match_tensors(available, expected_tensors(layout), prefix, num_layers=num_layers, use_head=use_head)
    problems = report.problems()
    if problems:
        raise CheckpointError(f"{where} does not match the config's vision tower: " + "; ".join(problems))
    return KeyMap(prefix, {name: prefix + name for name in report.loaded}, report.skipped)


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------- reading


#: opens one checkpoint tensor for slicing (``source[piece.index()]``) for as long as the block lasts
Opener = Callable[[TensorInfo], ContextManager[Any]]


@contextlib.contextmanager
def open_safetensors(info: TensorInfo) -> Iterator[Any]:
    """Tensor ``info.name`` of the safetensors file ``info.file`` as a lazy slice, the file mapped meanwhile."""
    with safe_open(info.file, framework="pt", device="cpu") as fh:
        yield fh.get_slice(info.name)


def read_tensors(
    params: Mapping[str, torch.Tensor],
    layout: Layout,
    key_map: KeyMap,
    infos: Mapping[str, TensorInfo],
    opener: Opener = open_safetensors,
) -> None:
    """Fill ``params`` from local checkpoint files, in file order, one short-lived mapping per tensor.

    Each checkpoint tensor is read through safetensors' slice API (or the ``opener`` of another format), only
    the pieces this rank keeps, and copied into memory the parameter owns (no view of the mapped file survives).
    """
    feeds = feeds_by_source(layout, dict(params))
    order = sorted(feeds, key=lambda name: (infos[key_map.keys[name]].file, infos[key_map.keys[name]].start))
    for name in order:
        info = infos[key_map.keys[name]]
        try:
            with opener(info) as source:
                for view, piece in feeds[name]:
                    copy_piece(view, piece, source)
        except Exception as err:  # safetensors' own errors are not typed helpfully
            raise CheckpointError(f"{info.file}: could not read tensor {info.name!r}: {err}") from err


# ----------------------------------------------------------------------------- a local checkpoint


def local_checkpoint_dir(path: Union[str, os.PathLike[str]]) -> Path:
    """``path`` as an existing checkpoint directory (or big_vision ``.npz`` file), or a clear error."""
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if directory.is_file() and directory.name.endswith(PICKLE_SUFFIXES):
        raise pickle_refusal(str(path), [directory.name])
    if not directory.is_dir() and directory.suffix != ".npz":
        raise CheckpointError(f"{str(path)!r} is a file; expected a directory holding config.json and *.safetensors "
                              f"(or open_clip_config.json and open_clip_model.safetensors), or a big_vision .npz file")
    return directory


@dataclass
class Checkpoint:
    """A scanned local checkpoint: its vision config, the tower's prefix and the tower's tensors."""

    directory: Path
    config_source: str  # where the config came from, for messages
    config: SiglipVisionConfig
    prefix: str
    tensors: dict[str, TensorInfo]  # only keys under the prefix
    #: how to open a tensor for reading: safetensors' slice API, or a format's remapping (``formats.py``)
    opener: Opener = open_safetensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    def stored_dtype(self) -> torch.dtype:
        """The dtype the tower is stored in (that of its patch embedding)."""
        info = self.tensors[self.prefix + ANCHOR]
        dtype = SAFETENSORS_DTYPES[info.dtype]
        if not dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: {info.name} is stored as {info.dtype}, not a floating-point type")
        return dtype

    def has_head(self) -> bool:
        """Whether the checkpoint holds a pooling head for the tower."""
        return any(k.startswith(self.prefix + "head.") for k in self.tensors)


def scan_checkpoint(
    directory: Union[str, os.PathLike[str]],
    prefix: Optional[str] = None,
    config: Optional[SiglipVisionConfig] = None,
) -> Checkpoint:
    """Read config and headers (only of the files that hold the tower) of a local checkpoint.

    ``config`` replaces the one found in ``config.json`` (which then need not exist). The config is
    checked against the tensors' shapes (`check_config`).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if config is None and not config_path.is_file():
        _refuse_pickle_if_only(directory)
        raise CheckpointError(f"{directory} has no config.json; expected a SigLIP (or VLM) checkpoint directory")
    tensors = tower_headers(directory, prefix)
    prefix = tower_prefix(tensors, prefix, str(directory))  # what the tensors are decides the clearest error
    if config is None:
        config, source = read_config(config_path)
    else:
        source = "the config= argument"
    tower = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    checkpoint = Checkpoint(directory, source, config, prefix, tower)
    check_config(checkpoint)
    return checkpoint


def read_config(path: Path) -> tuple[SiglipVisionConfig, str]:
    """The vision config in ``path`` and where in the file it sits (for messages)."""
    config = SiglipVisionConfig.from_json_file(path)
    _, where, _ = find_vision_config(json.loads(path.read_text(encoding="utf-8")))
    return config, f"{path} ({where})"


def tower_headers(directory: Path, prefix: Optional[str]) -> dict[str, TensorInfo]:
    """Headers of the safetensors files that hold the tower (with an index: only those shards)."""
    files, weight_map = weight_files(directory)
    if weight_map is not None:
        if prefix is None:
            prefix = find_prefix(weight_map, str(directory))
        wanted = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
        files = [directory / f for f in wanted]
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"shard {path} listed in {directory}/model.safetensors.index.json is missing")
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} and {path}")
            tensors[name] = info
    return tensors


def tensor_facts(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """What a tower's tensor shapes (names relative to the tower) say about its config."""
    facts: dict[str, Any] = {}
    patch = shapes.get(ANCHOR)
    if patch is not None and len(patch) == 4:
        facts.update(variant="conv (image) patch embedding", hidden_size=patch[0], num_channels=patch[1], patch_size=patch[2])
    elif patch is not None and len(patch) == 2:
        facts.update(variant="linear (NaFlex) patch embedding", hidden_size=patch[0], patch_values=patch[1])
    positions = shapes.get("embeddings.position_embedding.weight")
    if positions is not None:
        facts["num_patches"] = positions[0]
    fc1 = shapes.get("encoder.layers.0.mlp.fc1.weight")
    if fc1 is not None:
        facts["intermediate_size"] = fc1[0]
    layers = [int(m.group(1)) for m in (re.match(r"encoder\.layers\.(\d+)\.", k) for k in shapes) if m]
    if layers:
        facts["num_hidden_layers"] = max(layers) + 1
    return facts


def check_config(checkpoint: Checkpoint) -> None:
    """Raise if the config disagrees with the tensors' shapes, naming both (the config is never patched)."""
    config = checkpoint.config
    shapes = {k[len(checkpoint.prefix) :]: v.shape for k, v in checkpoint.tensors.items()}
    facts = tensor_facts(shapes)
    said: dict[str, Any] = {k: getattr(config, k) for k in facts if hasattr(config, k)}
    said["variant"] = "linear (NaFlex) patch embedding" if config.variant == "naflex" else "conv (image) patch embedding"
    if "patch_values" in facts:
        said["patch_values"] = config.num_channels * config.patch_size**2
    wrong = [f"{name}: config {said[name]!r}, tensors {facts[name]!r}" for name in facts if said.get(name) != facts[name]]
    if wrong:
        raise CheckpointError(
            f"{checkpoint.directory}: the config ({checkpoint.config_source}) disagrees with the checkpoint's "
            f"tensors under prefix {checkpoint.prefix!r}: {'; '.join(wrong)}. Fix the config, or pass the right "
            f"one with from_pretrained(..., config=...)"
        )


def _refuse_pickle_if_only(directory: Path) -> None:
    if not any(directory.glob("*.safetensors")):
        _refuse_pickle(directory)


# ----------------------------------------------------------------------------- caller's tensors


def _find_pairs_prefix(name: str, expected: Mapping[str, Any]) -> Optional[str]:
    """The known tower prefix under which ``name`` is an expected tower tensor, if any."""
    return next((p for p in sorted(KNOWN_PREFIXES, key=len, reverse=True) if name.startswith(p) and name[len(p) :] in expected), None)


def load_from_pairs(
    params: Mapping[str, torch.Tensor],
    layout: Layout,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    prefix: Optional[str],
    num_layers: int,
    use_head: bool,
) -> LoadReport:
    """Copy this rank's pieces of ``(name, full tensor)`` pairs into ``params``.

    Without ``prefix`` the first name that is a known tower prefix + a tower tensor name fixes it.
    Pairs are consumed one at a time, so a generator over a large state dict is never held whole.
    """
    expected = expected_tensors(layout)
    feeds = feeds_by_source(layout, dict(params))
    shapes: dict[str, tuple[int, ...]] = {}
    found_prefix = prefix
    for item in weights:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"load_weights expects (name, tensor) pairs, got {type(item).__name__}")
        name, tensor = item
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"load_weights expects (str, torch.Tensor) pairs, got ({type(name).__name__}, {type(tensor).__name__})"
            )
        shapes[name] = tuple(tensor.shape)
        if found_prefix is None:
            found_prefix = _find_pairs_prefix(name, expected)
        rest = name[len(found_prefix) :] if found_prefix is not None and name.startswith(found_prefix) else None
        if rest in expected and shapes[name] == tuple(expected[rest]):
            for view, piece in feeds[rest]:
                copy_piece(view, piece, tensor)
    if found_prefix is None:
        return LoadReport(None, missing=list(expected))
    return match_tensors(shapes, expected, found_prefix, num_layers=num_layers, use_head=use_head, source="given")


def load_pairs_into(
    model: Any,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    prefix: Optional[str],
    device: Union[torch.device, str, int, None],
    strict: bool,
) -> LoadReport:
    """`SiglipVisionTransformer.load_weights`: materialise a meta model, fill it, report (and raise if strict)."""
    if model.is_meta:
        model.to_empty(device=resolve_device(device))
    model._weights_ready = False
    report = load_from_pairs(
        dict(model.named_parameters()),
        model.checkpoint_layout(),
        weights,
        prefix=prefix,
        num_layers=model.config.num_hidden_layers,
        use_head=model.use_head,
    )
    if strict:
        report.raise_if_incomplete()
    model._weights_ready = not report.missing and not report.wrong_shapes  # a skipped tensor holds no weights
    return report
