"""The sharded output folder of a run, laid out as clip-retrieval writes it (so autofaiss reads it as it is).

One `ShardWriter` per shard spools its rows to disk and commits them atomically, stats file last, so that
a killed run never leaves a shard that looks complete; `completed_shards` says which are, and
`remove_incomplete` clears what killed writers left. The manifest describes the run, for ``--resume``. The
layout and the reasons for it: docs/encode-design.md#the-folder-of-shards.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Optional, Union

import numpy as np
import torch

from tp_siglip.sources import ShardSpec, require_pyarrow

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ShardWriter",
    "completed_shards",
    "index_width",
    "make_manifest",
    "read_manifest",
    "remove_incomplete",
    "write_atomically",
    "write_manifest",
]

logger = logging.getLogger(__name__)

FORMAT = "tp-siglip-embeddings"
FORMAT_VERSION = 1
EMBEDDING_FOLDER = "img_emb"
_META_COLUMNS = ("key", "shard", "source")
_ROW_GROUP = 65_536
_CHUNK = 8 << 20
_STATS = re.compile(r"stats_(\d+)\.json")
_SPOOL = re.compile(r"\.spool-\d+-\d+-[0-9a-f]+")
#: a shard's file in its folder (``<folder>_NNNNN.<ext>``), or its hidden temporary (``.<that>.PID.RAND.tmp``)
_SHARD_FILE = re.compile(r"(\.)?([a-z][a-z0-9_]*)_(\d+)\.(?:npy|parquet|json)(?(1)\.\d+\.[0-9a-f]+\.tmp)")


def index_width(shard_count: int) -> int:
    """Digits of the zero-padded shard index in file names: at least 5, more for 100,000+ shards."""
    return max(5, len(str(max(shard_count - 1, 0))))


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # e.g. Windows: folders cannot be opened
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_atomically(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` atomically: ``fill(binary file)`` writes a hidden temporary, then fsync + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as target:
            fill(target)
            target.flush()
            os.fsync(target.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _write_json(path: Path, value: Any) -> None:
    encoded = (json.dumps(value, indent=1) + "\n").encode("utf-8")
    write_atomically(path, lambda target: target.write(encoded))


# ---------------------------------------------------------------------------------------------------- manifest


def make_manifest(
    shards: Sequence[ShardSpec], *, model: str, dtype: str, embedding: str, hidden_size: int, config: dict, **extra: Any
) -> dict:
    """The manifest of a run (``extra`` keys are kept as given, e.g. ``world_size``)."""
    from tp_siglip import __version__

    run = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model, "dtype": dtype, "embedding": embedding}
    run |= {"hidden_size": int(hidden_size), "config": config, "tp_siglip_version": __version__, **extra}
    return {**run, "shards": [_shard_entry(s) for s in shards]}


def _shard_entry(spec: ShardSpec) -> dict:
    """A shard in the manifest; a plain-file shard also by a digest of its files, so a resume sees them change."""
    entry = {"index": spec.index, "name": spec.name, "kind": spec.kind, "source": spec.source}
    if spec.files:
        entry["files_sha1"] = hashlib.sha1("\n".join(spec.files).encode("utf-8", "surrogateescape")).hexdigest()
    return entry


def write_manifest(root: Union[str, Path], manifest: dict) -> None:
    """Write ``DIR/manifest.json`` (what :func:`make_manifest` made) atomically; ``root`` is created if missing."""
    _write_json(Path(root) / "manifest.json", manifest)


def read_manifest(root: Union[str, Path]) -> dict:
    """``DIR/manifest.json``; :class:`ValueError` naming the problem when it is missing or malformed."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: '{root}' is not a tp-siglip embeddings folder (or its run died before starting)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f'{path} is not a tp-siglip manifest (no "format": "{FORMAT}")')
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this tp-siglip reads up to {FORMAT_VERSION}: upgrade tp-siglip")
    if not isinstance(manifest.get("shards"), list) or not isinstance(manifest.get("embedding"), str):
        raise ValueError(f"{path} lacks its 'shards' list or 'embedding' name: the file is damaged")
    return manifest


# ---------------------------------------------------------------------------------------------------- writer


def _as_numpy(value: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """Rows as a contiguous numpy array; floating point ones as float32, unless float16."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() and value.dtype != torch.float16 else value).numpy()
    if value.dtype.kind == "f" and value.dtype != np.float16:
        value = value.astype(np.float32, copy=False)
    return np.ascontiguousarray(value)


def _utf8(text: str) -> str:
    """``text`` as parquet can store it: a file name's bytes that are not UTF-8 (Python's surrogate escapes) as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _kind_of(value: Any) -> Optional[str]:
    """A metadata value's kind (docs/encode-design.md#the-folder-of-shards); None for a missing value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(1 << 63) <= value < (1 << 63) else "json"
    if isinstance(value, float):
        return "float"
    return "str" if isinstance(value, str) else "json"


class _Spooled(NamedTuple):
    """One named array's rows, appended to a raw file in the spool folder."""

    file: BinaryIO
    dtype: np.dtype
    row_shape: tuple[int, ...]

    def write_npy(self, rows: int, target: BinaryIO) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(target, header)
        self.file.flush()
        self.file.seek(0)
        shutil.copyfileobj(self.file, target, _CHUNK)


class ShardWriter:
    """Writes one shard of the folder, in one process: ``tensors[embedding]`` goes to ``img_emb/``, the others to
    ``<name>/``; ``shard_count`` sets the width of the file names. ``metadata=False``: no parquet file (nor
    pyarrow), the stats file lists the keys (the work folder of a ``.safetensors`` output)."""

    def __init__(
        self, root: Union[str, Path], spec_index: int, name: str, embedding: str, *, source: str, shard_count: int,
        metadata: bool = True,
    ) -> None:
        self.root, self.index, self.name, self.embedding, self.metadata = Path(root), int(spec_index), name, embedding, metadata
        self.source, self.stem = source, f"{self.index:0{index_width(shard_count)}d}"
        self.spool = self.root / f".spool-{self.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.spool.mkdir(parents=True)
        self.rows = 0
        self.keys: list[str] = []
        self.metas: list[dict[str, Any]] = []  # column -> value, per row
        self._arrays: dict[str, _Spooled] = {}
        self._closed = False

    def add(self, keys: Sequence[str], metas: Sequence[dict], tensors: dict[str, Union[np.ndarray, torch.Tensor]]) -> None:
        """Append rows: their keys, JSON-able metadata and named row tensors, each with the names, row shapes and
        dtypes of the first add (``tensors[embedding]`` is (n, hidden))."""
        if self._closed:
            raise ValueError(f"shard {self.name!r}: add() after commit() or abort()")
        arrays = {name: _as_numpy(value) for name, value in tensors.items()}
        layout = {name: (str(array.dtype), array.shape[1:]) for name, array in arrays.items()}
        earlier = {name: (str(spooled.dtype), spooled.row_shape) for name, spooled in self._arrays.items()} or layout
        if self.embedding not in arrays or layout != earlier:
            raise ValueError(f"shard {self.name!r}: rows {layout}, expected the embedding {self.embedding!r} and {earlier}")
        if len(metas) != len(keys) or any(len(array) != len(keys) for array in arrays.values()):
            counts = {name: len(array) for name, array in arrays.items()}
            raise ValueError(f"shard {self.name!r}: {len(keys)} keys, {len(metas)} metas and rows {counts}: one each per row")
        rows = [self._meta_row(key, meta) for key, meta in zip(keys, metas)]
        for number, (name, array) in enumerate(arrays.items()):
            if name not in self._arrays:
                spool = open(self.spool / f"{number}.raw", "w+b")  # noqa: SIM115 - closed by abort()
                self._arrays[name] = _Spooled(spool, array.dtype, array.shape[1:])
            self._arrays[name].file.write(array.tobytes())
        self.keys += [str(key) for key in keys]
        self.metas += rows
        self.rows += len(keys)

    def _meta_row(self, key: str, meta: dict) -> dict[str, Any]:
        """A row's meta by column: a key named like a fixed column goes to ``meta_<key>``, or nowhere if equal to it."""
        if not isinstance(meta, dict):
            raise TypeError(f"shard {self.name!r}: the meta of key {key!r} is {type(meta).__name__}, not a dict")
        fixed = dict(zip(_META_COLUMNS, (key, self.name, self.source)))
        row = {}
        for field, value in meta.items():
            column = str(field)
            if column not in fixed or fixed[column] != value:
                row[f"meta_{column}" if column in fixed else column] = value
        return row

    def _write_parquet(self, target: BinaryIO) -> None:
        pa, pq = require_pyarrow()
        keys, source = [_utf8(key) for key in self.keys], _utf8(self.source)
        columns = {"key": keys, "shard": [self.name] * self.rows, "source": [source] * self.rows}
        table = {name: pa.array(values, pa.string()) for name, values in columns.items()}
        types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(), "json": pa.string()}
        for name in dict.fromkeys(column for row in self.metas for column in row):  # in order of first appearance
            values = [row.get(name) for row in self.metas]
            kinds = {_kind_of(value) for value in values} - {None}
            kind = kinds.pop() if len(kinds) == 1 else "float" if kinds == {"int", "float"} else "json"
            if kind == "json":
                values = [None if value is None else json.dumps(value, sort_keys=True, default=str) for value in values]
            elif kind == "str":  # a plain file's image_path, like its key
                values = [None if value is None else _utf8(value) for value in values]
            table[name] = pa.array(values, types[kind])
        pq.write_table(pa.table(table), target, row_group_size=_ROW_GROUP)

    def _path(self, folder: str, suffix: str) -> Path:
        return self.root / folder / f"{folder}_{self.stem}{suffix}"

    def commit(self, skipped: Sequence[tuple[str, str]], seconds: float) -> dict:
        """Write the shard's files atomically, the stats file last (see the module docstring); returns the stats."""
        if self._closed:
            raise ValueError(f"shard {self.name!r}: commit() after commit() or abort()")
        stats_path = self._path("stats", ".json")
        stats_path.unlink(missing_ok=True)  # an earlier complete copy of this shard stops counting as complete now
        _fsync_folder(stats_path.parent)
        outputs: dict[str, Optional[_Spooled]] = {}  # folder -> its rows (None: the metadata)
        for name, spooled in self._arrays.items():
            outputs[EMBEDDING_FOLDER if name == self.embedding else name] = spooled
        if self.metadata:
            outputs["metadata"] = None
        files: dict[str, str] = {}
        shapes: dict[str, list[int]] = {}
        try:
            for folder, spooled in outputs.items() if self.rows else []:  # a shard without rows writes only its stats file
                path = self._path(folder, ".npy" if spooled else ".parquet")
                write_atomically(path, functools.partial(spooled.write_npy, self.rows) if spooled else self._write_parquet)
                files[folder] = path.relative_to(self.root).as_posix()
                shapes[folder] = [self.rows, *(spooled.row_shape if spooled else ())]
            stats = {
                "index": self.index,
                "name": self.name,
                "source": self.source,
                "embedding": self.embedding,
                "rows": self.rows,
                "skipped": [[str(key), str(reason)] for key, reason in skipped],
                "seconds": round(float(seconds), 3),
                "files": files,
                "shapes": shapes,
                "done": True,
            }
            if not self.metadata:
                stats["keys"] = self.keys
            _write_json(stats_path, stats)
        except BaseException:
            for relative in files.values():
                (self.root / relative).unlink(missing_ok=True)
            self.abort()
            raise
        self.abort()
        logger.debug("shard %s: %d row(s) committed, %d skipped", self.name, self.rows, len(skipped))
        return stats

    def abort(self) -> None:
        """Drop the spooled rows (commit does too, once done); nothing of this writer remains that could look complete."""
        if not self._closed:
            self._closed = True
            for spooled in self._arrays.values():
                spooled.file.close()
        shutil.rmtree(self.spool, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- completeness


def _complete_stats(root: Path, path: Path) -> Optional[dict]:
    """The stats in ``path`` if its shard is complete (every file listed holds the rows recorded), else None."""
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(stats, dict) and stats.get("done") is True and isinstance(stats.get("rows"), int)):
            return None
        for name, relative in stats.get("files", {}).items():
            if not relative.endswith(".npy"):
                if require_pyarrow()[1].ParquetFile(root / relative).metadata.num_rows != stats["rows"]:
                    return None
                continue
            with open(root / relative, "rb") as file:  # the header's shape, and exactly its bytes after it
                version = np.lib.format.read_magic(file)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(file)
                whole = os.fstat(file.fileno()).st_size - file.tell() == math.prod(shape) * dtype.itemsize
            recorded = stats.get("shapes", {}).get(name, list(shape))
            if not whole or not shape or shape[0] != stats["rows"] or list(shape) != recorded:
                return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return stats


def completed_shards(root: Union[str, Path]) -> dict[int, dict]:
    """``{index: stats}`` of the complete shards in ``root`` (stats file present and its files agreeing)."""
    folder = Path(root) / "stats"
    found: dict[int, dict] = {}
    for entry in os.scandir(folder) if folder.is_dir() else []:
        match = _STATS.fullmatch(entry.name)
        if match is None:
            continue
        stats = _complete_stats(Path(root), Path(entry.path))
        if stats is not None and stats.get("index") == int(match.group(1)):
            found[int(match.group(1))] = stats
    return dict(sorted(found.items()))


def remove_incomplete(root: Union[str, Path]) -> list[Path]:
    """Remove what killed writers left, in one pass over the folder: spool folders and temporaries, and the
    files of shards that are not complete. Call it only while no writer is alive. Returns what was removed."""
    root = Path(root)
    complete = set(completed_shards(root))
    removed: list[Path] = []
    for folder in os.scandir(root):
        if _SPOOL.fullmatch(folder.name) is not None and folder.is_dir():
            shutil.rmtree(folder.path, ignore_errors=True)
            removed.append(Path(folder.path))
        elif folder.is_dir() and not folder.name.startswith("."):
            for entry in os.scandir(folder.path):
                match = _SHARD_FILE.fullmatch(entry.name)
                if match is None or match.group(2) != folder.name or not entry.is_file():
                    continue
                if match.group(1) or int(match.group(3)) not in complete:
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(Path(entry.path))
    for path in removed:
        logger.debug("removed leftover %s", path)
    return removed
