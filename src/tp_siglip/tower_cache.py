"""Fetching only a checkpoint's vision tower, by byte ranges, into a checked vision-only safetensors file.

`fetch_tower` reads the headers of the files holding the tower (with an index, only its shards), then its
bytes, and writes them, names kept, as ``snapshots/<sha>/model.safetensors`` beside ``config.json`` (an
open_clip repo's ``open_clip_config.json``: its tower is ``visual.trunk.*`` of ``open_clip_model.safetensors``,
the text tower never fetched), ``preprocessor_config.json`` when the repo has one, and a manifest (`find_cached_tower` finds it). Reads are ranged GETs through huggingface_hub's `HfFileSystem`, which
resends one that dropped (>= 0.36) or got a 5xx, losing what it had received: so the tower is read in chunks of
~1/`CHUNKS_PER_TOWER`, and a short answer is continued. Adjacent tensors form one run (gaps up to
``min(MAX_GAP_BYTES, tower/64)`` are read and dropped). All is written in ``snapshots/.tmp-*`` and renamed into
place once its size and safetensors' parser agree with the plan; an error removes it. (Ranged bytes cannot be
checked against the LFS sha256 of whole files; sizes and offsets are.)
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
from typing import Any, Iterator, Mapping, Optional

from tp_siglip.formats import config_file
from tp_siglip.loader import (
    CheckpointError,
    TensorInfo,
    find_prefix,
    header_length,
    parse_header,
    parse_index,
    read_header,
    tower_prefix,
)

logger = logging.getLogger(__name__)

CONFIG_FILE, INDEX_FILE, SINGLE_FILE = "config.json", "model.safetensors.index.json", "model.safetensors"
#: the image processor's settings (a NaFlex tower's ``max_num_patches``): kept beside the tower when the repo has it
PREPROCESSOR_FILE = "preprocessor_config.json"
MANIFEST_FILE = "tp_siglip_tower.json"
MAX_GAP_BYTES, CHUNKS_PER_TOWER, MIN_CHUNK, MAX_CHUNK = 1 << 20, 128, 4096, 64 << 20  # see the module docstring
RepoFiles = Mapping[str, Optional[int]]  # a repo's files: name -> size in bytes (None where unknown)


class TransferError(OSError):
    """The Hub (or the connection to it) failed while tp-siglip fetched a file or a byte range."""


def env_flag(name: str) -> Optional[bool]:
    """A boolean environment variable as huggingface_hub reads them; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value.upper() in {"1", "ON", "YES", "TRUE"} if value else None


def root_safetensors(files: RepoFiles) -> list[str]:
    return sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))


def tower_files(weight_map: Optional[dict[str, str]], files: RepoFiles, prefix: Optional[str], where: str) -> list[str]:
    """The safetensors files holding the tower: the index's shards for it, else model.safetensors, else all."""
    if weight_map is not None:
        chosen = tower_prefix(weight_map, prefix, where)
        return sorted({f for k, f in weight_map.items() if k.startswith(chosen)})
    return [SINGLE_FILE] if SINGLE_FILE in files else root_safetensors(files)


class Remote:
    """Ranged reads of one repo's files at one commit through `HfFileSystem`, counting weight bytes and GETs."""

    def __init__(self, repo_id: str, sha: str, endpoint: str, token: Any, files: RepoFiles, where: str) -> None:
        from huggingface_hub import HfFileSystem

        self.fs = HfFileSystem(endpoint=endpoint, token=token, skip_instance_cache=True)
        self.repo_id, self.sha, self.files, self.where = repo_id, sha, files, where
        self.handles: dict[str, Any] = {}
        self.weight_bytes = self.requests = 0

    def open(self, name: str) -> Any:
        if name not in self.handles:  # a known size spares a metadata request
            path = f"{self.repo_id}@{self.sha}/{name}"
            self.handles[name] = self.fs.open(path, "rb", cache_type="none", size=self.files.get(name))
        return self.handles[name]

    def read(self, name: str, start: int, end: int, chunk: int) -> Iterator[tuple[int, bytes]]:
        """Bytes ``[start, end)`` of ``name`` as ``(offset, data)`` pieces of at most ``chunk`` bytes, in order."""
        from huggingface_hub.errors import HfHubHTTPError

        pos = start
        while pos < end:
            self.open(name).seek(pos)
            self.requests += 1
            try:
                data = self.open(name).read(min(chunk, end - pos))
            except Exception as err:  # typed Hub errors (401, 404...) pass; others are what the retries gave up on
                if isinstance(err, HfHubHTTPError):
                    raise
                raise TransferError(f"{self.where}: reading bytes {pos}-{end - 1} of {name} failed "
                                    f"({type(err).__name__}: {err}); nothing was saved") from err
            self.weight_bytes += len(data) if name.endswith(".safetensors") else 0
            if not data or len(data) > end - pos:
                raise TransferError(f"{self.where}: {name}: asked for bytes {pos}-{end - 1}, got {len(data)} bytes")
            yield pos, data
            pos += len(data)

    def read_bytes(self, name: str, start: int = 0, end: Optional[int] = None) -> bytes:
        end = self.open(name).size if end is None else end
        return b"".join(data for _, data in self.read(name, start, end, end - start))


def tower_dir_name(sha: str, prefix: str, auto_prefix: Optional[str]) -> str:
    """``sha`` for the auto-detected tower, ``sha--<prefix>`` for an explicit prefix naming another one."""
    return sha if prefix == auto_prefix else f"{sha}--{re.sub(r'[^A-Za-z0-9_-]+', '_', prefix.rstrip('.')) or 'root'}"


def find_cached_tower(snapshots: Path, sha: str, prefix: Optional[str], where: str) -> Optional[Path]:
    """A complete tower directory for ``sha`` (and ``prefix``, when given), or None."""
    named = [snapshots / tower_dir_name(sha, prefix, None)] if prefix is not None else []
    for directory in [snapshots / sha, *named]:
        if not directory.is_dir():
            continue
        try:
            manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
            problem = None if isinstance(manifest, dict) else f"{MANIFEST_FILE} is not a JSON object"
        except (OSError, ValueError) as err:
            problem = f"{MANIFEST_FILE}: {err}"
        if problem is None and prefix not in (None, manifest.get("prefix")):
            continue
        if (problem := problem or _damage(directory, manifest)) is None:
            return directory
        logger.warning("%s: the cached tower in %s is damaged: %s. It is not used; the next load with network access "
                       "fetches it again in its place", where, directory, problem)
    return None


def _damage(directory: Path, manifest: dict) -> Optional[str]:
    """What is wrong with a cached tower's files, or None: its config must be JSON, its weights the size recorded
    and their safetensors header valid (the bytes of the tensors cannot be checked)."""
    config, weights = directory / str(manifest.get("config_file", CONFIG_FILE)), directory / SINGLE_FILE
    try:
        json.loads(config.read_bytes())
    except (OSError, ValueError) as err:
        return f"{config.name}: {err}"
    try:
        if (size := weights.stat().st_size) != manifest.get("file_size"):
            return f"{SINGLE_FILE} has {size} bytes, {manifest.get('file_size')} expected"
        read_header(weights)
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        return str(err)
    return None


def _tower_tensors(remote: Remote, prefix: Optional[str]) -> tuple[str, Optional[str], list[TensorInfo]]:
    """The tower's prefix, the one auto-detection picks (None where it fails), and its tensors in file order."""
    where, files = remote.where, remote.files
    weight_map = parse_index(remote.read_bytes(INDEX_FILE), f"{where}: {INDEX_FILE}") if INDEX_FILE in files else None
    infos: list[TensorInfo] = []
    for name in tower_files(weight_map, files, prefix, where):  # two ranged reads each
        source, size = f"{where}: {name}", remote.open(name).size
        length = header_length(remote.read_bytes(name, 0, min(8, size)), size, source)
        header = parse_header(remote.read_bytes(name, 8, 8 + length), size, source)
        infos += sorted((dataclasses.replace(info, file=name) for info in header.values()), key=lambda info: info.start)
    seen = {info.name: info.file for info in infos}
    chosen = tower_prefix(weight_map or seen, prefix, where)
    wrong = sorted(k for k, name in (weight_map or {}).items() if k.startswith(chosen) and seen.get(k) != name)
    if len(seen) < len(infos) or wrong:
        raise CheckpointError(f"{where}: the shards' headers repeat a tensor or disagree with {INDEX_FILE} (on {wrong[:3]})")
    try:
        auto: Optional[str] = find_prefix(weight_map or seen, where)
    except CheckpointError:
        auto = None
    return chosen, auto, [info for info in infos if info.name.startswith(chosen)]


def fetch_tower(remote: Remote, snapshots: Path, prefix: Optional[str], meta: dict[str, str]) -> Path:
    """Fetch config.json and the tower's byte ranges; save them as a checked vision-only checkpoint."""
    from huggingface_hub.utils import tqdm
    from safetensors import safe_open

    config_name = config_file(remote.files)
    try:
        json.loads(config := remote.read_bytes(config_name))
    except ValueError as err:
        raise CheckpointError(f"{remote.where}: {config_name} is not valid JSON ({err})") from None
    chosen, auto, order = _tower_tensors(remote, prefix)
    metadata = {"format": "pt", "source": f"{meta['endpoint']}/{remote.repo_id}", "commit": remote.sha, "prefix": chosen}
    raw, runs, tower_bytes = _layout(order, metadata)
    file_size, chunk = 8 + len(raw) + tower_bytes, min(MAX_CHUNK, max(MIN_CHUNK, tower_bytes // CHUNKS_PER_TOWER))
    snapshots.mkdir(parents=True, exist_ok=True)
    for stale in snapshots.glob(".tmp-*"):  # the caller holds the repo lock: these belong to a dead process
        shutil.rmtree(stale, ignore_errors=True)
    final = snapshots / tower_dir_name(remote.sha, chosen, auto)
    (tmp := snapshots / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}").mkdir()
    try:
        (tmp / config_name).write_bytes(config)
        if PREPROCESSOR_FILE in remote.files:
            (tmp / PREPROCESSOR_FILE).write_bytes(remote.read_bytes(PREPROCESSOR_FILE))
        bar = tqdm(total=sum(r[2] - r[1] for r in runs), unit="B", unit_scale=True, unit_divisor=1024, name=__name__,
                   desc=f"{remote.repo_id} vision tower",  # None: a bar only on a terminal, not in a log or CI's output
                   disable=True if env_flag("HF_HUB_DISABLE_PROGRESS_BARS") else None)
        with open(tmp / SINGLE_FILE, "wb") as fh, bar:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.truncate(file_size)
            for name, start, end, pieces in runs:
                for pos, data in remote.read(name, start, end, chunk):
                    _place(fh, 8 + len(raw), pieces, pos, data)
                    bar.update(len(data))
            fh.flush()
            os.fsync(fh.fileno())
        with safe_open(str(tmp / SINGLE_FILE), framework="pt") as check:  # safetensors' own parser agrees
            if (tmp / SINGLE_FILE).stat().st_size != file_size or set(check.keys()) != {i.name for i in order}:
                raise CheckpointError(f"{remote.where}: the tower written to {tmp} does not match the plan")
        repo_bytes = sum(remote.files.get(name) or 0 for name in root_safetensors(remote.files))
        sources = {name: remote.open(name).size for name in dict.fromkeys(info.file for info in order)}
        manifest = dict(meta, repo_id=remote.repo_id, commit=remote.sha, prefix=chosen, tensors=len(order), source_files=sources,
                        config_file=config_name,
                        tower_bytes=tower_bytes, file_size=file_size, fetched_bytes=remote.weight_bytes,
                        requests=remote.requests, repo_safetensors_bytes=repo_bytes)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)  # a damaged copy (see find_cached_tower), if any
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("%s: fetched %.2f MB of safetensors bytes (vision tower: %d tensors, %.2f MB, prefix %r; %d requests) "
                "out of %.2f MB in the repo's safetensors (%.2f%%); saved to %s", remote.where, remote.weight_bytes / 1e6,
                len(order), tower_bytes / 1e6, chosen, remote.requests, repo_bytes / 1e6,
                100 * remote.weight_bytes / max(repo_bytes, 1), final)
    return final


def _layout(order: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, list[list[Any]], int]:
    """The new file's JSON header (tensors packed in ``order``), the runs to read, the tower's bytes. A run is
    ``[file, start, end, pieces]``, pieces = its tensors' ``(source start, source end, offset in the new data)``."""
    entries, runs, offset = {}, [], 0
    max_gap = min(MAX_GAP_BYTES, sum(i.nbytes for i in order) // 64)
    for info in order:
        entries[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
        if info.nbytes and not (runs and runs[-1][0] == info.file and 0 <= info.start - runs[-1][2] <= max_gap):
            runs.append([info.file, info.start, info.end, []])
        if info.nbytes:
            runs[-1][2] = info.end
            runs[-1][3].append((info.start, info.end, offset))
        offset += info.nbytes
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8), runs, offset


def _place(fh: Any, data_start: int, pieces: list[tuple[int, int, int]], pos: int, data: bytes) -> None:
    """Write the bytes of ``data`` (source offset ``pos``) that belong to tower tensors at their new place."""
    for lo, hi, dst in pieces:
        a, b = max(lo, pos), min(hi, pos + len(data))
        if a < b:
            fh.seek(data_start + dst + a - lo)
            fh.write(data[a - pos : b - pos])
