"""Turning a Hub repo id (or a directory) into a local checkpoint directory, fetching only the vision tower.

`resolve_checkpoint` is what ``SiglipVisionTransformer.from_pretrained`` calls first. Given

* **an existing path** (or any ``os.PathLike``): it goes through `loader.local_checkpoint_dir`, unchanged;
* **a Hub repo id** (``"google/siglip-so400m-patch14-384"``, ``"google/paligemma2-28b-pt-896"``): it
  returns a local directory holding the repo's ``config.json`` and safetensors with (at least) the
  vision tower, resolved through huggingface_hub, in this order:

  1. *Revision -> commit sha*: one small API call (``GET /api/models/{repo}/revision/{rev}``, which also
     lists the files and their sizes). Offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``) or when
     the endpoint cannot be reached, the sha comes from the ``refs/`` files of the caches instead.
  2. *Reuse what is on disk*, with no weight traffic: first tp-siglip's own tower cache, then the plain
     Hugging Face cache (e.g. a VLM server already downloaded the repo): a snapshot with ``config.json``
     and every safetensors file that holds the tower is used as is.
  3. *Fetch* (``download="tower"``, the default): read each needed safetensors file's header with two
     ranged requests (its first 8 bytes, then the JSON header; with sharded repos only the shards the
     index's ``weight_map`` names for the tower), then only the byte ranges of the tower's tensors,
     adjacent tensors grouped into one request per run. They are written, with their original names,
     as one vision-only ``model.safetensors`` next to the repo's ``config.json``. ``download="files"``
     instead downloads whole files (config, index and the shards holding the tower) into the plain
     Hugging Face cache with ``hf_hub_download``.

Cache layout (``<hub cache>`` = ``cache_dir``, else ``HF_HUB_CACHE``, else ``HF_HOME/hub``)::

    <hub cache>/tp-siglip/models--{org}--{name}/
        refs/{revision}                 # commit sha the revision resolved to (read when offline)
        snapshots/{sha}/                # the auto-detected tower of that commit
            config.json                 # the repo's config.json, byte for byte
            model.safetensors           # the tower's tensors only, original key names
            tp_siglip_tower.json        # manifest: repo, sha, prefix, sizes, bytes fetched
        snapshots/{sha}--{prefix}/      # only for an explicit prefix= naming another tower
    <hub cache>/tp-siglip/.locks/models--{org}--{name}.lock

Choices made:

* **Atomic and checked.** A tower is written into ``snapshots/.tmp-*`` and renamed into place only after
  its size, its header (`loader.read_header`) and safetensors' own parser agree with the plan; any error
  or interrupt removes the temporary directory, so a half-written checkpoint is never visible. Leftover
  temporary directories of killed processes are removed by the next fetch.
* **One download, not N.** Every process that needs to fetch takes a per-repo file lock (``filelock``,
  an ``flock`` that the OS releases if the holder dies) under ``tp-siglip/.locks``, then looks at the
  caches again: with several ranks on a node, one rank fetches while the others wait and then read the
  same files (should the fetching one fail, the next one tries by itself). `resolve_checkpoint` gets no
  process group and needs none.
* **Progress and logs.** A tqdm bar counts the tower's bytes as they arrive (off with
  ``HF_HUB_DISABLE_PROGRESS_BARS=1`` or huggingface_hub's ``disable_progress_bars()``); one INFO line per
  fetch gives the bytes fetched against the sum of the repo's safetensors sizes.
* **huggingface_hub's HTTP machinery.** Requests go through its shared ``httpx2`` client
  (``get_session``: offline mode enforced, request ids), with ``build_hf_headers`` (token, user agent),
  ``hf_hub_url`` and ``hf_raise_for_status`` (typed errors). Small files use ``http_backoff``. Ranged
  reads of the weights stream to disk with a resume loop of their own: after a dropped connection, a
  timeout or a 429/5xx they ask again for the bytes still missing (``RETRIES`` times at most), which
  ``http_backoff`` (it re-sends the whole request) cannot do.
* **Errors name the repo and the revision** and keep huggingface_hub's types where one exists:
  ``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``GatedRepoError``, ``HfHubHTTPError`` (401/403),
  ``LocalEntryNotFoundError`` (offline with nothing cached); `loader.CheckpointError` for repos without
  safetensors (pickles are refused, never opened), without a SigLIP tower or with a bad index;
  `TransferError` when the bytes cannot be fetched.
* The tower cache lives inside the hub cache, as the issue suggests; huggingface_hub's ``scan_cache_dir``
  (``hf cache scan``) lists ``tp-siglip`` among its warnings ("not a valid HuggingFace cache directory").
* Cache hits in either cache are used whatever ``download`` says; ``download`` only decides how a miss
  is filled. Weights fetched by ranges cannot be checked against the files' LFS sha256 (it covers whole
  files); sizes, offsets and headers are checked instead.

Environment variables honoured, read at call time (falling back to huggingface_hub's import-time values):
``HF_ENDPOINT``, ``HF_HUB_CACHE`` (and the legacy ``HUGGINGFACE_HUB_CACHE``), ``HF_HOME``,
``HF_HUB_OFFLINE`` (and ``TRANSFORMERS_OFFLINE``), ``HF_HUB_DISABLE_PROGRESS_BARS``; the token as
huggingface_hub finds it (``HF_TOKEN``, the saved login) unless ``token=`` is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

from tp_siglip.loader import (
    PICKLE_SUFFIXES,
    CheckpointError,
    TensorInfo,
    find_prefix,
    header_length,
    local_checkpoint_dir,
    parse_header,
    parse_index,
    read_header,
    tower_prefix,
)

__all__ = ["DOWNLOAD_MODES", "TransferError", "resolve_checkpoint"]

if TYPE_CHECKING:  # huggingface_hub is imported lazily: local directories never need it
    import httpx2

logger = logging.getLogger(__name__)

DOWNLOAD_MODES = ("tower", "files")
#: sub-directory of the hub cache that holds tp-siglip's vision-only checkpoints
CACHE_SUBDIR = "tp-siglip"
MANIFEST_FILE = "tp_siglip_tower.json"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: two tensors of the tower at most this far apart in a file are fetched with one request (the gap's bytes
#: are read and dropped); also capped at 1/64 of the tower's bytes so small towers stay small
MAX_GAP_BYTES = 1 << 20
#: how often a ranged read is retried (resuming after the bytes already received) before giving up
RETRIES = 5
#: seconds before the first retry; doubled for each further one, up to RETRY_MAX_WAIT
RETRY_WAIT = 1.0
RETRY_MAX_WAIT = 8.0
RETRY_STATUS_CODES = (408, 429, 500, 502, 503, 504)

#: a repo's files: name in the repo -> size in bytes (None when the Hub does not tell)
RepoFiles = dict[str, Optional[int]]

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class TransferError(OSError):
    """The Hub (or the connection to it) failed while tp-siglip fetched a file or a byte range."""


# ----------------------------------------------------------------------------- entry point


def resolve_checkpoint(
    repo_or_dir: Union[str, os.PathLike[str]],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike[str]]] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
    download: str = "tower",
    prefix: Optional[str] = None,
) -> Path:
    """A local directory holding ``config.json`` and safetensors with (at least) the vision tower.

    Args:
        repo_or_dir: an existing checkpoint directory, or a Hub repo id (``"org/name"``).
        revision: branch, tag or commit sha of the repo (default ``"main"``).
        cache_dir: the hub cache to use (default: ``HF_HUB_CACHE``, else ``HF_HOME/hub``).
        token: as in huggingface_hub: a token, ``True`` (the saved one), ``False`` (none) or ``None``.
        local_files_only: never touch the network; load from the caches or fail.
        download: on a cache miss, ``"tower"`` fetches only the tower's byte ranges into tp-siglip's
            cache; ``"files"`` downloads whole safetensors files into the plain Hugging Face cache.
        prefix: the tower's key prefix, or ``None`` to detect it (see `loader.find_prefix`).

    Raises:
        ValueError: ``download`` is not ``"tower"`` or ``"files"``.
        FileNotFoundError: ``repo_or_dir`` is neither an existing path nor a valid repo id.
        huggingface_hub.errors.RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError,
            HfHubHTTPError, LocalEntryNotFoundError: see the module docstring.
        CheckpointError: the repo has no safetensors, no SigLIP tower or a corrupt index/header.
        TransferError: the bytes could not be fetched (nothing is left behind).
    """
    if download not in DOWNLOAD_MODES:
        raise ValueError(
            f"download={download!r} is not valid; expected 'tower' (fetch only the vision tower's byte "
            f"ranges) or 'files' (download whole safetensors files into the Hugging Face cache)"
        )
    is_path = isinstance(repo_or_dir, str) and repo_or_dir != "" and os.path.exists(repo_or_dir)
    if isinstance(repo_or_dir, os.PathLike) or is_path:
        return local_checkpoint_dir(repo_or_dir)
    if not isinstance(repo_or_dir, str):
        raise TypeError(f"repo_or_dir must be a path or a repo id string, got {type(repo_or_dir).__name__}")
    problem = _repo_id_problem(repo_or_dir)
    if problem is not None:
        raise FileNotFoundError(
            f"{repo_or_dir!r}: no such checkpoint directory exists, and it is not a valid Hub repo id "
            f"({problem}). Pass a directory holding config.json and *.safetensors, or a repo id such as "
            f"'google/siglip-so400m-patch14-384'"
        )
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a string or None, got {type(revision).__name__}")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string or None, got {type(prefix).__name__}")
    hub = _Hub.create(repo_or_dir, revision, cache_dir, token, local_files_only)
    return _resolve_repo(hub, prefix, download)


# ----------------------------------------------------------------------------- settings


def _env_flag(name: str) -> Optional[bool]:
    """``True``/``False`` for a set boolean environment variable, ``None`` when unset or empty."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_cache(cache_dir: Optional[Union[str, os.PathLike[str]]]) -> Path:
    from huggingface_hub import constants

    if cache_dir is not None:
        chosen = os.fspath(cache_dir)
    elif os.environ.get("HF_HUB_CACHE"):
        chosen = os.environ["HF_HUB_CACHE"]
    elif os.environ.get("HUGGINGFACE_HUB_CACHE"):
        chosen = os.environ["HUGGINGFACE_HUB_CACHE"]
    elif os.environ.get("HF_HOME"):
        chosen = os.path.join(os.environ["HF_HOME"], "hub")
    else:
        chosen = constants.HF_HUB_CACHE
    return Path(os.path.expandvars(os.path.expanduser(chosen))).resolve()


def _offline_reason(local_files_only: bool) -> Optional[str]:
    from huggingface_hub import constants

    if local_files_only:
        return "local_files_only=True"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # the first one set decides, as in huggingface_hub
        flag = _env_flag(name)
        if flag is not None:
            return f"offline mode is on ({name}={os.environ[name].strip()})" if flag else None
    if constants.HF_HUB_OFFLINE:  # set before huggingface_hub was imported, unset since
        return "offline mode is on (HF_HUB_OFFLINE, as read when huggingface_hub was imported)"
    return None


def _repo_id_problem(repo_id: str) -> Optional[str]:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        return str(err).strip().splitlines()[0]
    return None


def _folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


@dataclass(frozen=True)
class _Hub:
    """Where and how to reach one repo: the settings every step below shares."""

    repo_id: str
    revision: str
    endpoint: str
    cache: Path
    token: Optional[Union[str, bool]]
    offline: Optional[str]  # why we may not use the network, or None

    @classmethod
    def create(
        cls,
        repo_id: str,
        revision: Optional[str],
        cache_dir: Optional[Union[str, os.PathLike[str]]],
        token: Optional[Union[str, bool]],
        local_files_only: bool,
    ) -> _Hub:
        offline = _offline_reason(local_files_only)
        return cls(repo_id, revision or "main", _endpoint(), _hub_cache(cache_dir), token, offline)

    @property
    def where(self) -> str:
        return f"Hub repo {self.repo_id!r} at revision {self.revision!r}"

    @property
    def own_dir(self) -> Path:
        return self.cache / CACHE_SUBDIR / _folder_name(self.repo_id)

    @property
    def hf_dir(self) -> Path:
        return self.cache / _folder_name(self.repo_id)

    @property
    def lock_path(self) -> Path:
        return self.cache / CACHE_SUBDIR / ".locks" / f"{_folder_name(self.repo_id)}.lock"


# ----------------------------------------------------------------------------- resolution


class _RetryableStatus(Exception):
    """A 408/429/5xx answer to a ranged read: worth asking again."""


class _Unreachable(Exception):
    """The endpoint could not be reached (connection error, timeout, 5xx): fall back to the caches."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _resolve_repo(hub: _Hub, prefix: Optional[str], download: str) -> Path:
    if hub.offline is not None:
        return _resolve_offline(hub, prefix, None)
    try:
        sha, files = _repo_files(hub)
    except _Unreachable as err:
        logger.warning("%s: %s could not be reached (%s); looking in the local caches", hub.where, hub.endpoint, err)
        return _resolve_offline(hub, prefix, err.cause)
    _check_repo_files(hub, files)
    cached = _cached_checkpoint(hub, sha, prefix, files)
    if cached is None:
        with _repo_lock(hub):
            cached = _cached_checkpoint(hub, sha, prefix, files)  # another process may have fetched it meanwhile
            if cached is None:
                fetch = _download_files if download == "files" else _fetch_tower
                cached = fetch(hub, sha, prefix, files)
    _write_ref(hub, sha)
    return cached


def _resolve_offline(hub: _Hub, prefix: Optional[str], cause: Optional[BaseException]) -> Path:
    from huggingface_hub.errors import LocalEntryNotFoundError

    for sha in _cached_shas(hub):
        cached = _cached_checkpoint(hub, sha, prefix, None)
        if cached is not None:
            return cached
    reason = hub.offline if cause is None else f"{hub.endpoint} could not be reached ({type(cause).__name__}: {cause})"
    raise LocalEntryNotFoundError(
        f"{hub.where}: {reason}, and no cached copy of its vision tower was found (looked in {hub.own_dir} "
        f"and {hub.hf_dir}). Load it once with network access first"
        + ("" if cause is not None else ", or unset HF_HUB_OFFLINE / pass local_files_only=False")
    ) from cause


def _cached_shas(hub: _Hub) -> list[str]:
    """Commit shas the revision may stand for, from tp-siglip's refs, then the Hugging Face cache's refs."""
    if _SHA_RE.match(hub.revision):
        return [hub.revision]
    shas: list[str] = []
    for refs in (hub.own_dir / "refs", hub.hf_dir / "refs"):
        path = _ref_path(refs, hub.revision)
        if path is not None and path.is_file():
            sha = path.read_text(encoding="utf-8").strip()
            if _SHA_RE.match(sha) and sha not in shas:
                shas.append(sha)
    return shas


def _ref_path(refs: Path, revision: str) -> Optional[Path]:
    """``refs/<revision>`` (nested for ``refs/pr/1``), or None for a revision that is not a safe path."""
    parts = revision.split("/")
    if "\\" in revision or any(p in ("", ".", "..") for p in parts):
        return None
    return refs.joinpath(*parts)


def _write_ref(hub: _Hub, sha: str) -> None:
    """Remember revision -> sha for offline loads (best effort: a read-only cache still loads)."""
    if hub.revision == sha:
        return
    path = _ref_path(hub.own_dir / "refs", hub.revision)
    if path is None:
        return
    try:
        if path.is_file() and path.read_text(encoding="utf-8").strip() == sha:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(sha, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("%s: could not record the commit sha in %s (%s)", hub.where, path, err)


def _repo_files(hub: _Hub) -> tuple[str, RepoFiles]:
    """The commit sha of the revision and the repo's files (name -> size when the Hub tells)."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from tp_siglip import __version__

    api = HfApi(endpoint=hub.endpoint, library_name="tp-siglip", library_version=__version__)
    try:
        info = api.model_info(
            hub.repo_id,
            revision=hub.revision,
            files_metadata=True,  # file sizes, for the log line
            token=hub.token,
            timeout=constants.HF_HUB_ETAG_TIMEOUT,
        )
    except (httpx2.TransportError, OfflineModeIsEnabled) as err:
        raise _Unreachable(err) from err
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code in RETRY_STATUS_CODES:
            raise _Unreachable(err) from err
        raise _hub_error(hub, err) from err
    if not info.sha or not _SHA_RE.match(info.sha):
        raise CheckpointError(f"{hub.where}: {hub.endpoint} returned no valid commit sha ({info.sha!r})")
    files = {s.rfilename: s.size for s in info.siblings or []}
    return info.sha, files


def _check_repo_files(hub: _Hub, files: RepoFiles) -> None:
    """Refuse repos that cannot hold a loadable tower before touching any cache or weight."""
    if not _root_safetensors(files):
        pickles = sorted(f for f in files if "/" not in f and f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(
                f"{hub.where} holds only pickle weights ({', '.join(pickles)}); tp-siglip never unpickles a "
                f"checkpoint because loading a pickle can run arbitrary code. Convert it to safetensors "
                f"(e.g. save_pretrained(..., safe_serialization=True)) or use a repo that ships *.safetensors"
            )
        raise CheckpointError(f"{hub.where} has no *.safetensors weights (looked for model.safetensors and an index)")
    if CONFIG_FILE not in files:
        raise CheckpointError(f"{hub.where} has no config.json; expected a SigLIP (or VLM) checkpoint repo")


def _root_safetensors(files: RepoFiles) -> list[str]:
    return sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))


def _hub_error(hub: _Hub, err: BaseException, what: Optional[str] = None) -> BaseException:
    """huggingface_hub's error, same type, re-worded to name the repo and the revision."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(err, GatedRepoError):
        text = (
            f"{hub.where} is gated and this request was refused (HTTP {status}): accept its conditions on "
            f"{hub.endpoint}/{hub.repo_id}, then pass token=... (or set HF_TOKEN, or `hf auth login`) for an "
            f"account that was granted access"
        )
    elif isinstance(err, RepositoryNotFoundError):
        text = (
            f"{hub.where} was not found on {hub.endpoint} (HTTP {status}), and no local directory "
            f"{hub.repo_id!r} exists: check the repo id, or pass token=... if the repo is private"
        )
    elif isinstance(err, RevisionNotFoundError):
        text = f"{hub.where}: the repo exists but has no revision {hub.revision!r} (branch, tag or commit sha)"
    elif isinstance(err, RemoteEntryNotFoundError):
        text = f"{hub.where}: file {what!r} was not found"
    elif status in (401, 403):
        text = f"{hub.where}: access refused (HTTP {status}); pass token=... with read access to this repo"
    else:
        text = f"{hub.where}: request {('for ' + repr(what)) if what else 'to ' + hub.endpoint} failed"
    text += f"\n[huggingface_hub: {str(err).strip()}]"
    if isinstance(err, HfHubHTTPError) and response is not None:
        try:
            new = type(err)(text, response=response, server_message=err.server_message)
        except Exception:  # a subclass with another constructor: keep the original
            return err
        for attr in ("repo_id", "repo_type"):
            if hasattr(err, attr):
                setattr(new, attr, getattr(err, attr))
        return new
    return TransferError(text)


# ----------------------------------------------------------------------------- the caches


def _cached_checkpoint(hub: _Hub, sha: str, prefix: Optional[str], files: Optional[RepoFiles]) -> Optional[Path]:
    """tp-siglip's tower for ``sha``, else a complete-enough Hugging Face snapshot, else None."""
    found = _own_cached(hub, sha, prefix)
    kind = "tp-siglip's tower cache"
    if found is None:
        found = _hf_cached(hub, sha, prefix, files)
        kind = "the Hugging Face cache"
    if found is not None:
        logger.info("%s: using commit %s from %s at %s (no weights downloaded)", hub.where, sha, kind, found)
    return found


def _tower_dir_name(sha: str, prefix: str, auto_prefix: Optional[str]) -> str:
    if prefix == auto_prefix:
        return sha
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", prefix.rstrip(".")) or "root"
    return f"{sha}--{slug}"


def _own_cached(hub: _Hub, sha: str, prefix: Optional[str]) -> Optional[Path]:
    snapshots = hub.own_dir / "snapshots"
    candidates = [snapshots / sha]
    if prefix is not None:
        candidates.append(snapshots / _tower_dir_name(sha, prefix, None))
    for directory in candidates:
        manifest = _read_manifest(directory)
        if manifest is None or (prefix is not None and manifest.get("prefix") != prefix):
            continue
        weights = directory / SINGLE_FILE
        complete = (directory / CONFIG_FILE).is_file() and weights.is_file()
        if complete and weights.stat().st_size == manifest.get("file_size"):
            return directory
        logger.warning("%s: cached tower %s is damaged (size or files); fetching it again", hub.where, directory)
    return None


def _read_manifest(directory: Path) -> Optional[dict[str, Any]]:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _hf_cached(hub: _Hub, sha: str, prefix: Optional[str], files: Optional[RepoFiles]) -> Optional[Path]:
    """The Hugging Face cache's snapshot of ``sha`` when it has config.json and every file holding the tower."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> Optional[Path]:
        path = try_to_load_from_cache(hub.repo_id, name, cache_dir=hub.cache, revision=sha)
        return Path(path) if isinstance(path, str) else None

    config = cached(CONFIG_FILE)
    if config is None:
        return None
    snapshot = config.parent
    index = cached(INDEX_FILE)
    if index is not None:
        weight_map = parse_index(index.read_bytes(), f"{hub.where}: {INDEX_FILE}")
        chosen = tower_prefix(weight_map, prefix, hub.where)
        needed = {f for k, f in weight_map.items() if k.startswith(chosen)}
        return snapshot if all(cached(f) is not None for f in needed) else None
    if files is not None and INDEX_FILE in files:
        return None
    if cached(SINGLE_FILE) is not None:
        return snapshot
    if files is not None:
        shards = _root_safetensors(files)
        return snapshot if shards and all(cached(f) is not None for f in shards) else None
    return snapshot if any(snapshot.glob("*.safetensors")) else None


@contextlib.contextmanager
def _repo_lock(hub: _Hub) -> Iterator[None]:
    """Hold the per-repo file lock; log once if another process holds it (it is fetching)."""
    from filelock import FileLock, Timeout

    hub.lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(hub.lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("%s: another process is fetching it (lock %s); waiting for it", hub.where, hub.lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------- HTTP


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar in bytes, off when huggingface_hub's progress bars are (``HF_HUB_DISABLE_PROGRESS_BARS``)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    disabled = _env_flag("HF_HUB_DISABLE_PROGRESS_BARS")
    return hf_tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=bool(disabled), name=__name__
    )


class _Remote:
    """Requests for one repo at one commit, counting the bytes that come back."""

    def __init__(self, hub: _Hub, sha: str) -> None:
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers

        from tp_siglip import __version__

        self.hub = hub
        self.sha = sha
        self.headers = build_hf_headers(token=hub.token, library_name="tp-siglip", library_version=__version__)
        self.headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, never of a compressed body
        self.timeout = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
        self.weight_bytes = 0  # body bytes received from safetensors files (headers, tensors, gaps)
        self.requests = 0
        self.sizes: dict[str, int] = {}  # file sizes learnt from Content-Range / Content-Length

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.hub.repo_id, name, revision=self.sha, endpoint=self.hub.endpoint)

    def get(self, name: str) -> bytes:
        """A whole small file (config, index)."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import hf_raise_for_status, http_backoff

        self.requests += 1
        try:
            response = http_backoff(
                "GET",
                self.url(name),
                headers=self.headers,
                timeout=self.timeout,
                max_retries=RETRIES,
                base_wait_time=RETRY_WAIT,
            )
            hf_raise_for_status(response)
        except HfHubHTTPError as err:
            raise _hub_error(self.hub, err, name) from err
        except httpx2.TransportError as err:
            raise TransferError(f"{self.hub.where}: fetching {name} failed ({type(err).__name__}: {err})") from err
        return response.content

    def read(self, name: str, start: int, end: int, sink: Callable[[int, bytes], None], progress: Any = None) -> None:
        """Stream bytes ``[start, end)`` of ``name`` into ``sink(offset, data)``, in order.

        A dropped connection, a timeout or a 429/5xx answer is retried ``RETRIES`` times at most, each
        retry asking only for the bytes still missing. A server that ignores ``Range`` (200) is read
        from the start with the leading bytes dropped.
        """
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import get_session, hf_raise_for_status

        url = self.url(name)
        pos, failures = start, 0
        while pos < end:
            before = pos
            problem: Optional[BaseException] = None
            try:
                self.requests += 1
                headers = {**self.headers, "Range": f"bytes={pos}-{end - 1}"}
                with get_session().stream("GET", url, headers=headers, timeout=self.timeout) as response:
                    status = response.status_code
                    if status in RETRY_STATUS_CODES:
                        raise _RetryableStatus(f"HTTP {status}")
                    if status >= 400:
                        response.read()
                        hf_raise_for_status(response)
                    skip = self._check_response(response, name, pos, end)
                    for chunk in response.iter_bytes():  # as received: a drop keeps what arrived
                        self.weight_bytes += len(chunk)
                        if skip:
                            dropped = min(skip, len(chunk))
                            chunk, skip = chunk[dropped:], skip - dropped
                        chunk = chunk[: end - pos]
                        if chunk:
                            sink(pos, chunk)
                            pos += len(chunk)
                            if progress is not None:
                                progress.update(len(chunk))
                        if pos >= end:
                            break
            except HfHubHTTPError as err:
                raise _hub_error(self.hub, err, name) from err
            except (httpx2.TransportError, _RetryableStatus) as err:
                problem = err
            if pos > before and problem is None:
                continue
            failures += 1
            if failures > RETRIES:
                raise TransferError(
                    f"{self.hub.where}: fetching bytes {start}-{end - 1} of {name} failed after {failures} attempts "
                    f"({type(problem).__name__ if problem else 'no data'}: {problem}); nothing was saved"
                ) from problem
            wait = min(RETRY_MAX_WAIT, RETRY_WAIT * 2 ** (failures - 1))
            logger.warning(
                "%s: reading %s stopped at byte %d of %d-%d (%s); retrying in %.1fs [%d/%d]",
                self.hub.where, name, pos, start, end - 1, problem or "no data", wait, failures, RETRIES,
            )
            time.sleep(wait)

    def _check_response(self, response: httpx2.Response, name: str, pos: int, end: int) -> int:
        """Check a ranged answer; returns how many leading body bytes to drop."""
        if response.status_code == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", "").strip())
            if match is None:
                raise TransferError(f"{self.hub.where}: {name}: 206 answer without a valid Content-Range")
            first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
            if first != pos or last < first or last >= end:
                raise TransferError(
                    f"{self.hub.where}: {name}: asked for bytes {pos}-{end - 1}, the server sent {first}-{last}"
                )
            if total != "*":
                self.sizes[name] = int(total)
            return 0
        if response.status_code == 200:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit():
                self.sizes[name] = int(length)
            logger.warning("%s: the server ignored Range for %s; reading it from the start", self.hub.where, name)
            return pos
        raise TransferError(f"{self.hub.where}: {name}: unexpected HTTP {response.status_code} to a ranged request")

    def read_bytes(self, name: str, start: int, end: int) -> bytes:
        buffer = bytearray(end - start)

        def sink(offset: int, data: bytes) -> None:
            buffer[offset - start : offset - start + len(data)] = data

        self.read(name, start, end, sink)
        return bytes(buffer)

    def header(self, name: str, size_hint: Optional[int]) -> dict[str, TensorInfo]:
        """A remote safetensors file's tensors (absolute offsets): two ranged requests."""
        source = f"{self.hub.where}: {name}"
        first8 = self.read_bytes(name, 0, 8)
        size = self.sizes.get(name, size_hint)
        if size is None:
            raise TransferError(f"{source}: the server did not tell the file's size")
        self.sizes[name] = size
        length = header_length(first8, size, source)
        infos = parse_header(self.read_bytes(name, 8, 8 + length), size, source)
        return {key: dataclasses.replace(info, file=name) for key, info in infos.items()}


# ----------------------------------------------------------------------------- download="tower"


@dataclass
class _Run:
    """One ranged request: bytes ``[start, end)`` of ``file``; ``pieces`` = (src start, src end, dst offset)."""

    file: str
    start: int
    end: int
    pieces: list[tuple[int, int, int]] = field(default_factory=list)


class _RunWriter:
    """Sink for one run: writes each received byte of a tower tensor at its place in the new file, drops gap bytes."""

    def __init__(self, fh: Any, data_start: int, pieces: list[tuple[int, int, int]]) -> None:
        self.fh, self.data_start, self.pieces, self.next = fh, data_start, pieces, 0

    def __call__(self, src: int, data: bytes) -> None:
        end = src + len(data)
        while self.next < len(self.pieces) and self.pieces[self.next][1] <= src:
            self.next += 1  # bytes arrive in order: pieces wholly before them are done
        for lo, hi, dst in self.pieces[self.next :]:
            if lo >= end:
                break
            a, b = max(lo, src), min(hi, end)
            if a < b:
                self.fh.seek(self.data_start + dst + (a - lo))
                self.fh.write(data[a - src : b - src])


def _plan_runs(order: list[TensorInfo], destination: dict[str, int], max_gap: int) -> list[_Run]:
    """Group the tower's tensors (file order, then offset) into few requests, bridging gaps <= max_gap."""
    runs: list[_Run] = []
    for info in order:
        if info.nbytes == 0:
            continue
        last = runs[-1] if runs else None
        if last is not None and last.file == info.file and 0 <= info.start - last.end <= max_gap:
            last.end = info.end
        else:
            last = _Run(info.file, info.start, info.end)
            runs.append(last)
        last.pieces.append((info.start, info.end, destination[info.name]))
    return runs


def _remote_headers(
    hub: _Hub, remote: _Remote, files: RepoFiles, prefix: Optional[str]
) -> tuple[str, Optional[str], dict[str, dict[str, TensorInfo]]]:
    """Pick the files holding the tower and read their headers.

    Returns the tower's prefix, the prefix auto-detection picks (None where it fails) and the headers by file.
    """
    if INDEX_FILE in files:
        weight_map = parse_index(remote.get(INDEX_FILE), f"{hub.where}: {INDEX_FILE}")
        chosen = tower_prefix(weight_map, prefix, hub.where)
        names = sorted({f for k, f in weight_map.items() if k.startswith(chosen)})
        auto = _auto_prefix(weight_map, hub)
    elif SINGLE_FILE in files:
        names, weight_map, chosen, auto = [SINGLE_FILE], None, prefix, None
    else:
        names, weight_map, chosen, auto = _root_safetensors(files), None, prefix, None
    headers = {name: remote.header(name, files.get(name)) for name in names}
    seen: dict[str, str] = {}
    for name, infos in headers.items():
        for key in infos:
            if key in seen:
                raise CheckpointError(f"{hub.where}: tensor {key!r} appears in both {seen[key]} and {name}")
            seen[key] = name
    if weight_map is not None:
        for key, name in weight_map.items():
            if key.startswith(chosen or "") and seen.get(key) != name:
                raise CheckpointError(
                    f"{hub.where}: {INDEX_FILE} puts {key!r} in {name}, but that file's header has no such tensor"
                )
    else:
        auto = find_prefix(seen, hub.where) if prefix is None else _auto_prefix(seen, hub)
        chosen = tower_prefix(seen, auto if prefix is None else prefix, hub.where)
    assert chosen is not None
    return chosen, auto, headers


def _auto_prefix(names: Any, hub: _Hub) -> Optional[str]:
    """The prefix auto-detection would pick, or None where it would fail (no tower, several towers)."""
    try:
        return find_prefix(names, hub.where)
    except CheckpointError:
        return None


def _fetch_tower(hub: _Hub, sha: str, prefix: Optional[str], files: RepoFiles) -> Path:
    """Fetch config.json and the tower's byte ranges; save them as a checked vision-only checkpoint."""
    from safetensors import safe_open

    remote = _Remote(hub, sha)
    config = remote.get(CONFIG_FILE)
    try:
        json.loads(config)
    except ValueError as err:
        raise CheckpointError(f"{hub.where}: config.json is not valid JSON ({err})") from None
    chosen, auto, headers = _remote_headers(hub, remote, files, prefix)
    file_order = {name: i for i, name in enumerate(headers)}
    order = sorted(
        (info for infos in headers.values() for key, info in infos.items() if key.startswith(chosen)),
        key=lambda info: (file_order[info.file], info.start),
    )
    tower_bytes = sum(info.nbytes for info in order)
    destination, entries, offset = {}, {}, 0
    for info in order:
        destination[info.name] = offset
        span = [offset, offset + info.nbytes]
        entries[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": span}
        offset += info.nbytes
    metadata = {"format": "pt", "source": f"{hub.endpoint}/{hub.repo_id}", "commit": sha, "prefix": chosen}
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    runs = _plan_runs(order, destination, min(MAX_GAP_BYTES, tower_bytes // 64))
    total_run_bytes = sum(run.end - run.start for run in runs)

    snapshots = hub.own_dir / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    for stale in snapshots.glob(".tmp-*"):  # we hold the repo lock: these belong to a process that died
        shutil.rmtree(stale, ignore_errors=True)
    final = snapshots / _tower_dir_name(sha, chosen, auto)
    tmp = snapshots / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_bytes(config)
        weights = tmp / SINGLE_FILE
        with open(weights, "wb") as fh, _progress(total_run_bytes, f"{hub.repo_id} vision tower") as bar:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            fh.truncate(data_start + tower_bytes)
            for run in runs:
                remote.read(run.file, run.start, run.end, _RunWriter(fh, data_start, run.pieces), bar)
            fh.flush()
            os.fsync(fh.fileno())
        _verify_tower(hub, weights, data_start + tower_bytes, order)
        with safe_open(str(weights), framework="pt") as check:
            if set(check.keys()) != set(entries):
                raise CheckpointError(f"{hub.where}: safetensors reads other tensors from {weights} than were written")
        repo_bytes = sum(
            size if size is not None else remote.sizes.get(name, 0)
            for name, size in files.items()
            if name.endswith(".safetensors")
        )
        manifest = {
            "repo_id": hub.repo_id,
            "revision": hub.revision,
            "commit": sha,
            "endpoint": hub.endpoint,
            "prefix": chosen,
            "source_files": {name: remote.sizes.get(name) for name in headers},
            "tensors": len(order),
            "tower_bytes": tower_bytes,
            "file_size": data_start + tower_bytes,
            "fetched_bytes": remote.weight_bytes,
            "requests": remote.requests,
            "repo_safetensors_bytes": repo_bytes,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if final.exists():  # a damaged copy (see _own_cached): move it out of the way first
            old = snapshots / f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share = 100.0 * remote.weight_bytes / repo_bytes if repo_bytes else float("nan")
    logger.info(
        "%s: fetched %s of safetensors bytes (vision tower: %d tensors, %s, prefix %r; %d requests) out of %s in the "
        "repo's safetensors (%.2f%%); saved to %s",
        hub.where, _human(remote.weight_bytes), len(order), _human(tower_bytes), chosen, remote.requests,
        _human(repo_bytes), share, final,
    )
    return final


def _verify_tower(hub: _Hub, path: Path, expected_size: int, order: list[TensorInfo]) -> None:
    """The written file has the planned size, and its header (checked by the loader) matches the plan."""
    size = path.stat().st_size
    if size != expected_size:
        raise CheckpointError(f"{hub.where}: wrote {size} bytes to {path}, expected {expected_size}")
    written = read_header(path)
    if set(written) != {info.name for info in order}:
        raise CheckpointError(f"{hub.where}: the header written to {path} lists other tensors than planned")
    for info in order:
        got = written[info.name]
        if (got.dtype, got.shape, got.nbytes) != (info.dtype, info.shape, info.nbytes):
            raise CheckpointError(f"{hub.where}: tensor {info.name!r} was written as {got.dtype}{list(got.shape)}")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------- download="files"


def _download_files(hub: _Hub, sha: str, prefix: Optional[str], files: RepoFiles) -> Path:
    """hf_hub_download config.json, the index and the safetensors files holding the tower (plain HF cache)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from tp_siglip import __version__

    def fetch(name: str) -> Path:
        try:
            path = hf_hub_download(
                hub.repo_id,
                name,
                revision=sha,
                cache_dir=hub.cache,
                token=hub.token,
                endpoint=hub.endpoint,
                library_name="tp-siglip",
                library_version=__version__,
            )
        except HfHubHTTPError as err:
            raise _hub_error(hub, err, name) from err
        except LocalEntryNotFoundError as err:
            raise TransferError(f"{hub.where}: downloading {name} failed: {err}") from err
        return Path(path)

    config = fetch(CONFIG_FILE)
    if INDEX_FILE in files:
        weight_map = parse_index(fetch(INDEX_FILE).read_bytes(), f"{hub.where}: {INDEX_FILE}")
        chosen = tower_prefix(weight_map, prefix, hub.where)
        needed = sorted({f for k, f in weight_map.items() if k.startswith(chosen)})
    elif SINGLE_FILE in files:
        needed = [SINGLE_FILE]
    else:
        needed = _root_safetensors(files)
    missing = [n for n in needed if not isinstance(try_to_load_from_cache(hub.repo_id, n, hub.cache, sha), str)]
    for name in needed:
        fetch(name)
    fetched = sum(files.get(n) or os.path.getsize(config.parent / n) for n in missing)
    repo_bytes = sum(size or 0 for name, size in files.items() if name.endswith(".safetensors"))
    share = 100.0 * fetched / repo_bytes if repo_bytes else float("nan")
    logger.info(
        "%s: downloaded %d whole safetensors files, %s out of %s in the repo's safetensors (%.2f%%), into %s",
        hub.where, len(missing), _human(fetched), _human(repo_bytes), share, config.parent,
    )
    return config.parent
