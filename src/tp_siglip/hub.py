"""Turning a Hub repo id (or a directory) into a local directory holding config.json and the vision tower.

`resolve_checkpoint` is what ``SiglipVisionTransformer.from_pretrained`` calls first. An existing path goes
through `loader.local_checkpoint_dir` unchanged. A Hub repo id is resolved with huggingface_hub's public,
version-stable API (0.3x, as transformers 4.x installs it, through 2.x), in this order:

1. *Revision -> commit sha and file list*: ``HfApi.model_info(files_metadata=True)``, one API call.
   Offline (``HF_HUB_OFFLINE=1``, ``local_files_only=True``), or when the endpoint cannot be reached, the
   sha comes from the ``refs/`` files of the caches instead.
2. *Reuse what is on disk*, with no weight traffic: tp-siglip's tower cache, then the plain Hugging Face
   cache (``try_to_load_from_cache``: a snapshot with config.json and every safetensors file holding the tower).
3. *Fetch* on a miss: ``download="tower"`` (default) fetches only the tower's byte ranges
   (`tower_cache.fetch_tower`) into ``<hub cache>/tp-siglip/models--{org}--{name}/snapshots/{sha}/``
   (``refs/{revision}`` beside it for offline loads; ``snapshots/{sha}--{prefix}`` for an explicit
   ``prefix=`` naming another tower); ``download="files"`` downloads config, index and the whole shards
   holding the tower into the plain Hugging Face cache with ``hf_hub_download``.

Choices made:

* **One download per node.** A process that must fetch takes a per-repo file lock (``filelock``: an
  ``flock`` the OS releases if its holder dies) under ``<hub cache>/tp-siglip/.locks``, then looks at the
  caches again: of several ranks on a node one fetches, the others wait and read the same files. No
  process group is needed.
* **Errors name the repo and the revision** and keep huggingface_hub's types (``RepositoryNotFoundError``,
  ``RevisionNotFoundError``, ``GatedRepoError``, ``HfHubHTTPError``, ``LocalEntryNotFoundError``);
  `loader.CheckpointError` for repos without safetensors (pickles are refused, never opened) or without
  a SigLIP tower; `TransferError` when bytes cannot be fetched (nothing is left behind).
* Settings are read at call time: ``HF_ENDPOINT``, ``HF_HUB_CACHE`` (or ``HUGGINGFACE_HUB_CACHE``,
  ``HF_HOME``), ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), ``HF_HUB_DISABLE_PROGRESS_BARS``, falling
  back to huggingface_hub's import-time values; the token as huggingface_hub finds it unless ``token=``.
* Cache hits are used whatever ``download`` says. ``hf cache scan`` lists ``tp-siglip`` among its warnings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from tp_siglip.loader import PICKLE_SUFFIXES, CheckpointError, local_checkpoint_dir, parse_index, tower_prefix
from tp_siglip.tower_cache import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, RepoFiles, Remote, TransferError
from tp_siglip.tower_cache import fetch_tower, find_cached_tower, root_safetensors

__all__ = ["DOWNLOAD_MODES", "TransferError", "resolve_checkpoint"]

logger = logging.getLogger(__name__)

DOWNLOAD_MODES = ("tower", "files")
#: answers to the revision lookup that mean "the Hub is not reachable now": fall back to the caches
UNREACHABLE_STATUS = (408, 429, 500, 502, 503, 504)
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
PathArg = Union[str, "os.PathLike[str]"]


def resolve_checkpoint(
    repo_or_dir: PathArg,
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[PathArg] = None,
    token: Optional[Union[str, bool]] = None,
    local_files_only: bool = False,
    download: str = "tower",
    prefix: Optional[str] = None,
) -> Path:
    """A local directory holding ``config.json`` and safetensors with (at least) the vision tower.

    Args:
        repo_or_dir: an existing checkpoint directory, or a Hub repo id (``"org/name"``).
        revision: branch, tag or commit sha (default ``"main"``).
        cache_dir: the hub cache (default: ``HF_HUB_CACHE``, else ``HF_HOME/hub``).
        token: as in huggingface_hub: a token, ``True`` (the saved one), ``False`` (none) or ``None``.
        local_files_only: never touch the network; load from the caches or fail.
        download: how a cache miss is filled: ``"tower"`` (byte ranges of the tower) or ``"files"``.
        prefix: the tower's key prefix, or ``None`` to detect it (see `loader.find_prefix`).

    Raises:
        ValueError, TypeError: bad arguments. FileNotFoundError: neither a path nor a valid repo id.
        huggingface_hub.errors.*, CheckpointError, TransferError: see the module docstring.
    """
    if download not in DOWNLOAD_MODES:
        raise ValueError(
            f"download={download!r} is not valid; expected 'tower' (fetch only the vision tower's byte "
            f"ranges) or 'files' (download whole safetensors files into the Hugging Face cache)"
        )
    if isinstance(repo_or_dir, os.PathLike) or (isinstance(repo_or_dir, str) and repo_or_dir and os.path.exists(repo_or_dir)):
        return local_checkpoint_dir(repo_or_dir)
    if not isinstance(repo_or_dir, str):
        raise TypeError(f"repo_or_dir must be a path or a repo id string, got {type(repo_or_dir).__name__}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_or_dir)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{repo_or_dir!r}: no such checkpoint directory exists, and it is not a valid Hub repo id "
            f"({str(err).strip().splitlines()[0]}). Pass a directory holding config.json and *.safetensors, "
            f"or a repo id such as 'google/siglip-so400m-patch14-384'"
        ) from None
    for name, value in (("revision", revision), ("prefix", prefix)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {type(value).__name__}")
    return _resolve(_Hub.create(repo_or_dir, revision, cache_dir, token, local_files_only), prefix, download)


# ----------------------------------------------------------------------------- settings


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name, "").strip()
    return value.upper() in {"1", "ON", "YES", "TRUE"} if value else None


def _offline_reason() -> Optional[str]:
    """Why offline mode is on, or None: the first of HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE set decides."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        flag = _env_flag(name)
        if flag is not None:
            return f"offline mode is on ({name}={os.environ[name].strip()})" if flag else None
    return "offline mode is on (HF_HUB_OFFLINE, as read when huggingface_hub was imported)" if constants.HF_HUB_OFFLINE else None


@dataclass(frozen=True)
class _Hub:
    """Where and how to reach one repo: the settings every step shares."""

    repo_id: str
    revision: str
    endpoint: str
    cache: Path
    token: Optional[Union[str, bool]]
    offline: Optional[str]  # why the network may not be used, or None

    @classmethod
    def create(cls, repo_id: str, revision: Optional[str], cache_dir: Optional[PathArg], token: Any, local_only: bool) -> "_Hub":
        from huggingface_hub import constants

        env = os.environ
        chosen = (
            os.fspath(cache_dir) if cache_dir is not None
            else env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
            or (os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else constants.HF_HUB_CACHE)
        )
        offline = "local_files_only=True" if local_only else _offline_reason()
        endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        cache = Path(os.path.expandvars(os.path.expanduser(chosen))).resolve()
        return cls(repo_id, revision or "main", endpoint, cache, token, offline)

    @property
    def where(self) -> str:
        return f"Hub repo {self.repo_id!r} at revision {self.revision!r}"

    @property
    def folder(self) -> str:
        return "models--" + self.repo_id.replace("/", "--")

    @property
    def own_dir(self) -> Path:
        return self.cache / "tp-siglip" / self.folder


# ----------------------------------------------------------------------------- resolution


def _resolve(hub: _Hub, prefix: Optional[str], download: str) -> Path:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    from tp_siglip import __version__

    if hub.offline is not None:
        return _resolve_offline(hub, prefix, None)
    api = HfApi(endpoint=hub.endpoint, library_name="tp-siglip", library_version=__version__)
    try:
        info = api.model_info(
            hub.repo_id, revision=hub.revision, files_metadata=True, token=hub.token, timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except HfHubHTTPError as err:
        if _status(err) not in UNREACHABLE_STATUS:
            raise _reword(hub, err)
        return _resolve_offline(hub, prefix, err)
    except Exception as err:  # connection errors: their types belong to the HTTP library of each huggingface_hub
        return _resolve_offline(hub, prefix, err)
    if not info.sha or not _SHA_RE.match(info.sha):
        raise CheckpointError(f"{hub.where}: {hub.endpoint} returned no valid commit sha ({info.sha!r})")
    sha, files = info.sha, {s.rfilename: s.size for s in info.siblings or []}
    _check_repo_files(hub, files)
    found = _cached(hub, sha, prefix, files)
    if found is None:
        with _repo_lock(hub):
            found = _cached(hub, sha, prefix, files)  # another process may have fetched it meanwhile
            if found is None:
                try:
                    found = (_download_files if download == "files" else _fetch_tower)(hub, sha, prefix, files)
                except HfHubHTTPError as err:
                    raise _reword(hub, err)
    _write_ref(hub, sha)
    return found


def _fetch_tower(hub: _Hub, sha: str, prefix: Optional[str], files: RepoFiles) -> Path:
    remote = Remote(hub.repo_id, sha, hub.endpoint, hub.token, files, hub.where)
    meta = {"revision": hub.revision, "endpoint": hub.endpoint}
    return fetch_tower(remote, hub.own_dir / "snapshots", files, prefix, meta)


def _resolve_offline(hub: _Hub, prefix: Optional[str], cause: Optional[BaseException]) -> Path:
    from huggingface_hub.errors import LocalEntryNotFoundError

    if cause is not None:
        logger.warning("%s: %s could not be reached (%s); looking in the local caches", hub.where, hub.endpoint, cause)
    for sha in _cached_shas(hub):
        found = _cached(hub, sha, prefix, None)
        if found is not None:
            return found
    reason = hub.offline if cause is None else f"{hub.endpoint} could not be reached ({type(cause).__name__}: {cause})"
    raise LocalEntryNotFoundError(
        f"{hub.where}: {reason}, and no cached copy of its vision tower was found (looked in {hub.own_dir} and "
        f"{hub.cache / hub.folder}). Load it once with network access first"
        + ("" if cause is not None else ", or unset HF_HUB_OFFLINE / pass local_files_only=False")
    ) from cause


def _ref_path(refs: Path, revision: str) -> Optional[Path]:
    """``refs/<revision>`` (nested for ``refs/pr/1``), or None for a revision that is not a safe path."""
    parts = revision.split("/")
    return None if "\\" in revision or any(p in ("", ".", "..") for p in parts) else refs.joinpath(*parts)


def _cached_shas(hub: _Hub) -> list[str]:
    """Commit shas the revision may stand for: itself, else tp-siglip's refs, then the Hugging Face cache's."""
    if _SHA_RE.match(hub.revision):
        return [hub.revision]
    shas: list[str] = []
    for refs in (hub.own_dir / "refs", hub.cache / hub.folder / "refs"):
        path = _ref_path(refs, hub.revision)
        sha = path.read_text(encoding="utf-8").strip() if path is not None and path.is_file() else ""
        if _SHA_RE.match(sha) and sha not in shas:
            shas.append(sha)
    return shas


def _write_ref(hub: _Hub, sha: str) -> None:
    """Remember revision -> sha for offline loads (best effort: a read-only cache still loads)."""
    path = _ref_path(hub.own_dir / "refs", hub.revision)
    if hub.revision == sha or path is None:
        return
    try:
        if not (path.is_file() and path.read_text(encoding="utf-8").strip() == sha):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(sha, encoding="utf-8")
            os.replace(tmp, path)
    except OSError as err:
        logger.warning("%s: could not record the commit sha in %s (%s)", hub.where, path, err)


def _check_repo_files(hub: _Hub, files: RepoFiles) -> None:
    """Refuse repos that cannot hold a loadable tower before touching any cache or weight."""
    if not root_safetensors(files):
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


def _status(err: BaseException) -> Optional[int]:
    return getattr(getattr(err, "response", None), "status_code", None)


def _reword(hub: _Hub, err: Any) -> Any:
    """huggingface_hub's error, same object and type, its message now naming the repo and the revision."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    status = _status(err)
    if isinstance(err, GatedRepoError):
        text = (
            f"{hub.where} is gated and this request was refused (HTTP {status}): accept its conditions on "
            f"{hub.endpoint}/{hub.repo_id}, then pass token=... (or set HF_TOKEN, or `hf auth login`) for an "
            f"account that was granted access"
        )
    elif isinstance(err, RepositoryNotFoundError):
        text = (
            f"{hub.where} was not found on {hub.endpoint} (HTTP {status}), and no local directory {hub.repo_id!r} "
            f"exists: check the repo id, or pass token=... if the repo is private"
        )
    elif isinstance(err, RevisionNotFoundError):
        text = f"{hub.where}: the repo exists but has no revision {hub.revision!r} (branch, tag or commit sha)"
    elif status in (401, 403):
        text = f"{hub.where}: access refused (HTTP {status}); pass token=... with read access to this repo"
    else:
        text = f"{hub.where}: a request to {hub.endpoint} failed (HTTP {status})"
    err.args = (f"{text}\n[huggingface_hub: {str(err).strip()}]", *err.args[1:])
    return err


# ----------------------------------------------------------------------------- the caches


def _cached(hub: _Hub, sha: str, prefix: Optional[str], files: Optional[RepoFiles]) -> Optional[Path]:
    """tp-siglip's tower for ``sha``, else a complete-enough Hugging Face snapshot, else None."""
    found, kind = find_cached_tower(hub.own_dir / "snapshots", sha, prefix, hub.where), "tp-siglip's tower cache"
    if found is None:
        found, kind = _hf_cached(hub, sha, prefix, files), "the Hugging Face cache"
    if found is not None:
        logger.info("%s: using commit %s from %s at %s (no weights downloaded)", hub.where, sha, kind, found)
    return found


def _hf_cached(hub: _Hub, sha: str, prefix: Optional[str], files: Optional[RepoFiles]) -> Optional[Path]:
    """The Hugging Face cache's snapshot of ``sha`` when it has config.json and every file holding the tower."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> Optional[Path]:
        path = try_to_load_from_cache(hub.repo_id, name, cache_dir=hub.cache, revision=sha)
        return Path(path) if isinstance(path, str) else None

    config = cached(CONFIG_FILE)
    if config is None:
        return None
    index = cached(INDEX_FILE)
    if index is not None:
        weight_map = parse_index(index.read_bytes(), f"{hub.where}: {INDEX_FILE}")
        needed = {f for k, f in weight_map.items() if k.startswith(tower_prefix(weight_map, prefix, hub.where))}
    elif files is None:  # offline: whatever safetensors the snapshot has
        return config.parent if cached(SINGLE_FILE) or any(config.parent.glob("*.safetensors")) else None
    elif INDEX_FILE in files:
        return None
    else:
        needed = {SINGLE_FILE} if SINGLE_FILE in files else set(root_safetensors(files))
    return config.parent if needed and all(cached(f) is not None for f in needed) else None


@contextlib.contextmanager
def _repo_lock(hub: _Hub) -> Iterator[None]:
    """Hold the per-repo file lock; log once when another process holds it (it is fetching)."""
    from filelock import FileLock, Timeout

    path = hub.cache / "tp-siglip" / ".locks" / f"{hub.folder}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("%s: another process is fetching it (lock %s); waiting for it", hub.where, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _download_files(hub: _Hub, sha: str, prefix: Optional[str], files: RepoFiles) -> Path:
    """hf_hub_download config.json, the index and the safetensors files holding the tower (plain HF cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from tp_siglip import __version__

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(
                hub.repo_id, name, revision=sha, cache_dir=hub.cache, token=hub.token, endpoint=hub.endpoint,
                library_name="tp-siglip", library_version=__version__,
            ))
        except LocalEntryNotFoundError as err:  # huggingface_hub's word for "the download failed"
            raise TransferError(f"{hub.where}: downloading {name} failed: {err}") from err

    config = fetch(CONFIG_FILE)
    if INDEX_FILE in files:
        weight_map = parse_index(fetch(INDEX_FILE).read_bytes(), f"{hub.where}: {INDEX_FILE}")
        chosen = tower_prefix(weight_map, prefix, hub.where)
        needed = sorted({f for k, f in weight_map.items() if k.startswith(chosen)})
    else:
        needed = [SINGLE_FILE] if SINGLE_FILE in files else root_safetensors(files)
    for name in needed:
        fetch(name)
    logger.info("%s: %d whole safetensors files holding the tower are in %s", hub.where, len(needed), config.parent)
    return config.parent
