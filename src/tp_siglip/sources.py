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
from collections.abc import Iterator, Sequence
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


def require_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or an ImportError that says how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:
        hint = 'pip install "tp-siglip[corpus]"'
        raise ImportError(f"reading or writing parquet needs pyarrow, which is not installed: {hint}") from err
    return pyarrow, pyarrow.parquet


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are; picklable, for DataLoader workers. ``kind``: ``"file"``, ``"tar"`` or ``"parquet"``.

    Tar: ``offset``/``size`` are the member data's byte offset and count; parquet: the row group and the row in it.
    """

    kind: str
    path: str
    offset: int = 0
    size: int = -1


@dataclass(frozen=True)
class Row:
    """One key of a shard: its image (``ref``; ``None`` with a ``problem`` saying why) and its JSON-able metadata."""

    key: str
    ref: Optional[ImageRef]
    meta: dict
    problem: Optional[str] = None


@dataclass(frozen=True)
class ShardSpec:
    """One shard: its position, a unique filename-safe name, its kind (``"files"``, ``"tar"``, ``"parquet"``),
    the tar/parquet path (``""`` for files) and the plain files of a ``files`` chunk."""

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


def find_shards(
    inputs: Sequence[Union[str, os.PathLike]], rows_per_file_shard: int = 10_000, min_file_shards: int = 1
) -> ShardList:
    """The deterministic list of shards for ``inputs`` (docs/encode-design.md#inputs).

    Plain files are cut into chunks of at most ``rows_per_file_shard`` rows, and into at least ``min_file_shards``
    chunks when there are that many files (the encode job passes its number of groups, so that every group gets work).
    Raises FileNotFoundError for a missing input, ValueError for a bad input or argument.
    """
    if not inputs:
        raise ValueError("no inputs: give image files, folders, .txt path lists, .tar or .parquet shards, or brace patterns")
    found = ShardList([])
    entries: dict[str, tuple[str, str]] = {}  # absolute path -> (kind, path); "" -> where the plain-file chunks go
    files: dict[str, str] = {}  # absolute path -> path: each plain file once, in order
    for raw in inputs:
        for path in _expand_input(raw):
            for kind, item in _input_items(path, found):
                identity = os.path.abspath(item)
                if kind == "file":
                    entries.setdefault("", ("files", ""))
                    files.setdefault(identity, item)
                elif identity in entries:
                    logger.warning("shard '%s' is given more than once; it is used once", item)
                else:
                    entries[identity] = (kind, item)
    paths = list(files.values())
    used: set[str] = set()
    for kind, source in entries.values():
        if kind == "files":
            for number, (start, stop) in enumerate(_file_chunks(len(paths), rows_per_file_shard, min_file_shards)):
                _add_shard(found, used, f"files-{number:05d}", kind, "", tuple(paths[start:stop]))
        else:
            stem = Path(source).name[: -len(kind) - 1]
            _add_shard(found, used, re.sub(r"[^A-Za-z0-9._-]", "_", stem) or kind, kind, source)
    logger.debug("find_shards: %d shard(s), %d plain file(s)", len(found.shards), len(paths))
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


def _input_items(path: Path, found: ShardList) -> Iterator[tuple[str, str]]:
    """``(kind, path)`` of what one input gives: a folder's images, a list's lines, or the input itself."""
    if path.is_dir():
        scan = scan_images(path)
        found.ignored.update(scan.ignored)
        found.hidden += scan.hidden
        yield from (("file", str(file)) for file in scan.files)
        return
    if not path.exists():
        raise FileNotFoundError(f"input path does not exist: '{path}'")
    if not path.is_file():
        raise ValueError(f"input path '{path}' is neither a regular file nor a folder")
    kind = _classify(path)
    yield from _list_file_items(path) if kind == "list" else [(kind, str(path))]


def _list_file_items(list_path: Path) -> Iterator[tuple[str, str]]:
    try:
        text = list_path.read_text(encoding="utf-8-sig")  # a byte order mark (Notepad, PowerShell) is not a path
    except UnicodeDecodeError as err:
        raise ValueError(f"path list '{list_path}' is not UTF-8 text ({err}); write one path per line, UTF-8") from None
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"path list '{list_path}' line {number}"
        if "\x00" in entry:
            raise ValueError(f"{where}: contains a NUL character; one path per line")
        path = Path(os.path.normpath(list_path.parent / entry))  # an absolute entry replaces the folder
        kind = _classify(path)
        if kind == "list":
            raise ValueError(f"{where}: '{entry}' is another .txt list; lists do not nest, give it as its own input")
        count += 1
        yield kind, str(path)
    if not count:
        logger.warning("path list '%s' lists no paths (only blank or # lines)", list_path)


def _classify(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_COMPRESSED_TAR):
        raise ValueError(
            f"'{path}' is a compressed tar: shards are read at byte offsets, which needs an uncompressed .tar "
            f"(decompress it, e.g. `gunzip`, or write the shards uncompressed)"
        )
    kinds = {".tar": "tar", ".parquet": "parquet", ".txt": "list"}
    return next((kind for suffix, kind in kinds.items() if name.endswith(suffix)), "file")


def _file_chunks(count: int, rows_per_file_shard: int, min_file_shards: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each plain-file chunk: ``rows_per_file_shard`` rows each, or, when that makes fewer
    than ``min_file_shards`` chunks, ``min(min_file_shards, count)`` near-equal ones."""
    parts = min(min_file_shards, count)
    starts = range(0, count, rows_per_file_shard)
    if len(starts) >= parts:
        return [(start, min(start + rows_per_file_shard, count)) for start in starts]
    return list(itertools.pairwise(count * part // parts for part in range(parts + 1)))


def _add_shard(found: ShardList, used: set[str], wanted: str, kind: str, source: str, files: tuple[str, ...] = ()) -> None:
    """Append a shard named ``wanted``, or ``wanted-2``, ``wanted-3``, ... when that name is taken."""
    name, suffix = wanted, 2
    while name in used:
        name, suffix = f"{wanted}-{suffix}", suffix + 1
    used.add(name)
    found.shards.append(ShardSpec(len(found.shards), name, kind, source, files))


# ---------------------------------------------------------------------------------------------------- listing


def list_rows(spec: ShardSpec) -> list[Row]:
    """The rows of one shard. Raises ValueError naming a shard that cannot be read at all, ImportError for a
    parquet shard without pyarrow."""
    if spec.kind == "files":  # image_path: the column clip-retrieval's inference writes and its back step returns
        return [Row(path, ImageRef("file", path), {"image_path": path}) for path in spec.files]
    if spec.kind == "tar":
        return _list_tar(spec)
    if spec.kind == "parquet":
        return _list_parquet(spec)
    raise ValueError(f"{describe(spec)}: unknown shard kind {spec.kind!r} (expected 'files', 'tar' or 'parquet')")


def _list_tar(spec: ShardSpec) -> list[Row]:
    try:
        file_size = os.path.getsize(spec.source)
        with open(spec.source, "rb") as handle:
            groups, broke_off = _scan_tar(handle, file_size, spec)
            rows = [_tar_row(handle, spec.source, key, group) for key, group in sorted(groups.items())]
    except (OSError, tarfile.TarError) as err:
        hint = "; is it a tar file?" if isinstance(err, tarfile.TarError) else ""
        raise ValueError(f"cannot read {describe(spec)}: {type(err).__name__}: {err}{hint}") from None
    if broke_off is not None:
        problem = f"truncated tar: {broke_off}; rows before it are kept"
        logger.warning("%s: %s", describe(spec), problem)
        rows.append(Row("(end of tar)", None, {}, problem))
    return rows


def _scan_tar(handle: Any, file_size: int, spec: ShardSpec) -> tuple[dict[str, dict], Optional[str]]:
    """Member headers -> groups by key (slot -> member, the first of each slot); and where the tar broke off
    (``None`` if it did not)."""
    groups: dict[str, dict] = {}
    archive = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 - the caller owns handle; raises ReadError if not a tar
    end = 0
    while True:
        try:
            member = archive.next()
        except tarfile.ReadError as err:
            return groups, f"{err} after byte {end} (the file has {file_size} bytes)"
        if member is None:
            break
        key, slot = _member_slot(member)
        group = groups.setdefault(key, {}) if slot else {}
        if member.offset_data + member.size > file_size:
            logger.warning("%s: truncated tar: member '%s' is cut off at byte %d", describe(spec), member.name, file_size)
            if slot == "image" and "image" not in group:
                group["cut"] = member.name  # its key's row says so
                return groups, None
            return groups, f"member '{member.name}' is cut off at byte {file_size}"
        end = member.offset_data + member.size
        if slot:
            group.setdefault(slot, member)
    start = end + (-end % 512)  # a proper tar ends in zero blocks after its last member
    handle.seek(start)
    if handle.read(min(file_size - start, 1 << 16)).strip(b"\x00"):
        return groups, f"a broken member header at byte {start} (the file has {file_size} bytes)"
    if not groups:
        logger.warning("%s holds no members", describe(spec))
    return groups, None


def _member_slot(member: tarfile.TarInfo) -> tuple[str, Optional[str]]:
    """``(key, slot)`` of a member; slot ``None`` for one that is hidden or not an image, json or txt."""
    if not member.isfile() or member.name.rsplit("/", 1)[-1].startswith("."):
        return "", None
    stem, dot, suffix = member.name.rpartition(".")
    suffix = f".{suffix.lower()}" if dot and "/" not in suffix else ""
    return stem, "image" if suffix in IMAGE_MEMBER_SUFFIXES else {".json": "json", ".txt": "text"}.get(suffix)


def _tar_row(handle: Any, path: str, key: str, group: dict) -> Row:
    meta: dict = {}
    if "json" in group:
        try:
            loaded = json.loads(_read_member(handle, group["json"]))
            meta = loaded if isinstance(loaded, dict) else {"json": loaded}
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            meta = {"meta_error": f"{group['json'].name} is not valid JSON: {err}"}
    if "text" in group:
        meta["caption"] = _read_member(handle, group["text"]).decode("utf-8", errors="replace")
    if "image" in group:
        return Row(key, ImageRef("tar", path, group["image"].offset_data, group["image"].size), meta)
    if "cut" in group:
        return Row(key, None, meta, f"image member {group['cut']} is cut off (truncated tar)")
    present = " + ".join(group[slot].name.rsplit("/", 1)[-1] for slot in ("json", "text") if slot in group)
    return Row(key, None, meta, f"no image member ({present} only)")


def _read_member(handle: Any, member: tarfile.TarInfo) -> bytes:
    handle.seek(member.offset_data)
    return handle.read(member.size)


def _open_parquet(path: str) -> tuple[Any, str, bool]:
    """``(ParquetFile, image column, whether it is a struct)``: a binary column, or a struct with a binary ``bytes``."""
    pa, pq = require_pyarrow()
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    for name in _PARQUET_IMAGE_COLUMNS:
        index = schema.get_field_index(name)
        if index < 0:
            continue
        kind = schema.field(index).type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return parquet, name, False
        if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
            return parquet, name, True
    raise ValueError(
        f"no image column: expected a binary column named one of {', '.join(_PARQUET_IMAGE_COLUMNS)} (img2dataset's "
        f"parquet output) or an image struct with a 'bytes' field; the columns are {', '.join(schema.names)}. "
        f"(img2dataset's webdataset output also writes a metadata-only .parquet next to each .tar: give the .tar)"
    )


def _json_able(value: Any) -> Any:
    """A parquet value as JSON-able Python: bytes are dropped (None), dates and times become ISO strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_able(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_able(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _list_parquet(spec: ShardSpec) -> list[Row]:
    pa, _ = require_pyarrow()
    try:
        parquet, image_column, _ = _open_parquet(spec.source)
        columns = [name for name in parquet.schema_arrow.names if name != image_column]
        sizes = [parquet.metadata.row_group(group).num_rows for group in range(parquet.metadata.num_row_groups)]
        records = parquet.read(columns=columns).to_pylist()
    except (OSError, pa.ArrowException, ValueError) as err:
        raise ValueError(f"cannot read {describe(spec)}: {err}") from None
    if "key" not in columns:
        logger.warning("%s has no 'key' column: rows are keyed by shard name and row number", describe(spec))
    places = [(group, row) for group, size in enumerate(sizes) for row in range(size)]
    rows = []
    for position, (record, (group, row)) in enumerate(zip(records, places)):
        meta = {name: _json_able(value) for name, value in record.items()}
        key = meta.pop("key", None)
        key = f"{spec.name}/{position:09d}" if key is None else str(key)  # unique across shards, for a file output
        status, reason = meta.get("status"), meta.get("error_message")
        if status is None or status == "success":
            rows.append(Row(key, ImageRef("parquet", spec.source, group, row), meta))
        else:
            rows.append(Row(key, None, meta, f"img2dataset status {status!r}" + (f": {reason}" if reason else "")))
    return rows


# ---------------------------------------------------------------------------------------------------- reading


_TAR_DESCRIPTORS: dict[tuple[int, str], int] = {}  # (pid, path) -> fd; at most one entry per process
_ROW_GROUPS: dict[tuple[int, str, int], Any] = {}  # (pid, path, row group) -> image column; at most one entry


def read_bytes(ref: ImageRef) -> bytes:
    """The bytes of one image (not decoded). Raises OSError if the file or shard cannot be read, ValueError for a
    tar member that ends early, a parquet row without image bytes, or an unknown ``ref.kind``."""
    if ref.kind == "file":
        return Path(ref.path).read_bytes()
    if ref.kind == "tar":
        return _read_tar(ref)
    if ref.kind == "parquet":
        return _read_parquet(ref)
    raise ValueError(f"unknown ImageRef kind {ref.kind!r} (expected 'file', 'tar' or 'parquet')")


def _read_tar(ref: ImageRef) -> bytes:
    slot = (os.getpid(), ref.path)
    if slot not in _TAR_DESCRIPTORS:
        for (pid, _), old in _TAR_DESCRIPTORS.items():
            if pid == slot[0]:  # a descriptor inherited from a parent process is left to the parent
                os.close(old)
        _TAR_DESCRIPTORS.clear()
        _TAR_DESCRIPTORS[slot] = os.open(ref.path, os.O_RDONLY)
    data = os.pread(_TAR_DESCRIPTORS[slot], ref.size, ref.offset)
    if len(data) != ref.size:
        short = ref.size - len(data)
        raise ValueError(f"tar member at byte {ref.offset} of {ref.path} ends {short} bytes early (truncated shard)")
    return data


def _read_parquet(ref: ImageRef) -> bytes:
    slot = (os.getpid(), ref.path, ref.offset)
    column = _ROW_GROUPS.get(slot)
    if column is None:
        _ROW_GROUPS.clear()
        parquet, name, is_struct = _open_parquet(ref.path)
        column = parquet.read_row_group(ref.offset, columns=[name]).column(name).combine_chunks()
        _ROW_GROUPS[slot] = column = column.field("bytes") if is_struct else column
    if not 0 <= ref.size < len(column):
        raise ValueError(f"{ref.path} row group {ref.offset} has {len(column)} rows; row {ref.size} does not exist")
    value = column[ref.size].as_py()
    if value is None:
        raise ValueError("no image bytes (the image column is null in this row)")
    return value
