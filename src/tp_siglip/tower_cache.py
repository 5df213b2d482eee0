"""Fetching only a checkpoint's vision tower, by byte ranges, into a vision-only safetensors file.

`fetch_tower` reads, for one repo at one commit, the headers of the safetensors files that hold the tower
(two ranged reads per file: the 8-byte length, then the JSON; with an index, only the shards its
``weight_map`` names for the tower), then only the byte ranges of the tower's tensors, and writes them
with their original names as ``snapshots/<sha>/model.safetensors`` next to the repo's ``config.json``
and a manifest (``tp_siglip_tower.json``). `find_cached_tower` finds such a directory again.

Choices made:

* **Public huggingface_hub API only.** Reads go through `huggingface_hub.HfFileSystem` (``open``, ``seek``,
  ``read`` with ``cache_type="none"``: one ranged GET per read), the same on huggingface_hub 0.3x, 1.x and
  2.x. It resends a request whose connection dropped, timed out or got a 5xx (its ``http_backoff``);
  what the dropped attempt had received is lost, so tower bytes are read in chunks of about
  1/`CHUNKS_PER_TOWER` of the tower: a drop costs at most one chunk again. A server that answers
  fewer bytes than asked is asked again for the rest.
* **Few requests.** Adjacent tensors form one run; gaps up to ``min(MAX_GAP_BYTES, tower/64)`` between
  them are read and dropped rather than paying for another request.
* **Atomic and checked.** Everything is written into ``snapshots/.tmp-*`` and renamed into place only
  after the file's size, its header (`loader.read_header`) and safetensors' own parser agree with the
  plan; any error or interrupt removes the temporary directory (stale ones of killed processes are
  removed by the next fetch, which holds the repo lock). Bytes fetched by ranges cannot be checked
  against the files' LFS sha256 (it covers whole files); sizes, offsets and headers are checked instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from tp_siglip.loader import CheckpointError, TensorInfo, find_prefix, header_length, parse_header, parse_index
from tp_siglip.loader import read_header, tower_prefix

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MANIFEST_FILE = "tp_siglip_tower.json"
#: two tower tensors at most this far apart in a file are fetched as one run (also capped at tower/64)
MAX_GAP_BYTES = 1 << 20
#: tower bytes are requested in chunks of about tower/CHUNKS_PER_TOWER, within [MIN_CHUNK, MAX_CHUNK]
CHUNKS_PER_TOWER = 128
MIN_CHUNK, MAX_CHUNK = 4096, 64 << 20

#: a repo's files: name in the repo -> size in bytes (None where the Hub does not tell)
RepoFiles = Mapping[str, Optional[int]]


class TransferError(OSError):
    """The Hub (or the connection to it) failed while tp-siglip fetched a file or a byte range."""


def root_safetensors(files: RepoFiles) -> list[str]:
    return sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))


class Remote:
    """Ranged reads of one repo's files at one commit through `HfFileSystem`, counting what comes back."""

    def __init__(self, repo_id: str, sha: str, endpoint: str, token: Union[str, bool, None], files: RepoFiles, where: str):
        from huggingface_hub import HfFileSystem

        self.fs = HfFileSystem(endpoint=endpoint, token=token, skip_instance_cache=True)
        self.repo_id, self.sha, self.files, self.where = repo_id, sha, files, where
        self.handles: dict[str, Any] = {}
        self.weight_bytes = 0  # body bytes received from safetensors files (headers, tensors, gaps)
        self.requests = 0

    def size(self, name: str) -> int:
        size = self.files.get(name)
        return size if size is not None else int(self.fs.size(f"{self.repo_id}@{self.sha}/{name}"))

    def read(self, name: str, start: int, end: int, chunk: int) -> Iterator[tuple[int, bytes]]:
        """Bytes ``[start, end)`` of ``name`` as ``(offset, data)`` pieces, in order, one GET per piece."""
        if name not in self.handles:
            path = f"{self.repo_id}@{self.sha}/{name}"
            self.handles[name] = self.fs.open(path, "rb", cache_type="none", size=self.size(name))
        fh, pos = self.handles[name], start
        while pos < end:
            fh.seek(pos)
            self.requests += 1
            try:
                data = fh.read(min(chunk, end - pos))
            except Exception as err:
                if _is_http_error(err):  # typed Hub errors (401, 403, 404...) reach the caller as they are
                    raise
                raise TransferError(  # the HTTP library's own error types differ across huggingface_hub versions
                    f"{self.where}: reading bytes {pos}-{end - 1} of {name} failed after huggingface_hub's "
                    f"retries ({type(err).__name__}: {err}); nothing was saved"
                ) from err
            if name.endswith(".safetensors"):
                self.weight_bytes += len(data)
            if not data or len(data) > end - pos:
                raise TransferError(f"{self.where}: {name}: asked for {min(chunk, end - pos)} bytes at {pos}, got {len(data)}")
            yield pos, data
            pos += len(data)

    def read_bytes(self, name: str, start: int, end: int) -> bytes:
        return b"".join(data for _, data in self.read(name, start, end, max(end - start, 1)))

    def header(self, name: str) -> dict[str, TensorInfo]:
        """A remote safetensors file's tensors (absolute offsets), from two ranged reads."""
        source, size = f"{self.where}: {name}", self.size(name)
        length = header_length(self.read_bytes(name, 0, min(8, size)), size, source)
        infos = parse_header(self.read_bytes(name, 8, 8 + length), size, source)
        return {key: dataclasses.replace(info, file=name) for key, info in infos.items()}


def _is_http_error(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(err, HfHubHTTPError)


# ----------------------------------------------------------------------------- finding a cached tower


def tower_dir_name(sha: str, prefix: str, auto_prefix: Optional[str]) -> str:
    """``sha`` for the auto-detected tower, ``sha--<prefix>`` for an explicit prefix naming another one."""
    if prefix == auto_prefix:
        return sha
    return f"{sha}--{re.sub(r'[^A-Za-z0-9_-]+', '_', prefix.rstrip('.')) or 'root'}"


def find_cached_tower(snapshots: Path, sha: str, prefix: Optional[str], where: str) -> Optional[Path]:
    """A complete tower directory for ``sha`` (and ``prefix``, when given), or None."""
    candidates = [snapshots / sha] + ([snapshots / tower_dir_name(sha, prefix, None)] if prefix is not None else [])
    for directory in candidates:
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(manifest, dict) or (prefix is not None and manifest.get("prefix") != prefix):
            continue
        weights = directory / SINGLE_FILE
        if (directory / CONFIG_FILE).is_file() and weights.is_file() and weights.stat().st_size == manifest.get("file_size"):
            return directory
        logger.warning("%s: cached tower %s is damaged (size or files); fetching it again", where, directory)
    return None


# ----------------------------------------------------------------------------- fetching


def _tower_headers(remote: Remote, files: RepoFiles, prefix: Optional[str]) -> tuple[str, Optional[str], dict[str, dict[str, TensorInfo]]]:
    """The tower's prefix, the one auto-detection picks (None where it fails), and the headers of its files."""
    where = remote.where
    weight_map = None
    if INDEX_FILE in files:
        weight_map = parse_index(remote.read_bytes(INDEX_FILE, 0, remote.size(INDEX_FILE)), f"{where}: {INDEX_FILE}")
        chosen = tower_prefix(weight_map, prefix, where)
        names = sorted({f for k, f in weight_map.items() if k.startswith(chosen)})
    else:
        names = [SINGLE_FILE] if SINGLE_FILE in files else root_safetensors(files)
    headers = {name: remote.header(name) for name in names}
    seen: dict[str, str] = {}
    for name, infos in headers.items():
        for key in infos:
            if key in seen:
                raise CheckpointError(f"{where}: tensor {key!r} appears in both {seen[key]} and {name}")
            seen[key] = name
    keys: Mapping[str, str] = seen if weight_map is None else weight_map
    chosen = tower_prefix(keys, prefix, where)
    for key, name in (weight_map or {}).items():
        if key.startswith(chosen) and seen.get(key) != name:
            raise CheckpointError(f"{where}: {INDEX_FILE} puts {key!r} in {name}, but that file's header has no such tensor")
    try:
        auto: Optional[str] = find_prefix(keys, where)
    except CheckpointError:
        auto = None
    return chosen, auto, headers


def _plan_runs(order: list[TensorInfo], destination: dict[str, int], max_gap: int) -> list[dict[str, Any]]:
    """Group the tower's tensors (file order, then offset) into runs: one byte range of one file each."""
    runs: list[dict[str, Any]] = []
    for info in order:
        if info.nbytes == 0:
            continue
        last = runs[-1] if runs else None
        if last is None or last["file"] != info.file or not 0 <= info.start - last["end"] <= max_gap:
            last = {"file": info.file, "start": info.start, "end": info.end, "pieces": []}
            runs.append(last)
        last["end"] = info.end
        last["pieces"].append((info.start, info.end, destination[info.name]))
    return runs


def fetch_tower(remote: Remote, snapshots: Path, files: RepoFiles, prefix: Optional[str], meta: dict[str, Any]) -> Path:
    """Fetch config.json and the tower's byte ranges; save them as a checked vision-only checkpoint."""
    config = remote.read_bytes(CONFIG_FILE, 0, remote.size(CONFIG_FILE))
    try:
        json.loads(config)
    except ValueError as err:
        raise CheckpointError(f"{remote.where}: config.json is not valid JSON ({err})") from None
    chosen, auto, headers = _tower_headers(remote, files, prefix)
    rank = {name: i for i, name in enumerate(headers)}
    order = sorted(
        (info for infos in headers.values() for key, info in infos.items() if key.startswith(chosen)),
        key=lambda info: (rank[info.file], info.start),
    )
    destination, entries, tower_bytes = {}, {}, 0
    for info in order:
        destination[info.name] = tower_bytes
        span = [tower_bytes, tower_bytes + info.nbytes]
        entries[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": span}
        tower_bytes += info.nbytes
    metadata = {"format": "pt", "source": f"{meta['endpoint']}/{remote.repo_id}", "commit": remote.sha, "prefix": chosen}
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    runs = _plan_runs(order, destination, min(MAX_GAP_BYTES, tower_bytes // 64))
    chunk = min(MAX_CHUNK, max(MIN_CHUNK, tower_bytes // CHUNKS_PER_TOWER))

    snapshots.mkdir(parents=True, exist_ok=True)
    for stale in snapshots.glob(".tmp-*"):  # the caller holds the repo lock: these belong to a dead process
        shutil.rmtree(stale, ignore_errors=True)
    final = snapshots / tower_dir_name(remote.sha, chosen, auto)
    tmp = snapshots / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_bytes(config)
        weights = tmp / SINGLE_FILE
        total = sum(run["end"] - run["start"] for run in runs)
        with open(weights, "wb") as fh, _progress(total, f"{remote.repo_id} vision tower") as bar:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.truncate(data_start + tower_bytes)
            for run in runs:
                for pos, data in remote.read(run["file"], run["start"], run["end"], chunk):
                    _place(fh, data_start, run["pieces"], pos, data)
                    bar.update(len(data))
            fh.flush()
            os.fsync(fh.fileno())
        _verify(weights, data_start + tower_bytes, entries, remote.where)
        repo_bytes = sum(remote.size(name) for name in root_safetensors(files))
        manifest = {
            **meta,
            "repo_id": remote.repo_id,
            "commit": remote.sha,
            "prefix": chosen,
            "source_files": {name: remote.size(name) for name in headers},
            "tensors": len(order),
            "tower_bytes": tower_bytes,
            "file_size": data_start + tower_bytes,
            "fetched_bytes": remote.weight_bytes,
            "requests": remote.requests,
            "repo_safetensors_bytes": repo_bytes,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if final.exists():  # a damaged copy (see find_cached_tower): move it out of the way first
            old = snapshots / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "%s: fetched %.1f MB of safetensors bytes (vision tower: %d tensors, %.1f MB, prefix %r; %d requests) out of "
        "%.1f MB in the repo's safetensors (%.2f%%); saved to %s",
        remote.where, remote.weight_bytes / 1e6, len(order), tower_bytes / 1e6, chosen, remote.requests,
        repo_bytes / 1e6, 100.0 * remote.weight_bytes / max(repo_bytes, 1), final,
    )
    return final


def _place(fh: Any, data_start: int, pieces: list[tuple[int, int, int]], pos: int, data: bytes) -> None:
    """Write the bytes of ``data`` (file offset ``pos``) that belong to tower tensors at their new place."""
    end = pos + len(data)
    for lo, hi, dst in pieces:
        a, b = max(lo, pos), min(hi, end)
        if a < b:
            fh.seek(data_start + dst + (a - lo))
            fh.write(data[a - pos : b - pos])


def _verify(path: Path, expected_size: int, entries: dict[str, Any], where: str) -> None:
    """The written file has the planned size and tensors, by our header check and by safetensors' parser."""
    from safetensors import safe_open

    if path.stat().st_size != expected_size:
        raise CheckpointError(f"{where}: wrote {path.stat().st_size} bytes to {path}, expected {expected_size}")
    written = {k: (v.dtype, list(v.shape), v.nbytes) for k, v in read_header(path).items()}
    planned = {k: (e["dtype"], e["shape"], e["data_offsets"][1] - e["data_offsets"][0]) for k, e in entries.items()}
    with safe_open(str(path), framework="pt") as check:
        if written != planned or set(check.keys()) != set(entries):
            raise CheckpointError(f"{where}: the tower written to {path} does not match the plan")


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar in bytes (huggingface_hub's: off with ``HF_HUB_DISABLE_PROGRESS_BARS`` or disable_progress_bars())."""
    from huggingface_hub.utils import tqdm

    flag = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=flag, name=__name__)
