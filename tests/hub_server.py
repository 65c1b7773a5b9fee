"""A small, real, in-memory HTTP server speaking the part of the Hugging Face Hub API used by ``huggingface_hub``.

The Hub cannot be reached from CI, so upload/download code paths (``push_to_hub``, ``upload_folder``,
``hf_hub_download``, ``snapshot_download``, ``from_pretrained(repo_id, revision=...)``) are tested against this
server with ``HF_ENDPOINT`` pointing at it. It is driven by the *real* ``huggingface_hub`` client; the URL
shapes, headers and JSON bodies below follow what that client (v2.x) sends and parses.

Implemented endpoints (``{type}`` is ``models``, ``datasets`` or ``spaces``, all sharing one code path; model and
dataset repos are tested; repo ids are ``namespace/name``):

* ``POST /api/repos/create``                      create a repo (409 if it exists, 400 on an invalid name)
* ``DELETE /api/repos/delete``                    delete a repo
* ``GET  /api/whoami-v2``                         the token's user
* ``POST /api/validate-yaml``                     README metadata check (always valid)
* ``GET  /api/agent-harnesses``                   empty registry (fetched once by the client's header builder)
* ``GET  /api/{type}/{repo}[/revision/{rev}]``    repo info: ``sha``, ``siblings`` (``?blobs=true`` adds sizes)
* ``GET  /api/{type}/{repo}/tree/{rev}[/{path}]`` tree listing, ``?recursive=true`` supported
* ``POST /api/{type}/{repo}/preupload/{rev}``     answers ``uploadMode: "regular"`` for every file
* ``POST /api/{type}/{repo}/commit/{rev}``        NDJSON commit: ``header``, ``file`` (base64), ``deletedFile``,
                                                  ``deletedFolder``; each commit makes a new 40-hex sha on the branch
* ``POST /api/{type}/{repo}/branch/{branch}``     create a branch (optionally from ``startingPoint``)
* ``HEAD|GET /[{type}/]{repo}/resolve/{rev}/{path}``  file download with ``X-Repo-Commit``, ``ETag`` (git blob sha1),
                                                  ``Content-Length``

Errors carry the Hub's ``X-Error-Code`` values that the client maps to exceptions: ``RepoNotFound`` (this is the
code ``huggingface_hub.utils.hf_raise_for_status`` checks for RepositoryNotFoundError), ``RevisionNotFound``,
``EntryNotFound`` (with ``X-Repo-Commit``, which the client uses to cache the file's absence).

Authentication: write operations need ``Authorization: Bearer <hub.token>`` (401 otherwise). A wrong token is
rejected with 401 on every request, like the Hub. Public repos are readable without a token; private ones answer
401 + ``RepoNotFound`` without it.

Simplified on purpose: no LFS/Xet (everything is stored as a regular git file; ``lfsFile`` lines are refused), no pull
requests (``create_pr`` is refused), no tags, no Range requests, no pagination (one page), no ``expand`` data
(``lastCommit``, security scans), one user who may write to any namespace, revisions are branch names or full
commit shas. State is in memory and lost on ``stop()``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHub", "hub_environment"]

_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub returns as ``ETag``/``oid`` of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".000Z"


@dataclass
class _Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]  # full snapshot: path -> content
    date: float


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: float
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class HubError(Exception):
    """Raised inside a handler to answer with a Hub-style error."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


class LocalHub:
    """In-memory Hub on ``127.0.0.1`` (free port), served from a daemon thread.

    Usage: ``with LocalHub() as hub: HfApi(endpoint=hub.endpoint, token=hub.token).create_repo("me/tiny")``;
    or ``hub = LocalHub().start()`` ... ``hub.stop()``. ``hub.requests`` logs every request, ``hub.unhandled``
    the ones no route matched.
    """

    def __init__(self, token: str = "hf_local_hub_test_token", user: str = "local-user"):
        self.token = token
        self.user = user
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[str] = []  # "METHOD /path -> status", for debugging
        self.unhandled: list[str] = []  # requests no route matched: a sign the client needs more API
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "LocalHub":
        if self._server is not None:
            return self
        handler = type("LocalHubHandler", (_HubHandler,), {"hub": self})  # each server its own hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- state helpers (call with the lock held)
    def _commit(self, repo: _Repo, branch: str, files: dict[str, bytes], message: str) -> str:
        self._counter += 1
        parent = repo.branches.get(branch)
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{message}\n{self._counter}\n{time.time_ns()}\n"
        seed += "".join(f"{p}\0{git_blob_sha1(c)}\n" for p, c in sorted(files.items()))
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = _Commit(sha, parent, message, dict(files), time.time())
        repo.branches[branch] = sha
        return sha

    def _get_repo(self, repo_type: str, repo_id: str, authed: bool) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authed):
            raise HubError(404 if repo is None else 401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _get_commit(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


class _HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub  # set on the per-server subclass made in LocalHub.start()
    server_version = "LocalHub/1.0"
    # HTTP/1.0: one request per connection, so a stopped server really stops answering (no kept-alive sockets).
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):  # silence the default stderr logging
        pass

    # ---------------------------------------------------------------- plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]  # split *before* unquoting: revisions may hold %2F
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        status = 500
        try:
            auth = self.headers.get("Authorization")
            if auth is not None and auth != f"Bearer {self.hub.token}":
                raise HubError(401, "Invalid credentials in Authorization header")
            self.authed = auth is not None
            status = self._route(method, parts, query)
        except HubError as e:
            status = e.status
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, {"error": e.message, **e.extra}, headers, head=method == "HEAD")
        except Exception as e:  # a bug here must not kill the server thread
            with contextlib.suppress(OSError):  # the client may already be gone
                self._send(500, {"error": f"LocalHub internal error: {e!r}"}, head=method == "HEAD")
        self.hub.requests.append(f"{method} {url.path} -> {status}")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            raise HubError(411, "LocalHub needs a Content-Length")
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> dict:
        try:
            return json.loads(self._body() or b"{}")
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e

    def _send(self, status: int, payload, headers: dict | None = None, head: bool = False) -> int:
        if isinstance(payload, (bytes, bytearray)):
            body, ctype = bytes(payload), "application/octet-stream"
        else:
            body, ctype = json.dumps(payload).encode(), "application/json; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        return status

    def _require_write(self, action: str) -> None:
        if not self.authed:
            raise HubError(401, f"You must be authenticated to {action}. Pass a token (Authorization: Bearer ...).")

    # ---------------------------------------------------------------- routing
    def _route(self, method: str, parts: list[str], query: dict) -> int:
        hub = self.hub
        if parts[:1] == ["api"]:
            api = parts[1:]
            if method == "POST" and api == ["repos", "create"]:
                return self._create_repo()
            if method == "DELETE" and api == ["repos", "delete"]:
                return self._delete_repo()
            if method == "GET" and api == ["whoami-v2"]:
                self._require_write("call whoami")
                return self._send(200, {"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [],
                                        "auth": {"accessToken": {"displayName": "local", "role": "write"}}})
            if method == "POST" and api == ["validate-yaml"]:
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            if method == "GET" and api == ["agent-harnesses"]:
                return self._send(200, {"standardEnvVars": [], "harnesses": {}})
            if len(api) >= 3 and api[0] in _TYPES:
                repo_type, repo_id, rest = _TYPES[api[0]], f"{api[1]}/{api[2]}", api[3:]
                if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                    return self._repo_info(repo_type, repo_id, rest[1] if rest else "main", query)
                if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), query)
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._preupload(repo_type, repo_id, rest[1], query)
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._commit(repo_type, repo_id, rest[1], query)
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._create_branch(repo_type, repo_id, rest[1])
        elif method in ("GET", "HEAD"):
            repo_type = _TYPES.get(parts[0], "model") if parts else "model"
            rest = parts[1:] if parts and parts[0] in _TYPES else parts
            if len(rest) >= 5 and rest[2] == "resolve":
                return self._resolve(repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]), method == "HEAD")
        hub.unhandled.append(f"{method} {self.path}")
        raise HubError(404, f"LocalHub does not implement {method} {urlsplit(self.path).path}")

    # ---------------------------------------------------------------- repos
    def _create_repo(self) -> int:
        self._require_write("create a repository")
        body = self._json_body()
        namespace, name = body.get("organization") or self.hub.user, body.get("name") or ""
        repo_type = body.get("type") or "model"
        if repo_type not in _TYPES.values():
            raise HubError(400, f"Invalid repo type: {repo_type}")
        for part in (namespace, name):
            if not _NAME_RE.match(part) or "--" in part or ".." in part or part.endswith(".git"):
                raise HubError(400, f"Invalid repo name '{namespace}/{name}': names must be 1-96 characters of "
                               "letters, digits, '-', '_', '.', start and end with a letter or digit, and not "
                               "contain '--' or '..'")
        repo_id = f"{namespace}/{name}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.hub.endpoint}/{prefix}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub.repos:
                # The Hub's 409 body carries the url: create_repo(exist_ok=True) reads it.
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", url=url)
            repo = _Repo(repo_type, repo_id, body.get("visibility") == "private" or bool(body.get("private")),
                         time.time())
            self.hub.repos[(repo_type, repo_id)] = repo
            self.hub._commit(repo, "main", {".gitattributes": _DEFAULT_GITATTRIBUTES}, "initial commit")
        return self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> int:
        self._require_write("delete a repository")
        body = self._json_body()
        key = (body.get("type") or "model", f"{body.get('organization') or self.hub.user}/{body.get('name')}")
        with self.hub._lock:
            if self.hub.repos.pop(key, None) is None:
                raise HubError(404, f"Repository {key[1]} not found", "RepoNotFound")
        return self._send(200, {})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, query: dict) -> int:
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id, self.authed)
            commit = self.hub._get_commit(repo, revision)
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": p, **({"size": len(c), "blobId": git_blob_sha1(c)} if blobs else {})}
            for p, c in sorted(commit.files.items())
        ]
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.sha, "lastModified": _now_iso(commit.date), "createdAt": _now_iso(repo.created),
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        return self._send(200, info)

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> int:
        self._require_write("create a branch")
        body = self._json_body()
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id, True)
            start = self.hub._get_commit(repo, body.get("startingPoint") or "main")
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = start.sha
        return self._send(200, {})

    # ---------------------------------------------------------------- files
    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, query: dict) -> int:
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id, self.authed)
            commit = self.hub._get_commit(repo, revision)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        files = {p: c for p, c in commit.files.items() if p.startswith(prefix)}
        if prefix and not files:
            raise HubError(404, f"Path {path} not found in revision {commit.sha}", "EntryNotFound", commit.sha)
        entries: dict[str, dict] = {}
        for p, content in files.items():
            parts = p[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # folders on the way
                folder = prefix + "/".join(parts[:i])
                entries[folder] = {"type": "directory", "path": folder, "oid": _tree_oid(commit.files, folder)}
            if recursive or len(parts) == 1:
                entries[p] = {"type": "file", "path": p, "oid": git_blob_sha1(content), "size": len(content)}
        return self._send(200, [entries[k] for k in sorted(entries)])

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, head: bool) -> int:
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id, self.authed)
            commit = self.hub._get_commit(repo, revision)
        content = commit.files.get(path)
        if content is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit.sha)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha1(content)}"', "Accept-Ranges": "none"}
        return self._send(200, content, headers, head=head)

    # ---------------------------------------------------------------- uploads
    def _writable_branch(self, repo_type: str, repo_id: str, revision: str, query: dict) -> tuple[_Repo, str]:
        if query.get("create_pr", "") in ("1", "true", "True"):
            raise HubError(400, "LocalHub does not support pull requests (create_pr)")
        repo = self.hub._get_repo(repo_type, repo_id, True)
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to an existing branch)", "RevisionNotFound")
        return repo, revision

    def _preupload(self, repo_type: str, repo_id: str, revision: str, query: dict) -> int:
        self._require_write("upload files")
        body = self._json_body()
        with self.hub._lock:
            repo, branch = self._writable_branch(repo_type, repo_id, revision, query)
            head = repo.commits[repo.branches[branch]]
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha1(head.files[f["path"]]) if f["path"] in head.files else None}
            for f in body.get("files", [])
        ]
        return self._send(200, {"files": files, "commitOid": head.sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict) -> int:
        self._require_write("commit")
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON commit payload: {e}") from e
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line of a commit must be the 'header'")
        header = lines[0]["value"]
        with self.hub._lock:
            repo, branch = self._writable_branch(repo_type, repo_id, revision, query)
            parent = repo.commits[repo.branches[branch]]
            if header.get("parentCommit") and header["parentCommit"] != parent.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if key in ("file", "deletedFile", "deletedFolder"):
                    _check_path(path.rstrip("/") if key == "deletedFolder" else path)
                if key == "file":
                    raw = value.get("content", "")
                    files[path] = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(folder)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                elif key == "lfsFile":
                    raise HubError(400, "LocalHub stores no LFS files: preupload answers 'regular' for every file")
                else:
                    raise HubError(400, f"Unsupported commit operation: {key!r}")
            message = (header.get("summary") or "").strip() or "Update"
            sha = self.hub._commit(repo, branch, files, message)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return self._send(200, {"success": True, "commitOid": sha, "pullRequestUrl": None,
                                "commitUrl": f"{self.hub.endpoint}/{prefix}{repo_id}/commit/{sha}"})


def _check_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")


def _tree_oid(files: dict[str, bytes], folder: str) -> str:
    listing = "".join(f"{p}\0{git_blob_sha1(c)}\n" for p, c in sorted(files.items()) if p.startswith(folder + "/"))
    return hashlib.sha1(listing.encode()).hexdigest()


# -------------------------------------------------------------------- client-side environment
@contextlib.contextmanager
def hub_environment(hub: LocalHub, tmp_path, *, login: bool = False):
    """Point ``huggingface_hub`` / ``transformers`` / ``datasets`` at ``hub`` with a private cache, then restore.

    Sets ``HF_ENDPOINT``, ``HF_HOME`` (= ``tmp_path/hf_home``) and the cache/token paths under it,
    ``HF_HUB_OFFLINE=0``, and removes any ambient token (``HF_TOKEN``, ...) so nothing from the user's cache
    or login is read or written. With ``login=True``, ``HF_TOKEN`` is set to ``hub.token`` so calls without an
    explicit ``token=`` are authenticated. Module-level values that the libraries computed at import time
    (``huggingface_hub.constants.ENDPOINT``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, the shared ``HfApi`` objects of
    ``huggingface_hub.hf_api`` and ``transformers.utils.hub``, ``datasets.config``) are patched too.
    Yields the ``HF_HOME`` path; the hub cache is ``HF_HOME / "hub"``.
    """
    import huggingface_hub.constants as c
    import huggingface_hub.hf_api as hf_api

    home = Path(tmp_path) / "hf_home"
    home.mkdir(parents=True, exist_ok=True)
    paths = {"hub": home / "hub", "assets": home / "assets", "xet": home / "xet", "token": home / "token",
             "datasets": home / "datasets", "modules": home / "modules"}
    env = {
        "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(paths["hub"]),
        "HUGGINGFACE_HUB_CACHE": str(paths["hub"]), "HF_ASSETS_CACHE": str(paths["assets"]),
        "HF_XET_CACHE": str(paths["xet"]), "HF_TOKEN_PATH": str(paths["token"]),
        "HF_DATASETS_CACHE": str(paths["datasets"]), "HF_MODULES_CACHE": str(paths["modules"]),
        "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": hub.token if login else None,
        "HUGGING_FACE_HUB_TOKEN": None, "HF_OIDC_RESOURCE": None, "HUGGINGFACE_CO_STAGING": None,
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_attrs: list[tuple[object, str, object]] = []

    def patch(obj, name, value):
        if obj is not None and hasattr(obj, name):
            saved_attrs.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        host = hub.endpoint.split("//")[1].split(":")[0]
        for name, value in {
            "ENDPOINT": hub.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_URL_HOSTS": frozenset(c.HF_URL_HOSTS | {host}), "HF_HOME": str(home),
            "HF_HUB_CACHE": str(paths["hub"]), "HUGGINGFACE_HUB_CACHE": str(paths["hub"]),
            "HF_ASSETS_CACHE": str(paths["assets"]), "HUGGINGFACE_ASSETS_CACHE": str(paths["assets"]),
            "HF_XET_CACHE": str(paths["xet"]), "HF_TOKEN_PATH": str(paths["token"]),
            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
            "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
            "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
            "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
            "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True,
        }.items():
            patch(c, name, value)
        patch(hf_api.api, "endpoint", hub.endpoint)  # bound methods like huggingface_hub.create_repo use it
        patch(sys.modules.get("transformers.utils.hub"), "_hf_api", None)  # cached HfApi: rebuilt lazily
        patch(sys.modules.get("transformers.utils.hub"), "HF_MODULES_CACHE", str(paths["modules"]))
        patch(sys.modules.get("transformers.dynamic_module_utils"), "HF_MODULES_CACHE", str(paths["modules"]))
        ds = sys.modules.get("datasets.config")
        if ds is not None:
            for name, value in {
                "HF_ENDPOINT": hub.endpoint,
                "HUB_DATASETS_URL": hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
                "HF_CACHE_HOME": str(home), "HF_DATASETS_CACHE": paths["datasets"],
                "HF_MODULES_CACHE": paths["modules"],
                "DOWNLOADED_DATASETS_PATH": paths["datasets"] / "downloads",
                "EXTRACTED_DATASETS_PATH": paths["datasets"] / "downloads" / "extracted",
                "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False,
            }.items():
                patch(ds, name, value)
        yield home
    finally:
        for obj, name, value in reversed(saved_attrs):
            setattr(obj, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run an in-memory Hugging Face Hub on 127.0.0.1 (foreground).")
    parser.add_argument("--token", default="hf_local_hub_test_token")
    parser.add_argument("--user", default="local-user")
    args = parser.parse_args()
    with LocalHub(token=args.token, user=args.user) as local_hub:
        print(f"LocalHub on {local_hub.endpoint} (token: {local_hub.token}); Ctrl-C to stop.", flush=True)
        print(f"  HF_ENDPOINT={local_hub.endpoint} HF_TOKEN={local_hub.token} python ...", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
