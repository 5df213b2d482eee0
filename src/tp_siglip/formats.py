"""Which checkpoint format a path holds, and a `loader.Checkpoint` for it: transformers, timm, open_clip, big_vision.

    a folder with open_clip_config.json (no config.json)      -> open_clip (tower under ``visual.trunk.``)
    a folder whose config.json names a timm ``architecture``  -> timm
    an .npz file, or a folder holding one and no safetensors  -> big_vision
    anything else                                             -> transformers (``loader.scan_checkpoint``)

For the three foreign formats the checkpoint is presented under transformers' tower names (prefix ``""``):
each name is a `remap.Mapped` recipe, and the checkpoint's ``opener`` reads just the elements a rank's
piece asks for (safetensors' slice API; a memory-mapped ``.npz`` member). So the loader's strict matching,
config checks, early exit and per-rank reads apply unchanged, and ``state_dict()`` keeps transformers' names.
The config (geometry, ``hidden_act``, ``global_pool``, ``preprocessing``) comes from the format's own files
(`timm_format`, `npz`) unless ``config=`` is given; either way it is checked against the tensors' shapes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from safetensors import safe_open

from tp_siglip import npz, timm_format
from tp_siglip.config import SiglipVisionConfig
from tp_siglip.loader import (
    ANCHOR,
    PICKLE_SUFFIXES,
    Checkpoint,
    CheckpointError,
    TensorInfo,
    check_config,
    pickle_refusal,
    read_header,
    tower_headers,
    tower_prefix,
)
from tp_siglip.loader import (
    scan_checkpoint as scan_transformers,
)
from tp_siglip.remap import Mapped
from tp_siglip.timm_format import register_timm_architecture

__all__ = ["OPEN_CLIP_CONFIG", "config_file", "detect_format", "register_timm_architecture", "scan"]

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def config_file(files: Iterable[str]) -> str:
    """The config file to read among a checkpoint's ``files``: open_clip's when there is no ``config.json``."""
    files = set(files)
    return OPEN_CLIP_CONFIG if OPEN_CLIP_CONFIG in files and "config.json" not in files else "config.json"


def detect_format(path: Path) -> str:
    """``"transformers"``, ``"timm"``, ``"open_clip"`` or ``"big_vision"`` for a local file or folder."""
    if path.is_file():
        if path.suffix == ".npz":
            return "big_vision"
        if path.name.endswith(PICKLE_SUFFIXES):
            raise pickle_refusal(str(path), [path.name])
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder (config.json and *.safetensors, or "
                              f"open_clip_config.json and {OPEN_CLIP_WEIGHTS}) or a big_vision .npz file")
    names = {p.name for p in path.iterdir()}
    if not any(n.endswith(".safetensors") for n in names) and any(n.endswith(".npz") for n in names):
        return "big_vision"
    if config_file(names) == OPEN_CLIP_CONFIG:
        return "open_clip"
    if "config.json" in names:
        try:
            data = _json(path / "config.json")
        except CheckpointError:
            return "transformers"  # the config reader names what is wrong with it
        if isinstance(data.get("architecture"), str) and "model_type" not in data:
            return "timm"
    return "transformers"


def scan(path: Path, prefix: Optional[str] = None, config: Optional[SiglipVisionConfig] = None) -> Checkpoint:
    """Config and tensor headers of a local checkpoint of any format, its tensors under transformers' names."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "big_vision":
        return _scan_npz(_npz_file(path), prefix, config)
    if kind != "transformers":
        return _scan_timm(path, kind, prefix, config)
    checkpoint = scan_transformers(path, prefix, config)
    if checkpoint.prefix + ANCHOR in checkpoint.tensors:
        return checkpoint
    if checkpoint.config_source != "the config= argument":
        raise CheckpointError(
            f"{path} holds timm-named tensors (prefix {checkpoint.prefix!r}) but no timm config.json (with "
            f"'architecture') or {OPEN_CLIP_CONFIG}; add the library's config file, or pass config= with the geometry")
    return _scan_timm(path, "timm", checkpoint.prefix, config)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _npz_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.npz"))
    if len(found) != 1:
        raise CheckpointError(f"{path} holds several .npz files {[p.name for p in found]}; pass the one to load")
    return found[0]


def _format_config(path: Path, kind: str) -> tuple[dict[str, Any], Any, str]:
    """``(config fields, preprocessing, where they came from)`` from a timm or open_clip folder's config file."""
    if kind == "open_clip":
        where = str(path / OPEN_CLIP_CONFIG)
        fields, preprocessing = timm_format.open_clip_config(_json(path / OPEN_CLIP_CONFIG), where)
        return fields, preprocessing, where
    data, where = _json(path / "config.json"), str(path / "config.json")
    fields = timm_format.timm_config(data["architecture"], data.get("model_args") or {}, data.get("global_pool"), where)
    preprocessing = timm_format.timm_preprocessing(data.get("pretrained_cfg") or {}, fields["image_size"], where)
    return fields, preprocessing, f"{where} (timm architecture {data['architecture']!r})"


def _scan_timm(path: Path, kind: str, prefix: Optional[str], config: Optional[SiglipVisionConfig]) -> Checkpoint:
    """A timm or open_clip folder: their safetensors' headers, timm's names mapped onto transformers'."""
    try:
        if config is None:
            fields, preprocessing, source = _format_config(path, kind)
            config = SiglipVisionConfig(**fields, preprocessing=preprocessing)
        else:
            source = "the config= argument"
        headers = _weights(path, kind, prefix)
        found = tower_prefix(headers, prefix, str(path))
        mapped, ignored = timm_format.timm_tensors({k: v.shape for k, v in headers.items()}, found, str(path))
    except ValueError as err:  # config files and names that are not what the format says: say so, typed
        raise CheckpointError(str(err)) from None
    if ignored:
        logger.info("%s: ignoring %s (a classifier after the pooled output)", path, ignored)
    infos = {ours: _info(ours, m, headers[m.keys[0]]) for ours, m in mapped.items()}
    checkpoint = Checkpoint(path, f"{source}, {kind} names under {found!r}", config, "", infos,
                            lambda info: _open_safetensors(mapped[info.name], headers))
    check_config(checkpoint)
    return checkpoint


def _weights(path: Path, kind: str, prefix: Optional[str]) -> dict[str, TensorInfo]:
    """Headers of the folder's weights: ``open_clip_model.safetensors`` for open_clip (never its pickle twin)."""
    if kind == "open_clip" and (path / OPEN_CLIP_WEIGHTS).is_file():
        return read_header(path / OPEN_CLIP_WEIGHTS)
    return tower_headers(path, prefix)


def _info(name: str, mapped: Mapped, first: TensorInfo) -> TensorInfo:
    """A transformers-named entry standing for ``mapped``, ordered (and typed) like its first stored tensor."""
    return TensorInfo(name, first.dtype, mapped.shape, first.start, first.start, first.file)


@contextlib.contextmanager
def _open_safetensors(mapped: Mapped, headers: Mapping[str, TensorInfo]) -> Iterator[Any]:
    """``mapped``'s source over lazy safetensors slices; each file mapped once, for as long as the block lasts."""
    with contextlib.ExitStack() as stack:
        files: dict[str, Any] = {}
        bases = []
        for key in mapped.keys:
            file = headers[key].file
            if file not in files:
                files[file] = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
            bases.append(files[file].get_slice(key))
        yield mapped.build(bases)


def _scan_npz(path: Path, prefix: Optional[str], config: Optional[SiglipVisionConfig]) -> Checkpoint:
    """A big_vision ``.npz``: member headers only; geometry from their shapes unless ``config`` is given."""
    try:
        archive = npz.NpzArchive(path)
        found = npz.find_npz_prefix(archive.members, prefix, str(path))
        mapped, ignored, order = npz.npz_tensors(archive.members, found, str(path))
        source = "the config= argument"
        if config is None:
            config, source = SiglipVisionConfig(**npz.npz_config(archive.members, found, str(path))), "the tensors' shapes"
        infos = {ours: _npz_info(ours, m, archive, order[ours]) for ours, m in mapped.items()}
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if ignored:
        logger.info("%s: ignoring %s (a projection after the pooled output)", path, ignored)
    checkpoint = Checkpoint(path, f"{source}, big_vision members under {found!r}", config, "", infos,
                            _npz_opener(archive, mapped))
    check_config(checkpoint)
    return checkpoint


def _npz_info(name: str, mapped: Mapped, archive: npz.NpzArchive, order: int) -> TensorInfo:
    member = archive.members[mapped.keys[0]]
    if member.dtype not in npz.NPZ_DTYPES:
        raise ValueError(f"{archive.path}: member {member.key!r} is {member.dtype}; expected float16, float32 or float64")
    return TensorInfo(name, npz.NPZ_DTYPES[member.dtype], mapped.shape, order, order, str(archive.path))


def _npz_opener(archive: npz.NpzArchive, mapped: Mapping[str, Mapped]) -> Callable[[TensorInfo], Any]:
    @contextlib.contextmanager
    def opener(info: TensorInfo) -> Iterator[Any]:
        entry = mapped[info.name]
        yield entry.build([archive.array(key) for key in entry.keys])

    return opener
