"""Where a corpus's images come from: inputs found as shards, each shard listed into rows, rows read as bytes.

`find_shards` (every rank, at start) turns the command line's inputs into a deterministic list of shards,
looking only at paths; `list_rows` (the rank that owns a shard) lists its rows, each with its metadata and
where its image is; `read_bytes` (decode workers) reads one image's bytes. What each input may be, and the
choices made (shard order and names, tar keys, truncated tars, parquet columns): docs/encode-design.md#inputs.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from tp_siglip.processing import IMAGE_SUFFIXES, scan_images

__all__ = [
    "IMAGE_MEMBER_SUFFIXES",
    "ImageRef",
    "Row",
    "ShardList",
    "ShardSpec",
    "describe",
    "expand_braces",
    "find_shards",
    "list_rows",
    "read_bytes",
    "require_pyarrow",
]

logger = logging.getLogger(__name__)

#: tar members that are images: the suffixes a folder accepts (`processing.IMAGE_SUFFIXES`)
IMAGE_MEMBER_SUFFIXES = tuple(sorted(IMAGE_SUFFIXES))
_PARQUET_IMAGE_COLUMNS = (*(suffix[1:] for suffix in IMAGE_MEMBER_SUFFIXES), "image", "img")
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_PYARROW_HINT = 'pip install "tp-siglip[corpus]"'
_END_OF_TAR = "(end of tar)"


def require_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or an ImportError that says how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:
        raise ImportError(f"reading or writing parquet needs pyarrow, which is not installed: {_PYARROW_HINT}") from err
    return pyarrow, pyarrow.parquet


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are. Small and picklable: it travels to DataLoader worker processes.

    ``kind`` is ``"file"``, ``"tar"`` or ``"parquet"``; ``path`` the image file, the ``.tar`` or the
    ``.parquet``. Tar: ``offset`` is the byte offset of the member's data, ``size`` its byte count.
    Parquet: ``offset`` is the row group index, ``size`` the row inside that row group.
    """

    kind: str
    path: str
    offset: int = 0
    size: int = -1


@dataclass(frozen=True)
class Row:
    """One key of a shard: its image (``ref``, ``None`` when there is none, ``problem`` then says why) and its
    JSON-able metadata (the ``.json`` sidecar + ``caption`` from ``.txt``, or the parquet metadata columns;
    ``{}`` for plain files)."""

    key: str
    ref: Optional[ImageRef]
    meta: dict
    problem: Optional[str] = None


@dataclass(frozen=True)
class ShardSpec:
    """One shard of the inputs. ``index``: its position in the shard list; ``name``: unique, stable, filename-safe;
    ``kind``: ``"files"``, ``"tar"`` or ``"parquet"``; ``source``: the tar/parquet path (``""`` for files);
    ``files``: the plain files of a ``files`` chunk."""

    index: int
    name: str
    kind: str
    source: str
    files: tuple[str, ...] = ()


@dataclass
class ShardList:
    """The shards, and what folder scans left out (counted as :func:`~tp_siglip.processing.scan_images` does)."""

    shards: list[ShardSpec]
    ignored: Counter = field(default_factory=Counter)
    hidden: int = 0


def describe(spec: ShardSpec) -> str:
    """A short human description of a shard, for messages."""
    if spec.kind == "files":
        count = len(spec.files)
        span = f": {spec.files[0]} ... {spec.files[-1]}" if count > 1 else (f": {spec.files[0]}" if count else "")
        return f"shard {spec.index} '{spec.name}' ({count} file(s){span})"
    return f"shard {spec.index} '{spec.name}' ({spec.kind} {spec.source})"


# ---------------------------------------------------------------------------------------------------- finding shards


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a..b[..step]}`` ranges (zero padding kept) and ``{x,y}`` lists, left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    choices = _range_choices(body, pattern) if ".." in body else body.split(",")
    if len(choices) < 2 and ".." not in body:
        raise ValueError(f"brace pattern {pattern!r}: '{{{body}}}' is neither a range {{00000..00099}} nor a list {{a,b}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(f"{head}{choice}{tail}")]


def _range_choices(body: str, pattern: str) -> list[str]:
    parts = body.split("..")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"-?\d+", part) for part in parts):
        raise ValueError(f"brace pattern {pattern!r}: '{{{body}}}' is not a numeric range like {{00000..00099}} or {{0..10..2}}")
    start, stop = int(parts[0]), int(parts[1])
    step = abs(int(parts[2])) if len(parts) == 3 else 1
    if step == 0:
        raise ValueError(f"brace pattern {pattern!r}: the step of '{{{body}}}' is 0")
    padded = any(len(part.lstrip("-")) > 1 and part.lstrip("-").startswith("0") for part in parts[:2])
    width = max(len(parts[0]), len(parts[1])) if padded else 0
    numbers = range(start, stop + 1, step) if start <= stop else range(start, stop - 1, -step)
    return [str(number).zfill(width) for number in numbers]


def _classify(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_COMPRESSED_TAR):
        raise ValueError(
            f"'{path}' is a compressed tar: shards are read at byte offsets, which needs an uncompressed .tar "
            f"(decompress it, e.g. `gunzip`, or write the shards uncompressed)"
        )
    if name.endswith(".tar"):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "list"
    return "file"


class _Collector:
    """Accumulates shards and plain files while inputs are walked (see :func:`find_shards`)."""

    def __init__(self) -> None:
        self.entries: list[Union[tuple[str, str], None]] = []  # (kind, path); None marks where file chunks go
        self.files: list[str] = []
        self._seen_files: set[str] = set()
        self._seen_shards: set[str] = set()
        self.ignored: Counter = Counter()
        self.hidden = 0

    def add_file(self, path: str) -> None:
        if not self.files and None not in self.entries:
            self.entries.append(None)
        identity = os.path.abspath(path)
        if identity not in self._seen_files:
            self._seen_files.add(identity)
            self.files.append(path)

    def add_shard(self, kind: str, path: str) -> None:
        identity = os.path.abspath(path)
        if identity in self._seen_shards:
            logger.warning("shard '%s' is given more than once; it is used once", path)
            return
        self._seen_shards.add(identity)
        self.entries.append((kind, path))


def find_shards(
    inputs: Sequence[Union[str, os.PathLike]], rows_per_file_shard: int = 10_000, min_file_shards: int = 1
) -> ShardList:
    """The deterministic list of shards for ``inputs`` (see the module docstring for what each input may be).

    Plain files are cut into chunks of at most ``rows_per_file_shard`` rows, and into at least
    ``min_file_shards`` chunks when there are that many files (the encode job passes its number of groups,
    so that every group gets work).

    Raises:
        FileNotFoundError: an input (or a path a brace pattern expands to) does not exist.
        ValueError: no inputs, a bad brace pattern, a compressed tar, a bad list file line, or a
            ``rows_per_file_shard`` below 1.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not isinstance(rows_per_file_shard, int) or rows_per_file_shard < 1:
        raise ValueError(f"rows_per_file_shard must be a positive int, got {rows_per_file_shard!r}")
    if not isinstance(min_file_shards, int) or min_file_shards < 1:
        raise ValueError(f"min_file_shards must be a positive int, got {min_file_shards!r}")
    if not inputs:
        raise ValueError("no inputs: give image files, folders, .txt path lists, .tar or .parquet shards, or brace patterns")
    collector = _Collector()
    for raw in inputs:
        for path in _expand_input(raw):
            _add_input(collector, path)
    found = _build_list(collector, _file_chunks(len(collector.files), rows_per_file_shard, min_file_shards))
    logger.debug("find_shards: %d shard(s), %d plain file(s)", len(found.shards), len(collector.files))
    return found


def _expand_input(raw: Union[str, os.PathLike]) -> list[Path]:
    if not isinstance(raw, (str, os.PathLike)):
        raise TypeError(f"inputs must be paths (str or os.PathLike), got {type(raw).__name__}: {raw!r}")
    text = os.fspath(raw)
    if "{" not in text or Path(text).exists():
        return [Path(text)]
    expanded = expand_braces(text)
    missing = [path for path in expanded if not Path(path).exists()]
    if missing:
        shown = ", ".join(f"'{path}'" for path in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"brace pattern '{text}' expands to {len(expanded)} path(s), {len(missing)} of them missing: {shown}; "
            f"fix the range or fetch the missing shards"
        )
    return [Path(path) for path in expanded]


def _add_input(collector: _Collector, path: Path) -> None:
    if path.is_dir():
        scan = scan_images(path)
        collector.ignored.update(scan.ignored)
        collector.hidden += scan.hidden
        for file in scan.files:
            collector.add_file(str(file))
        return
    if not path.exists():
        raise FileNotFoundError(f"input path does not exist: '{path}'")
    if not path.is_file():
        raise ValueError(f"input path '{path}' is neither a regular file nor a folder")
    kind = _classify(path)
    if kind == "list":
        _add_list_file(collector, path)
    elif kind == "file":
        collector.add_file(str(path))
    else:
        collector.add_shard(kind, str(path))


def _add_list_file(collector: _Collector, list_path: Path) -> None:
    try:
        text = list_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"path list '{list_path}' is not UTF-8 text ({err}); write one path per line, UTF-8") from None
    base = list_path.parent
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"path list '{list_path}' line {number}"
        if "\x00" in entry:
            raise ValueError(f"{where}: contains a NUL character; one path per line")
        path = Path(os.path.normpath(entry if os.path.isabs(entry) else base / entry))
        kind = _classify(path)
        if kind == "list":
            raise ValueError(f"{where}: '{entry}' is another .txt list; lists do not nest, give it as its own input")
        if kind == "file":
            collector.add_file(str(path))
        else:
            collector.add_shard(kind, str(path))
        count += 1
    if not count:
        logger.warning("path list '%s' lists no paths (only blank or # lines)", list_path)


def _file_chunks(count: int, rows_per_file_shard: int, min_file_shards: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each plain-file chunk: ``rows_per_file_shard`` rows each (the last shorter), or, when
    that makes fewer than ``min_file_shards`` chunks, ``min(min_file_shards, count)`` near-equal ones."""
    starts = range(0, count, rows_per_file_shard)
    if len(starts) >= min(min_file_shards, count):
        return [(start, min(start + rows_per_file_shard, count)) for start in starts]
    parts = min(min_file_shards, count)
    bounds = [count * part // parts for part in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _build_list(collector: _Collector, chunks: list[tuple[int, int]]) -> ShardList:
    pending: list[tuple[str, str, str, tuple[str, ...]]] = []  # (wanted name, kind, source, files)
    for entry in collector.entries:
        if entry is None:
            for chunk_index, (start, stop) in enumerate(chunks):
                pending.append((f"files-{chunk_index:05d}", "files", "", tuple(collector.files[start:stop])))
        else:
            kind, source = entry
            stem = Path(source).name[: -len(f".{kind}")]
            pending.append((re.sub(r"[^A-Za-z0-9._-]", "_", stem) or kind, kind, source, ()))
    used: set[str] = set()
    shards = []
    for index, (wanted, kind, source, files) in enumerate(pending):
        name, suffix = wanted, 2
        while name in used:
            name, suffix = f"{wanted}-{suffix}", suffix + 1
        used.add(name)
        shards.append(ShardSpec(index, name, kind, source, files))
    return ShardList(shards, collector.ignored, collector.hidden)


# ---------------------------------------------------------------------------------------------------- listing


def list_rows(spec: ShardSpec, ignored: Optional[Counter] = None) -> list[Row]:
    """The rows of one shard (see the module docstring). Members or columns left out are counted into
    ``ignored`` (by lower-case suffix, ``"(hidden)"``, ``"(duplicate image)"``) when given.

    Raises:
        ValueError: the shard cannot be read at all (the message names it).
        ImportError: a parquet shard without pyarrow installed.
    """
    ignored = Counter() if ignored is None else ignored
    if spec.kind == "files":
        return [Row(path, ImageRef("file", path), {}) for path in spec.files]
    if spec.kind == "tar":
        return _list_tar(spec, ignored)
    if spec.kind == "parquet":
        return _list_parquet(spec)
    raise ValueError(f"{describe(spec)}: unknown shard kind {spec.kind!r} (expected 'files', 'tar' or 'parquet')")


@dataclass
class _Group:
    image: Optional[tarfile.TarInfo] = None
    json: Optional[tarfile.TarInfo] = None
    text: Optional[tarfile.TarInfo] = None
    cut: Optional[str] = None  # the image member that was cut off by the end of the file


def _list_tar(spec: ShardSpec, ignored: Counter) -> list[Row]:
    path = spec.source
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as handle:
            groups, end_problem = _scan_tar(handle, file_size, ignored, spec)
            rows = [_tar_row(handle, path, key, group) for key, group in sorted(groups.items())]
    except (OSError, tarfile.TarError) as err:
        raise ValueError(f"cannot read {describe(spec)}: {type(err).__name__}: {err}; is it a tar file?") from None
    if end_problem is not None:
        logger.warning("%s: %s", describe(spec), end_problem)
        rows.append(Row(_END_OF_TAR, None, {}, end_problem))
    return rows


def _scan_tar(handle: Any, file_size: int, ignored: Counter, spec: ShardSpec) -> tuple[dict[str, _Group], Optional[str]]:
    """Member headers -> groups by key; and why the tar ended early (``None`` if it ended properly)."""
    groups: dict[str, _Group] = {}
    archive = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 - the caller owns handle; raises ReadError if not a tar
    end = 0
    problem = None
    while True:
        try:
            member = archive.next()
        except tarfile.ReadError as err:
            problem = f"truncated tar: {err} after byte {end} (the file has {file_size} bytes); rows before it are kept"
            break
        if member is None:
            break
        if member.offset_data + member.size > file_size:
            logger.warning("%s: truncated tar: member '%s' is cut off at byte %d", describe(spec), member.name, file_size)
            if not _add_member(groups, member, ignored, cut=True):  # its key's row does not say so: an end row does
                problem = f"truncated tar: member '{member.name}' is cut off at byte {file_size}; rows before it are kept"
            return groups, problem
        end = member.offset_data + member.size
        _add_member(groups, member, ignored, cut=False)
    if problem is None:
        problem = _check_tar_end(handle, end, file_size)
    if not groups and problem is None:
        logger.warning("%s holds no members", describe(spec))
    return groups, problem


def _check_tar_end(handle: Any, end: int, file_size: int) -> Optional[str]:
    """A proper tar ends in zero blocks after its last member; anything else means a broken header."""
    start = end + (-end % 512)
    handle.seek(start)
    rest = handle.read(min(file_size - start, 1 << 16))
    if rest.strip(b"\x00"):
        return f"truncated tar: a broken member header at byte {start} (the file has {file_size} bytes); rows before it are kept"
    return None


def _add_member(groups: dict[str, _Group], member: tarfile.TarInfo, ignored: Counter, cut: bool) -> bool:
    """Put a member in its key's group; for a ``cut`` member, whether its key's row will say it was cut."""
    if not member.isfile():
        return False
    base = member.name.rsplit("/", 1)[-1]
    if base.startswith("."):
        ignored["(hidden)"] += 1
        return False
    stem, dot, suffix = member.name.rpartition(".")
    suffix = f".{suffix.lower()}" if dot and "/" not in suffix else ""
    key = stem if suffix else member.name
    slot = "image" if suffix in IMAGE_MEMBER_SUFFIXES else {".json": "json", ".txt": "text"}.get(suffix)
    if slot is None:
        ignored[suffix or "(none)"] += 1
        return False
    group = groups.setdefault(key, _Group())
    if cut:
        if slot == "image" and group.image is None:
            group.cut = member.name
            return True
        return False
    if getattr(group, slot) is not None:
        ignored["(duplicate image)" if slot == "image" else f"(duplicate {suffix})"] += 1
        return False
    setattr(group, slot, member)
    return False


def _tar_row(handle: Any, path: str, key: str, group: _Group) -> Row:
    meta: dict = {}
    if group.json is not None:
        raw = _read_member(handle, group.json)
        try:
            loaded = json.loads(raw)
            meta = loaded if isinstance(loaded, dict) else {"json": loaded}
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            meta = {"meta_error": f"{group.json.name} is not valid JSON: {err}"}
    if group.text is not None:
        meta["caption"] = _read_member(handle, group.text).decode("utf-8", errors="replace")
    if group.image is not None:
        return Row(key, ImageRef("tar", path, group.image.offset_data, group.image.size), meta)
    if group.cut is not None:
        return Row(key, None, meta, f"image member {group.cut} is cut off (truncated tar)")
    present = " + ".join(member.name.rsplit("/", 1)[-1] for member in (group.json, group.text) if member is not None)
    return Row(key, None, meta, f"no image member ({present} only)")


def _read_member(handle: Any, member: tarfile.TarInfo) -> bytes:
    handle.seek(member.offset_data)
    return handle.read(member.size)


def _parquet_image_column(schema: Any, pa: Any) -> tuple[str, bool]:
    """``(name, is_struct)`` of the image column: a binary column, or a struct with a binary ``bytes`` field."""
    for name in _PARQUET_IMAGE_COLUMNS:
        index = schema.get_field_index(name)
        if index < 0:
            continue
        kind = schema.field(index).type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return name, False
        if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            return name, True
    raise ValueError(
        f"no image column: expected a binary column named one of {', '.join(_PARQUET_IMAGE_COLUMNS)} (img2dataset's "
        f"parquet output) or an image struct with a 'bytes' field; the columns are {', '.join(schema.names)}. "
        f"(img2dataset's webdataset output also writes a metadata-only .parquet next to each .tar: give the .tar)"
    )


def _json_able(value: Any) -> Any:
    """Parquet values as JSON-able Python: bytes are dropped (None), dates/times become ISO strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_able(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_able(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return str(value)
    return value


def _list_parquet(spec: ShardSpec) -> list[Row]:
    pa, pq = require_pyarrow()
    try:
        parquet = pq.ParquetFile(spec.source)
        image_column, _ = _parquet_image_column(parquet.schema_arrow, pa)
        columns = [name for name in parquet.schema_arrow.names if name != image_column]
        row_groups = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
        table = parquet.read(columns=columns)
    except (OSError, pa.ArrowException, ValueError) as err:
        raise ValueError(f"cannot read {describe(spec)}: {err}") from None
    records = table.to_pylist()
    if "key" not in columns:
        logger.warning("%s has no 'key' column: rows are keyed by their row number", describe(spec))
    places = itertools.chain.from_iterable(((group, row) for row in range(count)) for group, count in enumerate(row_groups))
    rows = []
    for position, (group, row) in enumerate(places):
        meta = {name: _json_able(value) for name, value in records[position].items()}
        key_value = meta.pop("key", None)
        key = str(key_value) if key_value is not None else f"{position:09d}"
        status = meta.get("status")
        if status is not None and status != "success":
            reason = meta.get("error_message")
            problem = f"img2dataset status {status!r}" + (f": {reason}" if reason else "")
            rows.append(Row(key, None, meta, problem))
        else:
            rows.append(Row(key, ImageRef("parquet", spec.source, group, row), meta))
    return rows


# ---------------------------------------------------------------------------------------------------- reading


_TAR_DESCRIPTORS: dict[tuple[int, str], int] = {}  # (pid, path) -> fd; at most one entry per process
_ROW_GROUPS: dict[tuple[int, str, int], Any] = {}  # (pid, path, row group) -> image column; at most one entry


def read_bytes(ref: ImageRef) -> bytes:
    """The bytes of one image (not decoded).

    Raises:
        OSError: the file or shard cannot be read (``FileNotFoundError``, ``PermissionError``, ...).
        ValueError: a tar member ends early, a parquet row has no image bytes, or an unknown ``ref.kind``.
    """
    if ref.kind == "file":
        with open(ref.path, "rb") as handle:
            return handle.read()
    if ref.kind == "tar":
        return _read_tar(ref)
    if ref.kind == "parquet":
        return _read_parquet(ref)
    raise ValueError(f"unknown ImageRef kind {ref.kind!r} (expected 'file', 'tar' or 'parquet')")


def _read_tar(ref: ImageRef) -> bytes:
    slot = (os.getpid(), ref.path)
    descriptor = _TAR_DESCRIPTORS.get(slot)
    if descriptor is None:
        for old_slot in list(_TAR_DESCRIPTORS):
            old = _TAR_DESCRIPTORS.pop(old_slot)
            if old_slot[0] == slot[0]:  # a descriptor inherited from a parent process is left to the parent
                os.close(old)
        descriptor = _TAR_DESCRIPTORS[slot] = os.open(ref.path, os.O_RDONLY)
    data = os.pread(descriptor, ref.size, ref.offset)
    if len(data) != ref.size:
        raise ValueError(f"tar member at byte {ref.offset} of {ref.path} ends {ref.size - len(data)} bytes early (truncated shard)")
    return data


def _read_parquet(ref: ImageRef) -> bytes:
    slot = (os.getpid(), ref.path, ref.offset)
    column = _ROW_GROUPS.get(slot)
    if column is None:
        pa, pq = require_pyarrow()
        _ROW_GROUPS.clear()
        parquet = pq.ParquetFile(ref.path)
        name, is_struct = _parquet_image_column(parquet.schema_arrow, pa)
        column = parquet.read_row_group(ref.offset, columns=[name]).column(name).combine_chunks()
        if is_struct:
            column = column.field("bytes")
        _ROW_GROUPS[slot] = column
    if not 0 <= ref.size < len(column):
        raise ValueError(f"{ref.path} row group {ref.offset} has {len(column)} rows; row {ref.size} does not exist")
    value = column[ref.size].as_py()
    if value is None:
        raise ValueError("no image bytes (the image column is null in this row)")
    return value
