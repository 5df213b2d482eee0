"""The job's ``.safetensors`` output: written from the committed shards of its work folder, and read back.

`write_from_shards` writes it in one pass, atomically, copying each tensor's rows from the shards'
memory-mapped ``.npy`` files (``safetensors.torch.save_file`` would need every tensor in memory at once);
`EarlierOutput` reads a file's header, for ``--resume`` and `open_embeddings`. Only float32 and float16.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tp_siglip.embeddings_dir import EMBEDDING_FOLDER, write_atomically

__all__ = ["EarlierOutput", "OutputFileError", "work_folder", "write_from_shards"]

_CHUNK_ROWS = 4096  # rows copied per write
#: the dtypes the file stores, by their safetensors names
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}
_MAX_HEADER = 1 << 30  # refuse absurd header sizes when reading an earlier output
#: the largest header safetensors' own readers accept (its MAX_HEADER_SIZE): about 2 million paths
SAFETENSORS_MAX_HEADER = 100_000_000


def work_folder(path: Path) -> Path:
    """The hidden folder beside the ``.safetensors`` output ``path`` that holds its run's committed shards."""
    return path.parent / f".{path.name}.parts"


class OutputFileError(ValueError):
    """An earlier output cannot be read or resumed from (the message says why)."""


def write_from_shards(path: Path, root: Path, stats: list[dict], embedding: str, metadata: dict[str, str]) -> int:
    """Write the complete shards ``stats`` of the work folder ``root`` to ``path`` (the embedding as ``embedding``,
    each other array under its folder's name, ``metadata`` in the header); returns the rows written."""
    rows = sum(int(entry["rows"]) for entry in stats)
    with_rows = [entry for entry in stats if entry["rows"]]
    folders = list(with_rows[0]["files"]) if with_rows else []
    arrays = {folder: [np.load(root / entry["files"][folder], mmap_mode="r") for entry in with_rows] for folder in folders}
    codes = {dtype: code for code, dtype in DTYPES.items()}
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for folder, parts in arrays.items():
        size = rows * parts[0].dtype.itemsize * math.prod(parts[0].shape[1:])
        entry = {"dtype": codes[parts[0].dtype], "shape": [rows, *parts[0].shape[1:]], "data_offsets": [offset, offset + size]}
        header[embedding if folder == EMBEDDING_FOLDER else folder] = entry
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    if len(encoded) > SAFETENSORS_MAX_HEADER:  # safe_open would refuse the file: "header too large"
        raise OutputFileError(
            f"{path}: {rows} rows need a header of {len(encoded):,} bytes, over the {SAFETENSORS_MAX_HEADER:,} safetensors "
            f"reads; write a folder of shards instead (--output {path.with_suffix('')}/)"
        )

    def fill(target: BinaryIO) -> None:
        target.write(struct.pack("<Q", len(encoded)))
        target.write(encoded)
        for part in (part for parts in arrays.values() for part in parts):
            flat = part.reshape(len(part), -1)
            for start in range(0, len(flat), _CHUNK_ROWS):
                target.write(np.ascontiguousarray(flat[start : start + _CHUNK_ROWS]).data)  # no extra copy

    write_atomically(path, fill)
    return rows


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: np.dtype
    start: int  # absolute offset in the file


@dataclass(frozen=True)
class EarlierOutput:
    """An output written by an earlier ``tp-siglip encode`` run: its metadata and where its tensors lie."""

    path: Path
    metadata: dict[str, str]
    paths: list[str]
    tensors: dict[str, _Entry]

    @property
    def rows(self) -> int:
        return len(self.paths)

    @classmethod
    def read(cls, path: Path) -> EarlierOutput:
        """Read and check the header of ``path``; raises :class:`OutputFileError` saying what is wrong."""
        try:
            with open(path, "rb") as file:
                size_bytes, file_size = file.read(8), os.fstat(file.fileno()).st_size
                if len(size_bytes) < 8:
                    raise OutputFileError(f"{path} is not a safetensors file (too short)")
                (header_size,) = struct.unpack("<Q", size_bytes)
                if header_size > min(_MAX_HEADER, file_size - 8):
                    raise OutputFileError(f"{path} is not a safetensors file (header size {header_size})")
                header = json.loads(file.read(header_size))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise OutputFileError(f"cannot read {path}: {err}") from None
        if not isinstance(header, dict):
            raise OutputFileError(f"{path} is not a safetensors file (its header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        try:
            paths = json.loads(metadata["paths"])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise OutputFileError(f"{path} has no 'paths' metadata: it was not written by tp-siglip encode") from None
        tensors: dict[str, _Entry] = {}
        for name, info in header.items():
            try:
                shape = tuple(int(v) for v in info["shape"])
                begin, end = (int(v) for v in info["data_offsets"])
                dtype = info["dtype"]
            except (KeyError, TypeError, ValueError):
                raise OutputFileError(f"{path}: tensor {name!r} has a malformed header entry") from None
            if dtype not in DTYPES or not shape or shape[0] != len(paths):
                expected = f"expected F32 or F16 with {len(paths)} rows (one per path)"
                raise OutputFileError(f"{path}: tensor {name!r} is {dtype}{list(shape)}; {expected}")
            if end - begin != DTYPES[dtype].itemsize * math.prod(shape) or 8 + header_size + end > file_size:
                raise OutputFileError(f"{path}: tensor {name!r} has inconsistent offsets (truncated file?)")
            tensors[name] = _Entry(shape, DTYPES[dtype], 8 + header_size + begin)
        return cls(path, {str(k): str(v) for k, v in metadata.items()}, [str(p) for p in paths], tensors)
