"""Turning a Hub repo id (or a directory) into a local directory with config.json and the vision tower.

Only huggingface_hub's public API (0.36 to 2.x): ``HfApi.model_info`` resolves the revision to a commit sha
(offline or unreachable: the caches' ``refs/``); the tower is reused from tp-siglip's tower cache or the plain
Hugging Face cache, else ``download="tower"`` fetches only its byte ranges (`tower_cache`) into ``<hub cache>/
tp-siglip/models--{org}--{name}/snapshots/{sha}/``, ``download="files"`` the files holding it into the plain
cache. One download per node: the fetching process holds a per-repo ``filelock`` (released by the OS if it
dies) and looks at the caches again under it. Errors keep huggingface_hub's types and name repo and revision.
``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME`` and ``HF_HUB_OFFLINE`` are read at call time, not at import.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Union, cast

from tp_siglip import __version__
from tp_siglip.formats import OPEN_CLIP_CONFIG, config_file
from tp_siglip.loader import PICKLE_SUFFIXES, CheckpointError, local_checkpoint_dir, parse_index, pickle_refusal
from tp_siglip.tower_cache import (
    CONFIG_FILE,
    INDEX_FILE,
    PREPROCESSOR_FILE,
    Remote,
    RepoFiles,
    TransferError,
    env_flag,
    fetch_tower,
    find_cached_tower,
    root_safetensors,
    tower_files,
)

__all__ = ["DOWNLOAD_MODES", "TransferError", "hub_cache_dir", "offline_setting", "resolve_checkpoint"]

logger = logging.getLogger(__name__)

DOWNLOAD_MODES = ("tower", "files")
UNREACHABLE_STATUS = (408, 429, 500, 502, 503, 504)  # answers to model_info that send us to the caches
_SHA = re.compile(r"^[0-9a-f]{40}$")
PathArg = Union[str, "os.PathLike[str]"]


def resolve_checkpoint(repo_or_dir: PathArg, *, revision: Optional[str] = None, cache_dir: Optional[PathArg] = None,
                       token: Optional[Union[str, bool]] = None, local_files_only: bool = False, download: str = "tower",
                       prefix: Optional[str] = None) -> Path:
    """A local directory with ``config.json`` and safetensors holding (at least) the vision tower of
    ``repo_or_dir`` (a directory or ``"org/name"``); ``revision`` defaults to ``"main"``, ``prefix`` (the
    tower's key prefix) to the detected one. Raises FileNotFoundError (neither a path nor a repo id),
    huggingface_hub's errors, CheckpointError (no safetensors, no tower) and TransferError (fetch failed)."""
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
            f"or a repo id such as 'google/siglip-so400m-patch14-384'") from None
    for name, value in (("revision", revision), ("prefix", prefix)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {type(value).__name__}")
    return _resolve(_Hub(repo_or_dir, revision or "main", cache_dir, token, local_files_only), prefix, download)


def commit_of(directory: Optional[PathArg]) -> Optional[str]:
    """The Hub commit sha ``directory`` is a snapshot of (``.../snapshots/<sha>``, or ``<sha>--<prefix>``: tp-siglip's
    tower cache and huggingface_hub's lay them out so), or None for any other directory."""
    if directory is None:
        return None
    path = Path(directory)
    sha = path.name.partition("--")[0]
    return sha if path.parent.name == "snapshots" and _SHA.match(sha) else None


def hub_cache_dir(cache_dir: Optional[PathArg] = None) -> Path:
    """``cache_dir``, else ``HF_HUB_CACHE``, ``HF_HOME/hub`` or huggingface_hub's default (read now, not at import)."""
    from huggingface_hub import constants

    env = os.environ
    home = os.path.join(env["HF_HOME"], "hub") if env.get("HF_HOME") else None
    cache = cache_dir or env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or home or constants.HF_HUB_CACHE
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(cache)))).resolve()


def offline_setting() -> tuple[str, bool]:
    """``(variable, whether offline mode is on)``: HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE (the first one set
    decides, parsed as huggingface_hub parses them), else huggingface_hub's own setting."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if (flag := env_flag(name)) is not None:
            return name, flag
    return "HF_HUB_OFFLINE", bool(constants.HF_HUB_OFFLINE)


class _Hub:
    """One repo at one revision, with the settings (read at call time) that every step shares."""

    def __init__(self, repo_id: str, revision: str, cache_dir: Any, token: Any, local_only: bool) -> None:
        from huggingface_hub import constants

        name, offline = offline_setting()
        self.offline = "local_files_only=True" if local_only else f"offline mode is on ({name})" if offline else None
        self.repo_id, self.revision, self.token, self.cache = repo_id, revision, token, hub_cache_dir(cache_dir)
        self.endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.where = f"Hub repo {repo_id!r} at revision {revision!r}"  # for messages
        self.folder = "models--" + repo_id.replace("/", "--")
        self.own_dir = self.cache / "tp-siglip" / self.folder


def _resolve(hub: _Hub, prefix: Optional[str], download: str) -> Path:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if hub.offline is not None:
        return _from_caches(hub, prefix, None)
    api = HfApi(endpoint=hub.endpoint, library_name="tp-siglip", library_version=__version__)
    try:
        info = api.model_info(hub.repo_id, revision=hub.revision, files_metadata=True, token=hub.token,
                              timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # an HTTP error, or a connection error (typed by huggingface_hub's HTTP library)
        if isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) not in UNREACHABLE_STATUS:
            _reword(hub, err)
            raise
        return _from_caches(hub, prefix, err)
    if not info.sha or not _SHA.match(info.sha):
        raise CheckpointError(f"{hub.where}: {hub.endpoint} returned no valid commit sha ({info.sha!r})")
    files = {s.rfilename: s.size for s in info.siblings or []}
    weights, pickles = root_safetensors(files), sorted(f for f in files if "/" not in f and f.endswith(PICKLE_SUFFIXES))
    if not weights and pickles:
        raise pickle_refusal(hub.where, pickles)
    if not weights and any(f.endswith(".npz") for f in files):
        raise CheckpointError(f"{hub.where} holds big_vision .npz weights: they load from a local file, not by repo id; "
                              f"download the .npz (e.g. huggingface_hub.hf_hub_download) and pass its path")
    if not weights or config_file(files) not in files:
        missing = config_file(files) if weights else "*.safetensors weights (looked for model.safetensors and an index)"
        raise CheckpointError(f"{hub.where} has no {missing}; expected a SigLIP (or VLM) checkpoint repo")
    try:
        found = _cached(hub, info.sha, prefix, files) or _fetch_locked(hub, info.sha, prefix, files, download)
    except HfHubHTTPError as err:  # a ranged read or a download refused
        _reword(hub, err)
        raise
    path = _ref_path(hub.own_dir / "refs", hub.revision)  # remember revision -> sha for offline loads
    if path is not None and hub.revision != info.sha and not (path.is_file() and path.read_text() == info.sha):
        try:  # atomically; best effort: a read-only cache still loads
            path.parent.mkdir(parents=True, exist_ok=True)
            (tmp := path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")).write_text(info.sha)
            os.replace(tmp, path)
        except OSError as err:
            logger.warning("%s: could not record the commit sha in %s (%s)", hub.where, path, err)
    return found


def _fetch_locked(hub: _Hub, sha: str, prefix: Optional[str], files: RepoFiles, download: str) -> Path:
    """Under the repo's file lock, look at the caches again (another process may have filled them), else fetch."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(hub.cache / "tp-siglip" / ".locks" / f"{hub.folder}.lock"))
    Path(lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("%s: another process is fetching it (lock %s); waiting for it", hub.where, lock.lock_file)
        lock.acquire()
    try:
        if (found := _cached(hub, sha, prefix, files)) is not None:
            return found
        if download == "files":
            return cast(Path, _hf_snapshot(hub, sha, prefix, files, download=True))  # downloading, it raises or finds
        remote = Remote(hub.repo_id, sha, hub.endpoint, hub.token, files, hub.where)
        return fetch_tower(remote, hub.own_dir / "snapshots", prefix, {"revision": hub.revision, "endpoint": hub.endpoint})
    finally:
        lock.release()


def _from_caches(hub: _Hub, prefix: Optional[str], cause: Optional[BaseException]) -> Path:
    """The cached tower of the revision's sha (itself, or read from the caches' refs), or LocalEntryNotFoundError."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if cause is not None:
        logger.warning("%s: %s could not be reached (%s); looking in the local caches", hub.where, hub.endpoint, cause)
    refs = [_ref_path(d / "refs", hub.revision) for d in (hub.own_dir, hub.cache / hub.folder)]
    shas = [hub.revision] + [p.read_text(encoding="utf-8").strip() for p in refs if p is not None and p.is_file()]
    for sha in dict.fromkeys(s for s in shas if _SHA.match(s)):
        if (found := _cached(hub, sha, prefix, None)) is not None:
            return found
    reason = hub.offline if cause is None else f"{hub.endpoint} could not be reached ({type(cause).__name__}: {cause})"
    raise LocalEntryNotFoundError(
        f"{hub.where}: {reason}, and no cached copy of its vision tower was found (looked in {hub.own_dir} and "
        f"{hub.cache / hub.folder}). Load it once with network access first"
        + ("" if cause is not None else ", or unset HF_HUB_OFFLINE / pass local_files_only=False")) from cause


def _ref_path(refs: Path, revision: str) -> Optional[Path]:
    """``refs/<revision>`` (nested for ``refs/pr/1``), or None for a revision that is not a safe path."""
    parts = revision.split("/")
    return None if "\\" in revision or any(p in ("", ".", "..") for p in parts) else refs.joinpath(*parts)


_HINTS = {  # by error type (the first one in its MRO): what went wrong and what to do
    "GatedRepoError": " is gated (HTTP {status}): accept its conditions on {endpoint}/{repo}, pass token=... (or set HF_TOKEN) with access",
    "RepositoryNotFoundError": " was not found on {endpoint} (HTTP {status}), nor a directory {repo!r}: check the id, "
    "or pass token=... (or set HF_TOKEN) if the repo is private",
    "RevisionNotFoundError": ": the repo exists but has no revision {revision!r} (branch, tag or commit sha)",
    "HfHubHTTPError": ": a request to {endpoint} failed (HTTP {status}); for 401/403 pass token=... (or set HF_TOKEN) with read access",
}


def _reword(hub: _Hub, err: Any) -> None:
    """Make huggingface_hub's error (same object and type) name the repo and the revision."""
    hint = next(_HINTS[c.__name__] for c in type(err).__mro__ if c.__name__ in _HINTS)
    status = getattr(err.response, "status_code", None)
    text = hint.format(status=status, endpoint=hub.endpoint, repo=hub.repo_id, revision=hub.revision)
    err.args = (f"{hub.where}{text}\n[huggingface_hub: {str(err).strip()}]",)


def _cached(hub: _Hub, sha: str, prefix: Optional[str], files: Optional[RepoFiles]) -> Optional[Path]:
    """tp-siglip's tower for ``sha``, else a Hugging Face snapshot holding the tower, else None."""
    found = find_cached_tower(hub.own_dir / "snapshots", sha, prefix, hub.where) or _hf_snapshot(hub, sha, prefix, files)
    if found is not None:
        logger.info("%s: using commit %s from the cache at %s (no weights downloaded)", hub.where, sha, found)
    return found


def _hf_snapshot(hub: _Hub, sha: str, prefix: Optional[str], files: Optional[RepoFiles], download: bool = False
                 ) -> Optional[Path]:
    """The Hugging Face cache's snapshot of ``sha`` if it has config.json and every file holding the tower (first
    fetched with ``hf_hub_download`` when ``download``, with ``preprocessor_config.json``), else None. ``files``, the repo's listing, is None offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    def cached(name: str) -> Optional[Path]:
        path = try_to_load_from_cache(hub.repo_id, name, cache_dir=hub.cache, revision=sha)
        return Path(path) if isinstance(path, str) else None

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(hub.repo_id, name, revision=sha, cache_dir=hub.cache, token=hub.token,
                                        endpoint=hub.endpoint, library_name="tp-siglip", library_version=__version__))
        except LocalEntryNotFoundError as err:  # huggingface_hub's word for "the download failed"
            raise TransferError(f"{hub.where}: downloading {name} failed: {err}") from err

    get: Callable[[str], Optional[Path]] = fetch if download else cached
    names = [config_file(files)] if files is not None else [CONFIG_FILE, OPEN_CLIP_CONFIG]  # offline: either
    if (config := next((found for name in names if (found := get(name)) is not None), None)) is None:
        return None
    files = files if files is not None else {p.name: None for p in config.parent.iterdir()}  # offline: what is there
    index = get(INDEX_FILE) if INDEX_FILE in files else None
    weight_map = parse_index(index.read_bytes(), f"{hub.where}: {INDEX_FILE}") if index is not None else None
    needed = tower_files(weight_map, files, prefix, hub.where)
    if (index is None and INDEX_FILE in files) or not needed or not all(get(name) is not None for name in needed):
        return None
    if download:
        if PREPROCESSOR_FILE in files:
            fetch(PREPROCESSOR_FILE)
        logger.info("%s: the %d safetensors files holding the tower are in %s", hub.where, len(needed), config.parent)
    return config.parent
