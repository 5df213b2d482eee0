"""The job's outputs read back: a folder of shards, or a ``.safetensors`` file, as memory-mapped rows.

`open_embeddings` opens either; `ShardedArray` indexes per-shard ``.npy`` memmaps as one array of rows, so
``emb[i]``, ``emb[a:b]``, ``emb[mask]`` and `ShardedArray.iter_batches` read only what they return. A folder
is read from its complete shards only (`embeddings_dir.completed_shards`), in shard order, with its parquet
metadata concatenated (columns that differ between shards become nulls or a common type).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from tp_siglip.embeddings_dir import _META_COLUMNS, EMBEDDING_FOLDER, completed_shards, read_manifest
from tp_siglip.embeddings_file import EarlierOutput
from tp_siglip.sources import require_pyarrow

__all__ = ["Embeddings", "EmbeddingsFile", "ShardedArray", "open_embeddings"]

logger = logging.getLogger(__name__)


class ShardedArray:
    """Row-indexable view of per-shard ``.npy`` memmaps, as one array of ``len()`` rows; only what is asked for
    is read (``emb[i]``, ``emb[a:b]``, ``emb[[i, j, k]]``, ``emb[mask]``, ``emb[rows, columns]``)."""

    def __init__(self, shards: list[np.ndarray], name: str) -> None:
        self.shards, self.name = shards, name
        self.offsets = np.cumsum([0, *(len(shard) for shard in shards)])
        self.row_shape: tuple[int, ...] = tuple(shards[0].shape[1:]) if shards else ()
        self.dtype = shards[0].dtype if shards else np.dtype(np.float32)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    def __getitem__(self, item: Any) -> np.ndarray:
        if isinstance(item, tuple):
            rows = self[item[0]]
            return rows[item[1:]] if np.ndim(item[0]) == 0 and not isinstance(item[0], slice) else rows[(slice(None), *item[1:])]
        if isinstance(item, (int, np.integer)):
            return self._take_one(int(item))
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step == 1:
                return self._take_range(start, max(start, stop))
            return self._take(np.arange(start, stop, step))
        return self._take(np.asarray(item))

    def _take_one(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} is out of range for {len(self)} rows of {self.name}")
        index %= max(len(self), 1)
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return np.array(self.shards[shard][index - self.offsets[shard]])

    def _take_range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for shard, array in enumerate(self.shards):
            low, high = max(start, self.offsets[shard]), min(stop, self.offsets[shard + 1])
            if low < high:
                parts.append(array[low - self.offsets[shard] : high - self.offsets[shard]])
        return np.concatenate(parts) if parts else np.empty((0, *self.row_shape), self.dtype)

    def _take(self, indices: np.ndarray) -> np.ndarray:
        if indices.dtype == bool:
            if indices.shape != (len(self),):
                raise IndexError(f"a boolean mask must have {len(self)} entries, got shape {indices.shape}")
            indices = np.flatnonzero(indices)
        if indices.dtype.kind not in "iu" or indices.ndim != 1:
            raise IndexError(f"rows must be an int, a slice, a 1-D int array or a bool mask, got {indices.dtype}{list(indices.shape)}")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"row indices must lie in [-{len(self)}, {len(self)}), got {indices.min()}..{indices.max()}")
        indices = np.where(indices < 0, indices + len(self), indices)
        out = np.empty((len(indices), *self.row_shape), self.dtype)
        owner = np.searchsorted(self.offsets, indices, side="right") - 1
        for shard in np.unique(owner):
            chosen = owner == shard
            out[chosen] = self.shards[shard][indices[chosen] - self.offsets[shard]]
        return out

    def iter_batches(self, batch_size: int = 65_536) -> Iterator[np.ndarray]:
        """Consecutive in-memory batches of ``batch_size`` rows (the last may be shorter), in row order."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield self._take_range(start, min(start + batch_size, len(self)))


class Embeddings(ShardedArray):
    """A corpus folder opened for reading (see :func:`open_embeddings`): the embedding rows of its complete
    shards in shard order, their metadata, and the extra arrays."""

    def __init__(self, root: Path, manifest: dict, stats: list[dict]) -> None:
        self.root, self.manifest, self.stats = root, manifest, stats
        self.missing = [s["index"] for s in manifest["shards"] if s["index"] not in {entry["index"] for entry in stats}]
        super().__init__(self._load(EMBEDDING_FOLDER), manifest["embedding"])
        self.dim = self.row_shape[0] if self.row_shape else int(manifest.get("hidden_size", 0))

    def _load(self, folder: str) -> list[np.ndarray]:
        with_rows = [entry for entry in self.stats if entry["rows"]]
        if any(folder not in entry["files"] for entry in with_rows):
            raise KeyError(f"{self.root} has no array {folder!r} in every shard; it has {self.array_names()}")
        return [np.load(self.root / entry["files"][folder], mmap_mode="r") for entry in with_rows]

    def array_names(self) -> list[str]:
        """The extra per-row arrays stored besides the embedding (e.g. ``tokens``)."""
        names = {name for entry in self.stats for name in entry["files"]} - {EMBEDDING_FOLDER, "metadata"}
        return sorted(names)

    def array(self, name: str) -> ShardedArray:
        """An extra per-row array (e.g. ``tokens``), indexed like the embeddings."""
        return ShardedArray(self._load(name), name)

    def metadata(self, columns: Optional[Sequence[str]] = None) -> Any:
        """The metadata of every row, as one ``pyarrow.Table`` in row order (only ``columns`` when given)."""
        pa, pq = require_pyarrow()
        tables = []
        for entry in (entry for entry in self.stats if entry["rows"]):
            path = self.root / entry["files"]["metadata"]
            names = pq.ParquetFile(path).schema_arrow.names
            table = pq.read_table(path, columns=[c for c in columns if c in names] if columns is not None else None)
            tables.append(table)
        if not tables:
            return pa.table({name: pa.array([], pa.string()) for name in (columns or _META_COLUMNS)})
        table = _concat(pa, tables)
        if columns is not None:
            absent = [c for c in columns if c not in table.column_names]
            if absent:
                raise KeyError(f"no metadata column(s) {absent} in {self.root}; the columns are {table.column_names}")
            table = table.select(list(columns))
        return table

    def keys(self) -> list[str]:
        """Every row's key, in row order."""
        return self.metadata(["key"]).column("key").to_pylist()

    def __repr__(self) -> str:
        return f"Embeddings({str(self.root)!r}: {len(self)} rows x {self.dim}, {len(self.stats)} shard(s), {len(self.missing)} missing)"


def _concat(pa: Any, tables: list[Any]) -> Any:
    """Concatenate shard tables whose columns or types may differ: missing columns become nulls, int with float
    becomes float64, other type clashes become strings."""
    types: dict[str, Any] = {}
    for table in tables:
        for field in table.schema:
            old = types.get(field.name)
            if old is None or old == field.type or pa.types.is_null(field.type):
                types.setdefault(field.name, field.type)
            elif pa.types.is_null(old):
                types[field.name] = field.type
            elif {str(old), str(field.type)} == {"int64", "double"}:
                types[field.name] = pa.float64()
            else:
                types[field.name] = pa.string()
    unified = []
    for table in tables:
        for position, field in enumerate(table.schema):
            if field.type != types[field.name]:
                table = table.set_column(position, field.name, table.column(position).cast(types[field.name]))
        unified.append(table)
    return pa.concat_tables(unified, promote_options="default")


class EmbeddingsFile(ShardedArray):
    """A ``.safetensors`` output of the job opened for reading (see :func:`open_embeddings`): its embedding rows
    memory-mapped, its paths as keys, its metadata (strings) as ``info``."""

    def __init__(self, path: Path) -> None:
        earlier = EarlierOutput.read(path)
        self.path, self.info, self._keys = path, earlier.metadata, earlier.paths
        name = earlier.metadata.get("embedding", "")
        if name not in earlier.tensors:
            raise ValueError(f"{path} has no embedding tensor {name!r}: it was not written by tp-siglip encode")
        entry = earlier.tensors[name]
        dtype = np.float16 if entry.dtype == torch.float16 else np.float32
        rows = [np.memmap(path, dtype=dtype, mode="r", offset=entry.start, shape=entry.shape)] if entry.shape[0] else []
        super().__init__(rows, name)
        self.dtype, self.row_shape, self.dim = np.dtype(dtype), tuple(entry.shape[1:]), int(entry.shape[1])

    def keys(self) -> list[str]:
        """Every row's path, in row order."""
        return list(self._keys)


def open_embeddings(root: Union[str, Path]) -> Union[Embeddings, EmbeddingsFile]:
    """Open the job's output for reading: a corpus folder (only complete shards are included; a warning names
    how many planned shards are not), or a ``.safetensors`` file. Nothing is loaded until asked for; rows are
    float32 or float16, as stored.

    Raises:
        ValueError: ``root`` has no readable manifest, or is not a file the job wrote.
    """
    root = Path(root)
    if root.is_file():
        try:
            return EmbeddingsFile(root)
        except ValueError as err:  # OutputFileError too
            raise ValueError(f"cannot open {root}: {err}") from None
    manifest = read_manifest(root)
    stats = list(completed_shards(root).values())
    embeddings = Embeddings(root, manifest, stats)
    if embeddings.missing:
        logger.warning("%s: %d of %d planned shard(s) are not complete (first: %s); reading the other %d",
                       root, len(embeddings.missing), len(manifest["shards"]), embeddings.missing[0], len(stats))  # fmt: skip
    return embeddings
