"""A small Hugging Face Hub look-alike for the tests: serves model repos from local folders over HTTP.

Only what huggingface_hub (0.3x as transformers 4.x pins it, and 2.x: both ask for the same routes) and
tp-siglip ask for (``paths-info`` is never asked: ``model_info(files_metadata=True)`` gives the sizes):

* ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: JSON with ``id``, ``sha`` and
  ``siblings`` (``rfilename``, ``size``, ``blobId``, ``lfs`` for weight files);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the flat file list (``type``, ``path``, ``size``, ``oid``,
  ``lfs``), one page;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``ETag``, ``X-Repo-Commit``, ``Accept-Ranges`` and, for weight
  files (served like LFS files), ``X-Linked-Etag``/``X-Linked-Size``; a single ``Range: bytes=a-b`` gets
  ``206`` with ``Content-Range``.

Errors carry the headers huggingface_hub's ``hf_raise_for_status`` maps to its types: ``X-Error-Code:
RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` on 404s, ``GatedRepo`` on the 401 (no token) and
403 (token not granted) of a gated repo's files. Any other ``/api/`` path is a plain 404.

Every body byte written is counted per (repo, file), weight files (``*.safetensors``, pickles) apart from
the rest, weight bytes also per bearer token (to tell clients apart), and every request is logged, so
tests can assert what a load cost. ``fault`` injects transfer failures into ranged reads of weight files
(optionally only of tensor data, not of headers): ``"drop"`` sends the headers and part of the body, then
closes the connection; ``"short"`` answers a shorter (but well-formed) range than asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass
class _File:
    data: bytes
    etag: str  # git blob sha1, or sha256 for weight (LFS-like) files
    lfs: bool


@dataclass
class Repo:
    """One served repo: its files (read once, at registration) and its refs."""

    repo_id: str
    sha: str
    files: dict[str, _File]
    refs: dict[str, str]
    gated: bool = False
    granted_tokens: set[str] = field(default_factory=set)


@dataclass
class Fault:
    """A transfer failure to inject: ``mode`` ("drop" or "short"), how many more times (None: always)."""

    mode: str
    remaining: Optional[int] = None
    min_length: int = 1024  # only ranged reads at least this long (spares the 8-byte header probes)
    fraction: float = 0.5  # share of the asked bytes sent before dropping / answered with "short"
    data_only: bool = False  # only ranged reads of tensor data, not of a safetensors file's header


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """A threaded HTTP server on 127.0.0.1 (port 0 = any free port) serving registered repos."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.fault: Optional[Fault] = None
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._connections: set[socket.socket] = set()
        self.reset_counts()

    # ------------------------------------------------------------------ repos

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        tags: tuple[str, ...] = (),
        gated: bool = False,
        granted_tokens: tuple[str, ...] = (),
    ) -> str:
        """Serve every file under ``folder`` as ``repo_id`` (branch ``main`` + ``tags``); returns its commit sha."""
        files: dict[str, _File] = {}
        commit = hashlib.sha1(repo_id.encode())
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            lfs = name.endswith(WEIGHT_SUFFIXES)
            etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
            files[name] = _File(data, etag, lfs)
            commit.update(name.encode() + b"\0" + etag.encode())
        sha = commit.hexdigest()
        refs = {"main": sha, **{tag: sha for tag in tags}}
        self.repos[repo_id] = Repo(repo_id, sha, files, refs, gated, set(granted_tokens))
        return sha

    # ------------------------------------------------------------------ counters

    def reset_counts(self) -> None:
        with self._lock:
            self.served: Counter[tuple[str, str]] = Counter()  # (repo, file) -> body bytes written
            self.weight_bytes_by_token: Counter[str] = Counter()  # bearer token ("" for none) -> weight bytes
            self.requests: list[tuple[str, str, Optional[str]]] = []  # (method, path, Range header)

    def weight_bytes(self, repo_id: Optional[str] = None) -> int:
        """Body bytes of weight files served (of one repo, or of all)."""
        with self._lock:
            return sum(n for (repo, name), n in self.served.items() if _is_weight(name) and repo_id in (None, repo))

    def other_bytes(self, repo_id: Optional[str] = None) -> int:
        """Body bytes of everything else: API JSON, config, index..."""
        with self._lock:
            return sum(n for (repo, name), n in self.served.items() if not _is_weight(name) and repo_id in (None, repo))

    def _count(self, repo_id: str, name: str, n: int, token: str = "") -> None:
        with self._lock:
            self.served[(repo_id, name)] += n
            if _is_weight(name):
                self.weight_bytes_by_token[token] += n

    def _take_fault(self, first: int, length: int, data: bytes) -> Optional[Fault]:
        with self._lock:
            fault = self.fault
            if fault is None or length < fault.min_length or fault.remaining == 0:
                return None
            if fault.data_only and first < 8 + int.from_bytes(data[:8], "little"):
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
            return fault

    # ------------------------------------------------------------------ life cycle

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop listening and cut kept-alive connections, so nothing more can be served."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every answer has a Content-Length
    hub: HubServer

    def setup(self) -> None:
        super().setup()
        # headers and body leave in separate writes: without this, Nagle + delayed ACKs add ~40 ms per request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, self.headers.get("Range")))
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        if parts[:2] == ["api", "models"]:
            self._api(parts[2:], head)
        elif "resolve" in parts[1:]:
            k = parts.index("resolve", 1)
            self._resolve("/".join(parts[:k]), parts[k + 1] if len(parts) > k + 1 else "", "/".join(parts[k + 2 :]), head)
        else:
            self._json(404, {"error": "Not Found"}, head)

    def _token(self) -> Optional[str]:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _repo_and_sha(self, repo_id: str, revision: str, head: bool) -> Optional[tuple[Repo, str]]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            message = "Repository not found"
            self._json(404, {"error": message}, head, {"X-Error-Code": "RepoNotFound", "X-Error-Message": message})
            return None
        sha = repo.refs.get(revision, revision if revision == repo.sha else None)
        if sha is None:
            message = f"Invalid rev id: {revision}"
            self._json(404, {"error": message}, head, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": message})
            return None
        return repo, sha

    # ------------------------------------------------------------------ /api/models/...

    def _api(self, parts: list[str], head: bool) -> None:
        for keyword in ("revision", "tree"):
            if keyword in parts[1:3]:  # after "name" or "org/name"
                k = parts.index(keyword, 1)
                repo_id, revision, rest = "/".join(parts[:k]), (parts[k + 1] if len(parts) > k + 1 else ""), parts[k + 2 :]
                break
        else:
            if not 1 <= len(parts) <= 2:  # some other /api/ route: not implemented here
                self._json(404, {"error": "Not Found"}, head)
                return
            keyword, repo_id, revision, rest = "revision", "/".join(parts), "main", []
        found = self._repo_and_sha(repo_id, revision, head)
        if found is None:
            return
        repo, sha = found
        if keyword == "revision":
            if rest:
                self._json(404, {"error": "Not Found"}, head)
                return
            siblings = []
            for name, f in repo.files.items():
                entry = {"rfilename": name, "size": len(f.data), "blobId": _git_blob_sha1(f.data)}
                if f.lfs:
                    entry["lfs"] = {"sha256": f.etag, "size": len(f.data), "pointerSize": 134}
                siblings.append(entry)
            body = {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
            self._json(200, body, head, repo_id=repo_id)
            return
        folder = "/".join(rest).strip("/")
        entries = []
        for name, f in repo.files.items():
            if folder and not name.startswith(folder + "/"):
                continue
            entry = {"type": "file", "oid": _git_blob_sha1(f.data), "size": len(f.data), "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.etag, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries, head, repo_id=repo_id)

    # ------------------------------------------------------------------ /{repo}/resolve/{rev}/{file}

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        found = self._repo_and_sha(repo_id, revision, head)
        if found is None:
            return
        repo, sha = found
        if repo.gated:
            token = self._token()
            if token is None:
                message = (
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                    f"to access it. Please log in."
                )
                self._json(401, {"error": message}, head, {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
                return
            if token not in repo.granted_tokens:
                message = (
                    f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo_id} to ask for access."
                )
                self._json(403, {"error": message}, head, {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
                return
        f = repo.files.get(name)
        if f is None:
            message = "Entry not found"
            extra = {"X-Error-Code": "EntryNotFound", "X-Error-Message": message, "X-Repo-Commit": sha}
            self._json(404, {"error": message}, head, extra)
            return
        size = len(f.data)
        headers = {
            "Content-Type": "application/octet-stream" if f.lfs else "text/plain; charset=utf-8",
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(size)})
        first, last = 0, size - 1
        status = 200
        wanted = self.headers.get("Range")
        if wanted is not None and not head:
            parsed = _parse_range(wanted, size)
            if parsed is None:
                self._send(416, b"", head, {**headers, "Content-Range": f"bytes */{size}"})
                return
            first, last = parsed
            status = 206
        fault = self.hub._take_fault(first, last - first + 1, f.data) if (status == 206 and f.lfs) else None
        if fault is not None and fault.mode == "short":
            last = first + int((last - first) * fault.fraction)
        if status == 206:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        body = f.data[first : last + 1]
        if fault is not None and fault.mode == "drop":
            self._send_dropping(status, body, headers, repo_id, name, fault.fraction)
            return
        self._send(status, body, head, headers, repo_id=repo_id, name=name)

    # ------------------------------------------------------------------ writing answers

    def _json(
        self, status: int, body: object, head: bool, extra: Optional[dict[str, str]] = None, repo_id: str = ""
    ) -> None:
        data = json.dumps(body).encode()
        self._send(status, data, head, {"Content-Type": "application/json", **(extra or {})}, repo_id=repo_id, name="<api>")

    def _start(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(
        self, status: int, body: bytes, head: bool, headers: dict[str, str], repo_id: str = "", name: str = "<error>"
    ) -> None:
        self._start(status, headers, len(body))
        if not head and body:  # counted first: a client that has read the body must find it counted
            self.hub._count(repo_id, name, len(body), self._token() or "")
            self.wfile.write(body)

    def _send_dropping(
        self, status: int, body: bytes, headers: dict[str, str], repo_id: str, name: str, fraction: float
    ) -> None:
        """Announce the whole body, send ``fraction`` of it, then cut the connection."""
        self._start(status, headers, len(body))
        half = body[: int(len(body) * fraction)]
        self.hub._count(repo_id, name, len(half), self._token() or "")
        self.wfile.write(half)
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def _parse_range(header: str, size: int) -> Optional[tuple[int, int]]:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (first, last), or None if unsatisfiable."""
    if not header.startswith("bytes=") or "," in header:
        return None
    start, _, end = header[len("bytes=") :].strip().partition("-")
    try:
        if start == "":
            n = int(end)
            first, last = max(size - n, 0), size - 1
        else:
            first = int(start)
            last = min(int(end), size - 1) if end else size - 1
    except ValueError:
        return None
    if first > last or first >= size:
        return None
    return first, last
