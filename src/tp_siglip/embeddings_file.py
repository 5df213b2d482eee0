"""The encoder's output file: rows spooled to disk as they come, written out atomically as safetensors.

``tp-siglip encode`` produces one safetensors file with float32 (or float16) tensors of N rows (one per image) and string
metadata. This module holds the three pieces that keep that file honest on real corpora:

* :class:`RowSpool` appends each batch's rows to raw float32 files in a hidden folder next to the output,
  so memory does not grow with the number of images (not even with ``--tokens``, whose rows are large);
* :func:`write_atomic` writes the safetensors file from the spool: a temporary file in the output's own
  folder (same file system), the 8-byte header length, the JSON header, each tensor's bytes copied in
  chunks, ``fsync``, then ``os.replace`` onto the output. A reader sees the earlier file or the new one,
  never a half-written one; a failure removes the temporary file and leaves the earlier output untouched;
* :class:`EarlierOutput` reads an existing output's header (for ``--resume``) and can copy its rows into a
  spool, again in chunks.

Choices made: the safetensors layout is written by hand (it is a small, documented format: little-endian
u64 header size, JSON header padded with spaces to 8 bytes, tensors back to back in header order) because
``safetensors.torch.save_file`` needs every tensor in memory at once. Only float32 and float16 tensors are
written or accepted (``--output-dtype``). The temporary file is created with mode 0666 minus the umask, like any new file, so the output
gets the usual permissions.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from tp_siglip.embeddings_dir import write_atomically

__all__ = ["EarlierOutput", "OutputFileError", "RowSpool", "write_atomic"]

_CHUNK = 8 << 20  # bytes copied per read
#: the dtypes a spool stores, by their safetensors names
DTYPES = {"F32": torch.float32, "F16": torch.float16}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 1 << 30  # refuse absurd header sizes when reading an earlier output


class OutputFileError(ValueError):
    """An earlier output cannot be read or resumed from (the message says why)."""


class RowSpool:
    """Float32 or float16 rows of several named tensors, appended to raw files in a hidden folder beside the output.

    Every append adds the same number of rows to every tensor; the first append fixes the names, the dtype
    and the shape of one row. :meth:`close` removes the folder.
    """

    def __init__(self, directory: Path, stem: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f".{stem}.spool-", dir=directory))
        self.rows = 0
        self.row_shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._files: dict[str, BinaryIO] = {}

    def _open(self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> BinaryIO:
        if dtype not in _CODES:
            raise ValueError(f"tensor {name!r} is {dtype}; the output stores float32 or float16")
        if name not in self._files:
            if self.rows:
                raise ValueError(f"tensor {name!r} appears after {self.rows} rows were written without it")
            self.row_shapes[name], self.dtypes[name] = row_shape, dtype
            self._files[name] = open(self.folder / f"{len(self._files)}.raw", "w+b")  # noqa: SIM115
        elif (self.row_shapes[name], self.dtypes[name]) != (row_shape, dtype):
            raise ValueError(
                f"tensor {name!r}: rows of {dtype}{list(row_shape)}, earlier rows {self.dtypes[name]}{list(self.row_shapes[name])}"
            )
        return self._files[name]

    def append(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append ``(n, ...)`` float32/float16 tensors (the same ``n`` for all, the same names and dtypes every time)."""
        counts = {t.shape[0] for t in tensors.values()}
        if len(counts) != 1 or (self._files and set(tensors) != set(self._files)):
            raise ValueError(f"every append needs the same tensors with equal row counts, got {sorted(tensors)}")
        for name, tensor in tensors.items():
            file = self._open(name, tuple(tensor.shape[1:]), tensor.dtype)
            file.write(tensor.detach().to("cpu").contiguous().numpy().tobytes())
        self.rows += counts.pop()

    def append_raw(
        self, name: str, row_shape: tuple[int, ...], dtype: torch.dtype, source: BinaryIO, start: int, nbytes: int
    ) -> None:
        """Copy ``nbytes`` of rows of ``name`` from ``source`` at ``start`` (rows counted by the caller)."""
        file = self._open(name, row_shape, dtype)
        source.seek(start)
        left = nbytes
        while left:
            chunk = source.read(min(_CHUNK, left))
            if not chunk:
                raise OutputFileError(f"{getattr(source, 'name', 'file')}: ended {left} bytes early")
            file.write(chunk)
            left -= len(chunk)

    def row_bytes(self, name: str) -> int:
        return self.dtypes[name].itemsize * _numel(self.row_shapes[name])

    def copy_to(self, name: str, target: BinaryIO) -> None:
        """Write the first ``self.rows`` rows of ``name`` to ``target``."""
        file = self._files[name]
        file.flush()
        file.seek(0)
        left = self.rows * self.row_bytes(name)
        while left:
            chunk = file.read(min(_CHUNK, left))
            if not chunk:
                raise OSError(f"spool file for {name!r} in {self.folder} is shorter than expected")
            target.write(chunk)
            left -= len(chunk)
        file.seek(0, os.SEEK_END)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def write_atomic(path: Path, spool: RowSpool, metadata: dict[str, str]) -> None:
    """Write the spool's rows and ``metadata`` to ``path`` as safetensors, atomically (see the module doc)."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in spool.row_shapes:
        size = spool.rows * spool.row_bytes(name)
        header[name] = {"dtype": _CODES[spool.dtypes[name]], "shape": [spool.rows, *spool.row_shapes[name]], "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    def fill(target: BinaryIO) -> None:
        target.write(struct.pack("<Q", len(encoded)))
        target.write(encoded)
        for name in spool.row_shapes:
            spool.copy_to(name, target)

    write_atomically(path, fill)


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute offset in the file
    nbytes: int


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
                size_bytes = file.read(8)
                file_size = os.fstat(file.fileno()).st_size
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
        return cls._from_header(path, header, 8 + header_size, file_size)

    @classmethod
    def _from_header(cls, path: Path, header: dict, data_start: int, file_size: int) -> EarlierOutput:
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
                raise OutputFileError(
                    f"{path}: tensor {name!r} is {dtype}{list(shape)}; expected F32 or F16 with {len(paths)} rows (one per path)"
                )
            if end - begin != DTYPES[dtype].itemsize * _numel(shape) or data_start + end > file_size:
                raise OutputFileError(f"{path}: tensor {name!r} has inconsistent offsets (truncated file?)")
            tensors[name] = _Entry(shape, DTYPES[dtype], data_start + begin, end - begin)
        return cls(path, {str(k): str(v) for k, v in metadata.items()}, [str(p) for p in paths], tensors)

    def copy_into(self, spool: RowSpool) -> None:
        """Append every row of this file to ``spool`` (tensor by tensor, in chunks)."""
        if not self.rows:
            return
        with open(self.path, "rb") as source:
            for name, entry in self.tensors.items():
                spool.append_raw(name, entry.shape[1:], entry.dtype, source, entry.start, entry.nbytes)
        spool.rows += self.rows

    def first_rows(self, name: str, count: int) -> Optional[torch.Tensor]:
        """The first ``count`` rows of ``name`` (for the similarity table), or ``None`` without such a tensor."""
        entry = self.tensors.get(name)
        if entry is None:
            return None
        count = min(count, entry.shape[0])
        if count == 0:
            return torch.empty(0, *entry.shape[1:], dtype=entry.dtype)
        row_bytes = entry.nbytes // max(entry.shape[0], 1)
        with open(self.path, "rb") as source:
            source.seek(entry.start)
            data = bytearray(source.read(count * row_bytes))
        return torch.frombuffer(data, dtype=entry.dtype).reshape(count, *entry.shape[1:]).clone()
