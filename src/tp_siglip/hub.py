"""Turning a Hub repo id (or a directory) into a local directory with config.json and the vision tower.

`resolve_checkpoint` is what ``from_pretrained`` calls first. A path goes to `loader.local_checkpoint_dir`.
A repo id goes through huggingface_hub's public API only (the same from 0.3x, as transformers 4.x pins it,
to 2.x): ``HfApi.model_info`` resolves the revision to a commit sha (offline, or with the endpoint
unreachable, the caches' ``refs/`` do); the tower is reused, with no weight traffic, from tp-siglip's
tower cache or the plain Hugging Face cache (``try_to_load_from_cache``); on a miss ``download="tower"``
fetches only its byte ranges (`tower_cache`) into ``<hub cache>/tp-siglip/models--{org}--{name}/
snapshots/{sha}/`` (``refs/{revision}`` beside it), ``download="files"`` the whole files holding it into
the plain cache (``hf_hub_download``). One download per node: a process that must fetch takes a per-repo
``filelock`` (an flock, released by the OS if its holder dies), then looks at the caches again. Errors
keep huggingface_hub's types and name repo and revision. ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME``,
``HF_HUB_OFFLINE`` (and their legacy names) are read at call time.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from tp_siglip.loader import PICKLE_SUFFIXES, CheckpointError, local_checkpoint_dir, parse_index
from tp_siglip.tower_cache import CONFIG_FILE, INDEX_FILE, RepoFiles, Remote, TransferError, env_flag
from tp_siglip.tower_cache import fetch_tower, find_cached_tower, root_safetensors, tower_files

__all__ = ["DOWNLOAD_MODES", "TransferError", "resolve_checkpoint"]

logger = logging.getLogger(__name__)

DOWNLOAD_MODES = ("tower", "files")
#: answers to the revision lookup that mean "the Hub cannot serve us now": fall back to the caches
UNREACHABLE_STATUS = (408, 429, 500, 502, 503, 504)
_SHA = re.compile(r"^[0-9a-f]{40}$")
PathArg = Union[str, "os.PathLike[str]"]


def resolve_checkpoint(
    repo_or_dir: PathArg, *, revision: Optional[str] = None, cache_dir: Optional[PathArg] = None,
    token: Optional[Union[str, bool]] = None, local_files_only: bool = False, download: str = "tower",
    prefix: Optional[str] = None,
) -> Path:
    """A local directory holding ``config.json`` and safetensors with (at least) the vision tower.

    ``repo_or_dir``: an existing directory or a repo id (``"org/name"``); ``revision``: branch, tag or sha
    (default ``"main"``); ``cache_dir``: the hub cache; ``token`` as in huggingface_hub; ``download``: how
    a miss is filled (``"tower"`` or ``"files"``); ``prefix``: the tower's key prefix (None: detect it).
    Raises FileNotFoundError (neither a path nor a repo id), huggingface_hub's errors, CheckpointError (no
    safetensors, no tower) and TransferError (the bytes could not be fetched; nothing is left behind).
    """
    if download not in DOWNLOAD_MODES:
        raise ValueError(f"download={download!r} is not valid; expected 'tower' (fetch only the vision tower's "
                         f"byte ranges) or 'files' (download whole safetensors files into the Hugging Face cache)")
    if isinstance(repo_or_dir, os.PathLike) or (isinstance(repo_or_dir, str) and os.path.exists(repo_or_dir)):
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
    return _resolve(_Hub.create(repo_or_dir, revision or "main", cache_dir, token, local_files_only), prefix, download)


def hub_cache_dir(cache_dir: Optional[PathArg] = None) -> Path:
    """The Hugging Face hub cache: ``cache_dir``, else ``HF_HUB_CACHE`` (or the legacy name), else
    ``HF_HOME/hub``, else huggingface_hub's default; environment variables are read now, not at import."""
    from huggingface_hub import constants

    env = os.environ
    home = os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None
    cache = cache_dir or env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or home
    cache = cache or constants.HF_HUB_CACHE
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(cache)))).resolve()


@dataclass(frozen=True)
class _Hub:
    """Where and how to reach one repo, as read at call time: the settings every step shares."""

    repo_id: str
    revision: str
    endpoint: str
    cache: Path
    token: Optional[Union[str, bool]]
    offline: Optional[str]  # why the network may not be used, or None
    where: str  # "Hub repo 'org/name' at revision 'main'", for messages
    folder: str  # models--org--name
    own_dir: Path  # <hub cache>/tp-siglip/models--org--name

    @classmethod
    def create(cls, repo_id: str, revision: str, cache_dir: Any, token: Any, local_only: bool) -> "_Hub":
        from huggingface_hub import constants

        env = os.environ
        cache = hub_cache_dir(cache_dir)
        flags = [(n, env_flag(n)) for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if env_flag(n) is not None]
        offline = "local_files_only=True" if local_only else None
        if offline is None and (flags[0][1] if flags else constants.HF_HUB_OFFLINE):  # the first one set decides
            offline = f"offline mode is on ({flags[0][0] if flags else 'HF_HUB_OFFLINE'})"
        endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        folder = "models--" + repo_id.replace("/", "--")
        where = f"Hub repo {repo_id!r} at revision {revision!r}"
        return cls(repo_id, revision, endpoint, cache, token, offline, where, folder, cache / "tp-siglip" / folder)


def _resolve(hub: _Hub, prefix: Optional[str], download: str) -> Path:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    from tp_siglip import __version__

    if hub.offline is not None:
        return _from_caches(hub, prefix, None)
    api = HfApi(endpoint=hub.endpoint, library_name="tp-siglip", library_version=__version__)
    try:
        info = api.model_info(hub.repo_id, revision=hub.revision, files_metadata=True, token=hub.token,
                              timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError as err:
        if _status(err) not in UNREACHABLE_STATUS:
            raise _reword(hub, err)
        return _from_caches(hub, prefix, err)
    except Exception as err:  # connection errors: their types are those of each huggingface_hub's HTTP library
        return _from_caches(hub, prefix, err)
    if not info.sha or not _SHA.match(info.sha):
        raise CheckpointError(f"{hub.where}: {hub.endpoint} returned no valid commit sha ({info.sha!r})")
    files = {s.rfilename: s.size for s in info.siblings or []}
    _check_repo_files(hub, files)
    found = _cached(hub, info.sha, prefix, files) or _fetch_locked(hub, info.sha, prefix, files, download)
    path = _ref_path(hub.own_dir / "refs", hub.revision)  # remember revision -> sha for offline loads
    if path is not None and hub.revision != info.sha and not (path.is_file() and path.read_text() == info.sha):
        try:  # best effort: a read-only cache still loads
            path.parent.mkdir(parents=True, exist_ok=True)
            (tmp := path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")).write_text(info.sha)
            os.replace(tmp, path)
        except OSError as err:
            logger.warning("%s: could not record the commit sha in %s (%s)", hub.where, path, err)
    return found


def _fetch_locked(hub: _Hub, sha: str, prefix: Optional[str], files: RepoFiles, download: str) -> Path:
    """Under the repo's file lock, look at the caches again (another process may have filled them), else fetch."""
    from filelock import FileLock, Timeout
    from huggingface_hub.errors import HfHubHTTPError

    lock = FileLock(str(hub.cache / "tp-siglip" / ".locks" / f"{hub.folder}.lock"))
    Path(lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("%s: another process is fetching it (lock %s); waiting for it", hub.where, lock.lock_file)
        lock.acquire()
    try:
        found = _cached(hub, sha, prefix, files)
        if found is None and download == "files":
            found = _download_files(hub, sha, prefix, files)
        elif found is None:
            remote = Remote(hub.repo_id, sha, hub.endpoint, hub.token, files, hub.where)
            meta = {"revision": hub.revision, "endpoint": hub.endpoint}
            found = fetch_tower(remote, hub.own_dir / "snapshots", files, prefix, meta)
        return found
    except HfHubHTTPError as err:
        raise _reword(hub, err)
    finally:
        lock.release()


def _from_caches(hub: _Hub, prefix: Optional[str], cause: Optional[BaseException]) -> Path:
    """The cached tower of the revision's sha (itself, or read from the caches' refs), or LocalEntryNotFoundError."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if cause is not None:
        logger.warning("%s: %s could not be reached (%s); looking in the local caches", hub.where, hub.endpoint, cause)
    shas = [hub.revision]
    for refs in (hub.own_dir / "refs", hub.cache / hub.folder / "refs"):
        path = _ref_path(refs, hub.revision)
        shas.append(path.read_text(encoding="utf-8").strip() if path is not None and path.is_file() else "")
    for sha in dict.fromkeys(s for s in shas if _SHA.match(s)):
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


def _check_repo_files(hub: _Hub, files: RepoFiles) -> None:
    """Refuse repos that cannot hold a loadable tower before touching any cache or weight."""
    pickles = sorted(f for f in files if "/" not in f and f.endswith(PICKLE_SUFFIXES))
    if not root_safetensors(files) and pickles:
        raise CheckpointError(
            f"{hub.where} holds only pickle weights ({', '.join(pickles)}); tp-siglip never unpickles a "
            f"checkpoint because loading a pickle can run arbitrary code. Convert it to safetensors "
            f"(e.g. save_pretrained(..., safe_serialization=True)) or use a repo that ships *.safetensors"
        )
    if not root_safetensors(files):
        raise CheckpointError(f"{hub.where} has no *.safetensors weights (looked for model.safetensors and an index)")
    if CONFIG_FILE not in files:
        raise CheckpointError(f"{hub.where} has no config.json; expected a SigLIP (or VLM) checkpoint repo")


def _status(err: BaseException) -> Optional[int]:
    return getattr(getattr(err, "response", None), "status_code", None)


_HINTS = {  # by error type (the first one in its MRO): what went wrong and what to do
    "GatedRepoError": " is gated and this request was refused (HTTP {status}): accept its conditions on {endpoint}/"
    "{repo}, then pass token=... (or set HF_TOKEN, or `hf auth login`) for an account that was granted access",
    "RepositoryNotFoundError": " was not found on {endpoint} (HTTP {status}), and no local directory {repo!r} "
    "exists: check the repo id, or pass token=... if the repo is private",
    "RevisionNotFoundError": ": the repo exists but has no revision {revision!r} (branch, tag or commit sha)",
    "HfHubHTTPError": ": a request to {endpoint} failed (HTTP {status}); for 401/403 pass token=... with read access",
}


def _reword(hub: _Hub, err: Any) -> Any:
    """huggingface_hub's error, same object and type, its message now naming the repo and the revision."""
    hint = next(_HINTS[c.__name__] for c in type(err).__mro__ if c.__name__ in _HINTS)
    text = hint.format(status=_status(err), endpoint=hub.endpoint, repo=hub.repo_id, revision=hub.revision)
    err.args = (f"{hub.where}{text}\n[huggingface_hub: {str(err).strip()}]",)
    return err


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
    index = cached(INDEX_FILE) if config is not None else None
    if config is None or (index is None and files is not None and INDEX_FILE in files):
        return None
    if index is None and files is None:  # offline: whatever safetensors the snapshot has
        return config.parent if any(config.parent.glob("*.safetensors")) else None
    weight_map = parse_index(index.read_bytes(), f"{hub.where}: {INDEX_FILE}") if index is not None else None
    needed = tower_files(weight_map, files or {}, prefix, hub.where)
    return config.parent if needed and all(cached(f) is not None for f in needed) else None


def _download_files(hub: _Hub, sha: str, prefix: Optional[str], files: RepoFiles) -> Path:
    """hf_hub_download config.json, the index and the safetensors files holding the tower (plain HF cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from tp_siglip import __version__

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(hub.repo_id, name, revision=sha, cache_dir=hub.cache, token=hub.token,
                                        endpoint=hub.endpoint, library_name="tp-siglip", library_version=__version__))
        except LocalEntryNotFoundError as err:  # huggingface_hub's word for "the download failed"
            raise TransferError(f"{hub.where}: downloading {name} failed: {err}") from err

    config = fetch(CONFIG_FILE)
    index = fetch(INDEX_FILE) if INDEX_FILE in files else None
    weight_map = parse_index(index.read_bytes(), f"{hub.where}: {INDEX_FILE}") if index is not None else None
    needed = tower_files(weight_map, files, prefix, hub.where)
    for name in needed:
        fetch(name)
    logger.info("%s: the %d safetensors files holding the tower are in %s", hub.where, len(needed), config.parent)
    return config.parent
