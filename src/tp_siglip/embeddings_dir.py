"""The sharded output folder of a run, laid out as clip-retrieval writes it (so autofaiss reads it as it is).

One `ShardWriter` per shard spools its rows to disk and commits them atomically, stats file last, so that
a killed run never leaves a shard that looks complete; `completed_shards` says which are, and
`remove_incomplete` clears what killed writers left. The manifest describes the run, for ``--resume``. The
layout and the reasons for it: docs/encode-design.md#the-folder-of-shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import numpy as np
import torch

from tp_siglip.sources import ShardSpec, require_pyarrow

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ShardWriter",
    "check_same_run",
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
_RESERVED = {"img_emb", "metadata", "stats", "manifest"}
_META_COLUMNS = ("key", "shard", "source")
_ROW_GROUP = 65_536
_CHUNK = 8 << 20
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def index_width(shard_count: int) -> int:
    """Digits of the zero-padded shard index in file names: at least 5, more for 100,000+ shards."""
    return max(5, len(str(max(shard_count - 1, 0))))


# ---------------------------------------------------------------------------------------------------- atomic files


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_atomically(path: Path, fill: Any) -> None:
    """Create ``path`` atomically: ``fill(binary file)`` writes a hidden temporary, then fsync + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
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
    encoded = (json.dumps(value, indent=1, sort_keys=False) + "\n").encode("utf-8")
    write_atomically(path, lambda target: target.write(encoded))


# ---------------------------------------------------------------------------------------------------- manifest


def make_manifest(
    shards: Sequence[ShardSpec],
    *,
    model: str,
    dtype: str,
    embedding: str,
    hidden_size: int,
    config: dict,
    **extra: Any,
) -> dict:
    """The manifest of a run (``extra`` keys are kept as given, e.g. ``world_size``)."""
    from tp_siglip import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "dtype": dtype,
        "embedding": embedding,
        "hidden_size": int(hidden_size),
        "config": config,
        "tp_siglip_version": __version__,
        **extra,
        "shards": [{"index": s.index, "name": s.name, "kind": s.kind, "source": s.source} for s in shards],
    }


def write_manifest(root: Union[str, Path], manifest: dict) -> None:
    """Write ``DIR/manifest.json`` atomically (``root`` is created if missing)."""
    missing = [key for key in ("embedding", "shards") if key not in manifest]
    if missing:
        raise ValueError(f"the manifest needs {', '.join(missing)}; build it with make_manifest()")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    _write_json(Path(root) / "manifest.json", manifest)


def read_manifest(root: Union[str, Path]) -> dict:
    """``DIR/manifest.json``; :class:`ValueError` naming the problem when it is missing or malformed."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: '{root}' is not a tp-siglip embeddings folder (or its run died before starting)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tp-siglip manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this tp-siglip reads up to {FORMAT_VERSION}: upgrade tp-siglip")
    if not isinstance(manifest.get("shards"), list) or not isinstance(manifest.get("embedding"), str):
        raise ValueError(f"{path} lacks its 'shards' list or 'embedding' name: the file is damaged")
    return manifest


_COMPARED = ("model", "dtype", "embedding", "hidden_size", "config")


def check_same_run(manifest: dict, expected: dict) -> Optional[str]:
    """``None`` if ``manifest`` (on disk) describes the run ``expected`` would write, else a one-line message
    naming what differs and the fix. Compares model, dtype, embedding, hidden size, config, then the shards."""
    fix = "use another output folder, or rerun with the options and inputs of the run that wrote it"
    for key in _COMPARED:
        if key in expected and manifest.get(key) != expected[key]:
            if key == "config" and isinstance(manifest.get(key), dict) and isinstance(expected[key], dict):
                there, here = manifest[key], expected[key]
                fields = sorted(k for k in set(there) | set(here) if there.get(k) != here.get(k))
                detail = ", ".join(f"{k}: {there.get(k)!r} there, {here.get(k)!r} now" for k in fields[:3])
                return f"the output folder holds a run with another tower config ({detail}); {fix}"
            return f"the output folder holds a run with {key} {manifest.get(key)!r}, this run has {expected[key]!r}; {fix}"
    if "shards" in expected:
        there = [(s.get("name"), s.get("kind"), s.get("source")) for s in manifest.get("shards", [])]
        here = [(s["name"], s["kind"], s["source"]) for s in expected["shards"]]
        if len(there) != len(here):
            return f"the output folder's run planned {len(there)} shard(s), this run plans {len(here)} (the inputs differ); {fix}"
        for index, (old, new) in enumerate(zip(there, here)):
            if old != new:
                return f"shard {index} differs: {old[0]!r} ({old[1]} {old[2]!r}) there, {new[0]!r} ({new[1]} {new[2]!r}) now; {fix}"
    return None


# ---------------------------------------------------------------------------------------------------- metadata types


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(1 << 63) <= value < (1 << 63) else "json"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"


def _merge_kind(old: str, new: str) -> str:
    if old == new or new == "null":
        return old
    if old == "null":
        return new
    if {old, new} == {"int", "float"}:
        return "float"
    return "json"


def _column_name(key: str, value: Any, fixed: dict[str, str]) -> Optional[str]:
    """Where a meta key goes: its own name, ``meta_<key>`` on a collision, or None (same value as the column)."""
    if key not in _META_COLUMNS:
        return key
    return None if fixed[key] == value else f"meta_{key}"


# ---------------------------------------------------------------------------------------------------- writer


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.is_floating_point() and value.dtype != torch.float16:
            value = value.to(torch.float32)
        value = value.contiguous().numpy()
    elif not isinstance(value, np.ndarray):
        raise TypeError(f"tensor {name!r} must be a numpy array or torch.Tensor, got {type(value).__name__}")
    if value.dtype.kind == "f" and value.dtype != np.float16:
        value = value.astype(np.float32, copy=False)
    elif value.dtype.kind not in "biuf":
        raise TypeError(f"tensor {name!r} has dtype {value.dtype}; store floating, integer or bool arrays")
    return np.ascontiguousarray(value)


class _Spooled:
    """One named array's rows, appended to a raw file."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path, self.dtype, self.row_shape = path, dtype, row_shape
        self.file: BinaryIO = open(path, "w+b")  # noqa: SIM115 - closed by ShardWriter

    def write_npy(self, target: BinaryIO, rows: int) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(target, header)
        self.file.flush()
        self.file.seek(0)
        shutil.copyfileobj(self.file, target, _CHUNK)


class _Metadata:
    """A shard's keys and metadata, each column's kind noted as rows come (see docs/encode-design.md), written
    as parquet at commit. Held in memory: the shard's listing already holds as much."""

    def __init__(self, name: str, source: str) -> None:
        self.name, self.source = name, source
        self.keys: list[str] = []
        self.rows: list[dict[str, Any]] = []  # column -> value, per row
        self.kinds: dict[str, str] = {}

    def add(self, keys: Sequence[str], metas: Sequence[dict]) -> None:
        fixed = {"key": "", "shard": self.name, "source": self.source}
        for key, meta in zip(keys, metas):
            if not isinstance(meta, dict):
                raise TypeError(f"shard {self.name!r}: the meta of key {key!r} is {type(meta).__name__}, not a dict")
            fixed["key"], row = key, {}
            for field, value in meta.items():
                column = _column_name(str(field), value, fixed)
                if column is not None:
                    row[column] = value
                    self.kinds[column] = _merge_kind(self.kinds.get(column, "null"), _kind_of(value))
            self.keys.append(str(key))
            self.rows.append(row)

    def write_parquet(self, target: BinaryIO) -> None:
        pa, pq = require_pyarrow()
        types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string(), "json": pa.string(), "null": pa.string()}
        count = len(self.keys)
        columns = {"key": pa.array(self.keys, pa.string()), "shard": pa.array([self.name] * count, pa.string()),
                   "source": pa.array([self.source] * count, pa.string())}  # fmt: skip
        for name, kind in self.kinds.items():
            values = [row.get(name) for row in self.rows]
            if kind == "json":
                values = [None if value is None else json.dumps(value, sort_keys=True, default=str) for value in values]
            columns[name] = pa.array(values, types[kind])
        pq.write_table(pa.table(columns), target, row_group_size=_ROW_GROUP)


class ShardWriter:
    """Writes one shard of the folder (one writer per shard, in one process). See the module docstring.

    ``spec_index``/``name``: the shard's plan index and name; ``embedding``: which of the tensors given to
    :meth:`add` is the embedding (stored in ``img_emb/``); the others go to ``<name>/<name>_NNNNN.npy``.
    ``source`` (the metadata's ``source`` column) and ``shard_count`` (the file names' zero padding) come
    from ``DIR/manifest.json`` unless given. ``metadata=False``: no parquet file; the stats file lists the keys
    (what the work folder of a ``.safetensors`` output keeps).
    """

    def __init__(
        self,
        root: Union[str, Path],
        spec_index: int,
        name: str,
        embedding: str,
        *,
        source: Optional[str] = None,
        shard_count: Optional[int] = None,
        metadata: bool = True,
    ) -> None:
        self.root, self.index, self.name, self.embedding = Path(root), int(spec_index), name, embedding
        if source is None or shard_count is None:
            shards = read_manifest(self.root)["shards"]
            if not 0 <= self.index < len(shards) or shards[self.index].get("name") != name:
                raise ValueError(f"shard {self.index} {name!r} is not in the plan of {self.root / 'manifest.json'}")
            source = shards[self.index].get("source", "") if source is None else source
            shard_count = len(shards) if shard_count is None else shard_count
        self.source, self.stem = source, f"{self.index:0{index_width(shard_count)}d}"
        self.metadata = metadata  # False: the keys go to the stats file, no parquet (no pyarrow needed)
        self.rows = 0
        self.spool = self.root / f".spool-{self.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.spool.mkdir(parents=True)
        self._arrays: dict[str, _Spooled] = {}
        self._meta = _Metadata(name, source)
        self._closed = False

    def add(self, keys: Sequence[str], metas: Sequence[dict], tensors: dict[str, Union[np.ndarray, torch.Tensor]]) -> None:
        """Append rows: their keys, JSON-able metadata and named row tensors (``tensors[embedding]`` is (n, hidden))."""
        if self._closed:
            raise ValueError(f"shard {self.name!r}: add() after commit() or abort()")
        arrays = {name: _as_numpy(name, value) for name, value in tensors.items()}
        self._check_rows(keys, metas, arrays)
        if not self._arrays:
            self._open_arrays(arrays)
        for name, array in arrays.items():
            self._arrays[name].file.write(array.tobytes())
        self._meta.add(keys, metas)
        self.rows += len(keys)

    def _check_rows(self, keys: Sequence[str], metas: Sequence[dict], arrays: dict[str, np.ndarray]) -> None:
        where = f"shard {self.name!r}"
        if self.embedding not in arrays:
            raise ValueError(f"{where}: tensors {sorted(arrays)} lack the embedding {self.embedding!r}")
        if arrays[self.embedding].ndim != 2:
            raise ValueError(f"{where}: the embedding must be (rows, hidden), got shape {arrays[self.embedding].shape}")
        counts = {name: (array.shape[0] if array.ndim else -1) for name, array in arrays.items()}
        if len(metas) != len(keys) or any(count != len(keys) for count in counts.values()):
            raise ValueError(f"{where}: {len(keys)} keys, {len(metas)} metas and rows {counts}: every add needs one of each per row")
        if self._arrays and set(arrays) != set(self._arrays):
            raise ValueError(f"{where}: tensors {sorted(arrays)}, earlier adds gave {sorted(self._arrays)}")
        for name, array in arrays.items():
            if name != self.embedding and (not _NAME.fullmatch(name) or name in _RESERVED):
                raise ValueError(f"{where}: extra array name {name!r} must match [a-z][a-z0-9_]* and not be one of {sorted(_RESERVED)}")
            spooled = self._arrays.get(name)
            if spooled is not None and (spooled.dtype != array.dtype or spooled.row_shape != array.shape[1:]):
                raise ValueError(f"{where}: {name!r} rows are {array.dtype}{list(array.shape[1:])}, earlier {spooled.dtype}{list(spooled.row_shape)}")

    def _open_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for number, (name, array) in enumerate(arrays.items()):
            self._arrays[name] = _Spooled(self.spool / f"{number}.raw", array.dtype, tuple(array.shape[1:]))

    def _path(self, folder: str, suffix: str) -> Path:
        return self.root / folder / f"{folder}_{self.stem}{suffix}"

    def commit(self, skipped: Sequence[tuple[str, str]], seconds: float) -> dict:
        """Write the shard's files atomically, the stats file last (see the module docstring); returns the stats."""
        if self._closed:
            raise ValueError(f"shard {self.name!r}: commit() after commit() or abort()")
        stats_path = self._path("stats", ".json")
        stats_path.unlink(missing_ok=True)  # an earlier complete copy of this shard stops counting as complete now
        _fsync_folder(stats_path.parent)
        written: list[Path] = []
        try:
            files, shapes = self._write_files(written)
            stats = {
                "index": self.index, "name": self.name, "source": self.source, "embedding": self.embedding,
                "rows": self.rows, "skipped": [[str(key), str(reason)] for key, reason in skipped],
                "seconds": round(float(seconds), 3), "files": files, "shapes": shapes, "done": True,
            }  # fmt: skip
            if not self.metadata:
                stats["keys"] = self._meta.keys
            _write_json(stats_path, stats)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            self.abort()
            raise
        self._close()
        logger.debug("shard %s: %d row(s) committed, %d skipped", self.name, self.rows, len(skipped))
        return stats

    def _write_files(self, written: list[Path]) -> tuple[dict[str, str], dict[str, list[int]]]:
        """The npy files and the parquet file (none without rows: see the module docstring)."""
        files: dict[str, str] = {}
        shapes: dict[str, list[int]] = {}
        if not self.rows:
            return files, shapes
        for name, spooled in self._arrays.items():
            folder = EMBEDDING_FOLDER if name == self.embedding else name
            path = self._path(folder, ".npy")
            write_atomically(path, lambda target, spooled=spooled: spooled.write_npy(target, self.rows))
            written.append(path)
            files[folder] = path.relative_to(self.root).as_posix()
            shapes[folder] = [self.rows, *spooled.row_shape]
        if not self.metadata:
            return files, shapes
        path = self._path("metadata", ".parquet")
        write_atomically(path, self._meta.write_parquet)
        written.append(path)
        files["metadata"] = path.relative_to(self.root).as_posix()
        shapes["metadata"] = [self.rows]
        return files, shapes

    def abort(self) -> None:
        """Drop the spooled rows; nothing of this writer remains that could look complete."""
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            for spooled in self._arrays.values():
                spooled.file.close()
        shutil.rmtree(self.spool, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- completeness


_STATS = re.compile(r"stats_(\d+)\.json")
_FINAL = re.compile(r"([a-z][a-z0-9_]*)_(\d+)\.(npy|parquet|json)")
_TEMP = re.compile(r"\.([a-z][a-z0-9_]*)_(\d+)\.(npy|parquet|json)\.\d+\.[0-9a-f]+\.tmp")
_SPOOL = re.compile(r"\.spool-(\d+)-\d+-[0-9a-f]+")


def _npy_shape(path: Path) -> tuple[int, ...]:
    """The shape in an .npy header; ValueError when the data that follows is not exactly that shape's bytes."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(file)
        data_bytes = os.fstat(file.fileno()).st_size - file.tell()
    if data_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f"{path}: {data_bytes} data bytes for shape {shape} of {dtype}")
    return tuple(shape)


def _check_stats(root: Path, path: Path) -> Optional[dict]:
    """The stats in ``path`` if its shard is complete (every listed file has the recorded rows), else None."""
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(stats, dict) and stats.get("done") is True and isinstance(stats.get("rows"), int)):
            return None
        for name, relative in stats.get("files", {}).items():
            file = root / relative
            if relative.endswith(".npy"):
                shape = _npy_shape(file)
                if not shape or shape[0] != stats["rows"] or list(shape) != stats.get("shapes", {}).get(name, list(shape)):
                    return None
            elif require_pyarrow()[1].ParquetFile(file).metadata.num_rows != stats["rows"]:
                return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return stats


def completed_shards(root: Union[str, Path]) -> dict[int, dict]:
    """``{index: stats}`` of the complete shards in ``root`` (stats file present and its files agreeing)."""
    folder = Path(root) / "stats"
    found: dict[int, dict] = {}
    if not folder.is_dir():
        return found
    for entry in os.scandir(folder):
        match = _STATS.fullmatch(entry.name)
        if match is not None:
            stats = _check_stats(Path(root), Path(entry.path))
            if stats is not None and stats.get("index") == int(match.group(1)):
                found[int(match.group(1))] = stats
    return dict(sorted(found.items()))


def remove_incomplete(root: Union[str, Path], index: Optional[int] = None) -> list[Path]:
    """Remove what killed runs left for shard ``index`` (every shard when ``None``, in one pass over the folder):
    spool folders and temporaries always, and the shard's final files when it is not complete. Call it only
    while no writer is alive for those shards. Returns what was removed."""
    root = Path(root)
    complete = set(completed_shards(root))
    removed: list[Path] = []
    for entry in os.scandir(root):
        match = _SPOOL.fullmatch(entry.name)
        if match is not None and entry.is_dir() and index in (None, int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        elif entry.is_dir() and not entry.name.startswith("."):
            removed += _remove_in(Path(entry.path), index, complete)
    for path in removed:
        logger.debug("removed leftover %s", path)
    return removed


def _remove_in(folder: Path, index: Optional[int], complete: set[int]) -> list[Path]:
    removed = []
    for entry in os.scandir(folder):
        temporary = _TEMP.fullmatch(entry.name)
        final = _FINAL.fullmatch(entry.name)
        match = temporary or final
        if match is None or match.group(1) != folder.name or not entry.is_file():
            continue
        number = int(match.group(2))
        if index not in (None, number) or (final is not None and number in complete):
            continue
        Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed
