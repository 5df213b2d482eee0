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

from tp_siglip.embeddings_dir import _META_COLUMNS, EMBEDDING_FOLDER, completed_shards, read_manifest
from tp_siglip.embeddings_file import EarlierOutput, work_folder
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
            return rows[item[1:]] if isinstance(item[0], (int, np.integer)) else rows[(slice(None), *item[1:])]
        if isinstance(item, (int, np.integer)):
            return self._take(np.array([int(item)]))[0]
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step == 1:
                return self._take_range(start, max(start, stop))
            item = np.arange(start, stop, step)
        return self._take(np.asarray(item))

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
        if indices.size == 0 and indices.ndim == 1:
            indices = indices.astype(np.int64)  # emb[[]]: no rows, as numpy gives
        if indices.dtype.kind not in "iu" or indices.ndim != 1:
            got = f"{indices.dtype}{list(indices.shape)}"
            raise IndexError(f"rows must be an int, a slice, a 1-D int array or a bool mask, got {got}")
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            got = f"{indices.min()}..{indices.max()}"
            raise IndexError(f"row indices must lie in [-{len(self)}, {len(self)}) for the rows of {self.name}, got {got}")
        indices = indices.astype(np.int64) % max(len(self), 1)
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
        self._with_rows = [entry for entry in stats if entry["rows"]]
        super().__init__(self._load(EMBEDDING_FOLDER), manifest["embedding"])
        if not self.shards:  # no rows: the manifest gives their shape and dtype, so the empty matrix is still 2-D
            self.row_shape = (int(manifest.get("hidden_size", 0)),)
            self.dtype = np.dtype(manifest.get("output_dtype") or np.float32)
        self.dim = self.row_shape[0]

    def _load(self, folder: str) -> list[np.ndarray]:
        if any(folder not in entry["files"] for entry in self._with_rows):
            raise KeyError(f"{self.root} has no array {folder!r} in every shard; it has {self.array_names()}")
        return [np.load(self.root / entry["files"][folder], mmap_mode="r") for entry in self._with_rows]

    def array_names(self) -> list[str]:
        """The extra per-row arrays stored besides the embedding (e.g. ``tokens``)."""
        return sorted({name for entry in self.stats for name in entry["files"]} - {EMBEDDING_FOLDER, "metadata"})

    def array(self, name: str) -> ShardedArray:
        """An extra per-row array (e.g. ``tokens``), indexed like the embeddings."""
        return ShardedArray(self._load(name), name)

    def metadata(self, columns: Optional[Sequence[str]] = None) -> Any:
        """The metadata of every row, as one ``pyarrow.Table`` in row order (only ``columns`` when given)."""
        pa, pq = require_pyarrow()
        if not self._with_rows:
            return pa.table({name: pa.array([], pa.string()) for name in (columns or _META_COLUMNS)})
        table = _concat(pa, [self._shard_metadata(pa, pq, entry, columns) for entry in self._with_rows])
        absent = [c for c in columns or () if c not in table.column_names]
        if absent:
            raise KeyError(f"no metadata column(s) {absent} in {self.root}; the columns are {table.column_names}")
        return table if columns is None else table.select(list(columns))

    def keys(self) -> list[str]:
        """Every row's key, in row order."""
        return self.metadata(["key"]).column("key").to_pylist()

    def _shard_metadata(self, pa: Any, pq: Any, entry: dict, columns: Optional[Sequence[str]]) -> Any:
        """One shard's metadata (only the ``columns`` it has, when given); a ``.safetensors`` output's work folder
        has no parquet files, its stats list the keys."""
        if "metadata" not in entry["files"]:
            fixed = (entry.get("keys", []), [entry["name"]] * entry["rows"], [entry["source"]] * entry["rows"])
            table = pa.table({name: pa.array(values, pa.string()) for name, values in zip(_META_COLUMNS, fixed)})
            return table if columns is None else table.select([c for c in columns if c in _META_COLUMNS])
        path = self.root / entry["files"]["metadata"]
        names = pq.read_schema(path).names
        return pq.read_table(path, columns=None if columns is None else [c for c in columns if c in names])

    def __repr__(self) -> str:
        shards = f"{len(self.stats)} shard(s), {len(self.missing)} missing"
        return f"Embeddings({str(self.root)!r}: {len(self)} rows x {self.dim}, {shards})"


def _concat(pa: Any, tables: list[Any]) -> Any:
    """The shards' metadata tables as one: pyarrow's permissive promotion gives nulls for missing columns and
    float64 for int with float; columns whose types clash otherwise become strings first."""
    types: dict[str, set] = {}
    for field in (field for table in tables for field in table.schema if field.type != pa.null()):
        types.setdefault(field.name, set()).add(field.type)
    clashes = {name for name, found in types.items() if len(found) > 1 and found != {pa.int64(), pa.float64()}}
    for number, table in enumerate(tables):
        for name in clashes.intersection(table.column_names):
            table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(pa.string()))
        tables[number] = table
    return pa.concat_tables(tables, promote_options="permissive")


class EmbeddingsFile(ShardedArray):
    """A ``.safetensors`` output of the job opened for reading (see :func:`open_embeddings`): its embedding rows
    memory-mapped, its paths as keys, its metadata (strings) as ``info``."""

    def __init__(self, path: Path) -> None:
        earlier = EarlierOutput.read(path)
        self.path, self.info, self._keys, self._tensors = path, earlier.metadata, earlier.paths, earlier.tensors
        name = earlier.metadata.get("embedding", "")
        if name not in earlier.tensors:
            raise ValueError(f"{path} has no embedding tensor {name!r}: it was not written by tp-siglip encode")
        embedding = self.array(name)
        super().__init__(embedding.shards, name)
        self.dtype, self.row_shape, self.dim = embedding.dtype, embedding.row_shape, int(embedding.row_shape[0])

    def keys(self) -> list[str]:
        """Every row's path, in row order."""
        return list(self._keys)

    def array_names(self) -> list[str]:
        """The other per-row tensors stored besides the embedding (``last_hidden_state`` with ``--tokens``, ...)."""
        return sorted(set(self._tensors) - {self.name})

    def array(self, name: str) -> ShardedArray:
        """A per-row tensor of the file (e.g. ``last_hidden_state``), memory-mapped and indexed like the embeddings."""
        if name not in self._tensors:
            raise KeyError(f"{self.path} has no tensor {name!r}; it has {sorted(self._tensors)}")
        entry = self._tensors[name]
        rows = []
        if entry.shape[0]:  # numpy cannot map 0 bytes
            rows.append(np.memmap(self.path, dtype=entry.dtype, mode="r", offset=entry.start, shape=entry.shape))
        array = ShardedArray(rows, name)
        array.dtype, array.row_shape = entry.dtype, entry.shape[1:]
        return array

    def __repr__(self) -> str:
        return f"EmbeddingsFile({str(self.path)!r}: {len(self)} rows x {self.dim})"


def open_embeddings(root: Union[str, Path]) -> Union[Embeddings, EmbeddingsFile]:
    """Open the job's output, a corpus folder (its complete shards; a warning names how many planned shards are
    not) or a ``.safetensors`` file, loading nothing until asked for; :class:`ValueError` if it is neither."""
    root = Path(root)
    if root.is_file():
        try:
            return EmbeddingsFile(root)
        except ValueError as err:  # OutputFileError too
            raise ValueError(f"cannot open {root}: {err}") from None
    if not root.exists() and work_folder(root).is_dir():
        raise ValueError(
            f"{root} is not written yet: its run is still going, or it stopped early (rerun it with --resume "
            f"to finish it); the shards it has committed are in {work_folder(root)}, which open_embeddings reads"
        )
    manifest = read_manifest(root)
    stats = list(completed_shards(root).values())
    embeddings = Embeddings(root, manifest, stats)
    if embeddings.missing:
        missing = f"{len(embeddings.missing)} of {len(manifest['shards'])} planned shard(s) are not complete"
        logger.warning("%s: %s (first: %s); reading the other %d", root, missing, embeddings.missing[0], len(stats))
    return embeddings
