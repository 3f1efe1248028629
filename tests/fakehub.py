"""An in-process Hub emulator for tests: a threaded stdlib HTTP server on 127.0.0.1 speaking the part of the Hub
protocol that huggingface_hub's upload and download paths use (docs/hub-and-action.md, Appendix A).

It is strict where the real client or the real Hub depend on it (sha256 of every stored LFS object, ETags on parts,
stale parents, auth roles), keeps counters the tests assert on, and can inject faults: a status (429 + Retry-After,
5xx), a dropped connection, an answer cut after its first bytes, or a stall that holds a request until the test
releases it. Gated repos answer like the Hub's: metadata and tree for everyone, files only to granted users. It also
answers the Trusted Publishers exchange (`POST /oauth/token`, checked by tests/oidc_fakes.py) with tokens limited to
one repo that expire."""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import math
import re
import secrets
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from tests.localserver import serve, shutdown
from tests.oidc_fakes import HUB_TOKEN_TTL, OAuthError, TrustedPublishers

GITATTRIBUTES = b"".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for pattern in ("*.bin", "*.pt", "*.pth", "*.safetensors", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.zip")
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub's rule: anything this big goes to LFS
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
REPO_ROUTE = r"/api/(?P<type>model|dataset)s/(?P<ns>[^/]+)/(?P<name>[^/]+)"
GIT_ROUTE = r"/(?:(?P<prefix>datasets/))?(?P<ns>[^/]+)/(?P<name>[^/]+)"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Entry:
    size: int
    oid: str  # git blob oid of the content, or of the LFS pointer
    lfs: str | None = None  # sha256 of an LFS object
    data: bytes | None = None  # regular files only; LFS content lives in Repo.lfs


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)  # commit oid -> tree
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> verified content
    prs: int = 0
    gated: bool = False  # files need a token of a user in `granted`, like a gated repo whose terms were accepted
    granted: set[str] = field(default_factory=set)
    titles: dict[str, str] = field(default_factory=dict)  # commit oid -> its title (the commit header's summary)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int | None
    headers: dict[str, str]
    body: dict[str, Any] | None
    drop: bool
    stall: threading.Event | None
    times: int
    cut: int | None = None


@dataclass
class Upload:
    repo: Repo
    oid: str
    size: int
    parts: dict[int, bytes] = field(default_factory=dict)

LINK_CHUNK = 1 << 20  # a throttled upload is read in pieces this size, each when the link has carried it

class FakeHub:
    """State, counters and the server. `multipart_threshold`/`chunk_size` are small so tests hit both LFS paths."""

    def __init__(self, *, multipart_threshold: int = 48 * 1024, chunk_size: int = 16 * 1024,
                 bandwidth: float | None = None) -> None:
        self.multipart_threshold = multipart_threshold
        self.chunk_size = chunk_size
        self.bandwidth = bandwidth  # bytes/s of LFS upload, shared by every connection (one uplink); None: unlimited
        self._link_free_at = 0.0
        self.tokens: dict[str, tuple[str, str]] = {}  # token -> (user, role)
        self.orgs: dict[str, dict[str, str]] = {}  # user -> {org: roleInOrg}
        self.trust = TrustedPublishers()  # POST /oauth/token: who may exchange an OIDC id token for which repo
        self.scopes: dict[str, tuple[str, float]] = {}  # exchanged token -> (repo key it is limited to, expiry)
        self.repos: dict[str, Repo] = {}
        self.uploads: dict[str, Upload] = {}
        self.faults: list[Fault] = []
        self.lfs_errors: dict[str, tuple[int, str]] = {}  # oid -> per-object batch error
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.stored: Counter[str] = Counter()  # sha256 -> times an LFS object was accepted
        self.transfers: Counter[str] = Counter()  # "basic" | "multipart" completions
        self.stalled = threading.Event()
        self.lock = threading.RLock()
        self._commit_counter = 0
        self._server: ThreadingHTTPServer | None = None

    # ---- test-facing API -------------------------------------------------------------------------------------
    def add_user(self, name: str, token: str, *, role: str = "write", orgs: dict[str, str] | None = None) -> None:
        self.tokens[token] = (name, role)
        self.orgs[name] = dict(orgs or {})

    def add_token(self, user: str, token: str, role: str) -> None:
        self.tokens[token] = (user, role)

    def add_trusted_publisher(self, repo_id: str, **claims: str) -> None:
        """Let GitHub Actions id tokens whose claims equal these (e.g. repository=, workflow_ref=) push to repo_id."""
        self.trust.add(f"model:{repo_id}", **claims)

    def mint_scoped_token(self, repo_key: str, ttl: float = HUB_TOKEN_TTL) -> str:
        """A trusted-publisher token: writes to one repo only, pushes as the synthetic [OIDC] user, expires."""
        token = f"hf_jwt_{secrets.token_hex(24)}"
        with self.lock:
            self.tokens[token] = ("[OIDC]", "fineGrained")
            self.scopes[token] = (repo_key, time.time() + ttl)
        return token

    def inject(self, method: str, pattern: str, *, status: int | None = None, headers: dict[str, str] | None = None,
               body: dict[str, Any] | None = None, drop: bool = False, stall: threading.Event | None = None,
               times: int = 1, cut: int | None = None) -> None:
        """Make the next `times` requests matching method + path regex fail: a status, a dropped connection, a
        stall until `stall` is set (the connection is then closed without an answer), or `cut`: the real answer's
        headers (full Content-Length) and only its first `cut` body bytes, then the connection closes."""
        self.faults.append(Fault(method, re.compile(pattern), status, headers or {}, body, drop, stall, times, cut))

    def paths(self, method: str | None = None, contains: str = "") -> list[str]:
        return [p for m, p, _ in self.requests if (method is None or m == method) and contains in p]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Entry]:
        repo = self.repos[f"{repo_type}:{repo_id}"]
        return repo.commits[repo.refs[revision]]

    def gate(self, repo_id: str, *granted: str, repo_type: str = "model") -> None:
        """Gate a repo's files; `granted` users (and the owner) may download them."""
        repo = self.repos[f"{repo_type}:{repo_id}"]
        repo.gated, repo.granted = True, set(granted)

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        return len(self.repos[f"{repo_type}:{repo_id}"].commits)

    def start(self) -> str:
        self._server = serve(_handler_for(self))
        return self.url

    def stop(self) -> None:
        shutdown(self._server)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def throttle(self, nbytes: int) -> None:
        """Hold the reading of `nbytes` of an upload until the shared link would have carried them."""
        if not self.bandwidth:
            return
        with self.lock:
            self._link_free_at = max(time.monotonic(), self._link_free_at) + nbytes / self.bandwidth
            until = self._link_free_at
        time.sleep(max(0.0, until - time.monotonic()))

    # ---- model --------------------------------------------------------------------------------------------------
    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.times > 0 and f.method == method and f.pattern.search(path):
                    f.times -= 1
                    return f
        return None

    def _new_commit(self, repo: Repo, tree: dict[str, Entry]) -> str:
        with self.lock:
            self._commit_counter += 1
            oid = hashlib.sha1(f"{repo.id}:{self._commit_counter}".encode()).hexdigest()
            repo.commits[oid] = tree
            return oid

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        repo.refs["main"] = self._new_commit(repo, {".gitattributes": _regular(GITATTRIBUTES)})
        self.repos[f"{repo_type}:{repo_id}"] = repo
        return repo


def _regular(data: bytes) -> Entry:
    return Entry(size=len(data), oid=git_blob_oid(data), data=data)


def _lfs_entry(oid: str, size: int) -> Entry:
    return Entry(size=size, oid=git_blob_oid(lfs_pointer(oid, size)), lfs=oid)


def _front_matter_errors(content: str) -> tuple[list[str], list[str]]:
    """What the Hub's validate-yaml rejects (the subset this project cares about) and warns about."""
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if not m:
        return [], ["empty or missing yaml metadata in repo card"]
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"invalid YAML: {str(e).splitlines()[0]}"], []
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"], []
    errors = []
    if "license" in meta and not isinstance(meta["license"], str):
        errors.append('"license" must be a string')
    base = meta.get("base_model")
    if base is not None and not (isinstance(base, str) or (isinstance(base, list) and all(isinstance(b, str)
                                                                                           for b in base))):
        errors.append('"base_model" must be a string or a list of strings')
    if "base_model_relation" in meta and meta["base_model_relation"] not in RELATIONS:
        errors.append(f'"base_model_relation" must be one of {sorted(RELATIONS)}')
    datasets = meta.get("datasets")
    if datasets is not None and not (isinstance(datasets, list) and all(isinstance(d, str) for d in datasets)):
        errors.append('"datasets" must be a list of strings')
    return errors, [] if meta else ["empty or missing yaml metadata in repo card"]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ---- plumbing -------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.cut: int | None = None
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        path = split.path
        fault = self.hub._take_fault(method, path)
        if fault is not None and self._apply_fault(fault, method, path):
            return
        for route_method, pattern, name in ROUTES:
            m = re.fullmatch(pattern, path)
            if route_method == method and m:
                self.body_read = False
                try:
                    getattr(self, name)(**{k: unquote(v) for k, v in m.groupdict().items() if v is not None})
                except HttpError as e:
                    if not self.body_read:  # refused before reading it: drain, so keep-alive stays in sync
                        self._body()
                    self._error(e)
                return
        self._error(HttpError(404, f"no route for {method} {path}"))

    def _apply_fault(self, fault: Fault, method: str, path: str) -> bool:
        if fault.cut is not None:
            self.cut = fault.cut  # the route answers; _send truncates
            return False
        if fault.drop or fault.stall is not None:
            self._record(method, path, 0)
            if fault.stall is not None:
                self.hub.stalled.set()
                fault.stall.wait(timeout=60)
            else:
                self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)  # die mid-body
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may already be gone (killed mid-upload)
                self.connection.shutdown(socket.SHUT_RDWR)
            return True
        self._body()  # drain, so keep-alive stays in sync
        self._json(fault.body or {"error": f"injected {fault.status}"}, fault.status or 500, fault.headers)
        return True

    def _body(self, *, link: bool = False) -> bytes:
        """The request body; `link`: read at most as fast as the hub's upload link carries it (FakeHub.bandwidth)."""
        self.body_read = True
        if link and self.hub.bandwidth and "Content-Length" in self.headers:
            left, out = int(self.headers["Content-Length"]), bytearray()
            while left:
                chunk = self.rfile.read(min(left, LINK_CHUNK))
                if not chunk:
                    break
                self.hub.throttle(len(chunk))
                out += chunk
                left -= len(chunk)
            return bytes(out)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return bytes(out)
                out += chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as e:
            raise HttpError(400, f"body is not JSON: {e}") from None

    def _record(self, method: str, path: str, status: int) -> None:
        with self.hub.lock:
            self.hub.requests.append((method, path, status))

    def _send(self, status: int, body: bytes, headers: dict[str, str], content_type: str) -> None:
        self._record(self.command, urlsplit(self.path).path, status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if self.cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:self.cut])
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers or {}, "application/json")

    def _error(self, e: HttpError) -> None:
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._json({"error": e.message}, e.status, headers)

    @property
    def base(self) -> str:
        return f"http://{self.headers['Host']}"

    # ---- auth -----------------------------------------------------------------------------------------------------
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        return auth.removeprefix("Bearer ").strip() if auth else None

    def _scope(self) -> str | None:
        """The repo key an exchanged (trusted-publisher) token is limited to; None for a user token."""
        scope = self.hub.scopes.get(self._token() or "")
        return scope[0] if scope else None

    def _user(self) -> tuple[str | None, str | None]:
        token = self._token()
        if token is None:
            return None, None
        scope = self.hub.scopes.get(token)
        if token not in self.hub.tokens or (scope is not None and time.time() >= scope[1]):
            raise HttpError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _can_write_ns(self, user: str | None, role: str | None, ns: str) -> None:
        if user is None:
            raise HttpError(401, "You must be authenticated to write", code="RepoNotFound")
        if role != "write":
            raise HttpError(403, "You have read access but not the required permissions for this operation.")
        if ns != user and self.hub.orgs.get(user, {}).get(ns) not in ("write", "admin"):
            raise HttpError(403, f"You don't have the rights to write in the namespace {ns}")

    def _repo(self, type: str, ns: str, name: str, *, write: bool = False) -> Repo:
        user, role = self._user()
        key, scope = f"{type}:{ns}/{name}", self._scope()
        repo = self.hub.repos.get(key)
        visible = repo is not None and (not repo.private or scope == key or (scope is None and user is not None and (
            ns == user or ns in self.hub.orgs.get(user, {}))))
        if not visible:
            raise HttpError(401 if user is None else 404, "Repository not found", code="RepoNotFound")
        if write and scope is not None and scope != key:
            raise HttpError(403, f"This token can only write to {scope.split(':', 1)[1]}")
        if write and scope is None:
            self._can_write_ns(user, role, ns)
        assert repo is not None
        return repo

    def _gate(self, repo: Repo) -> None:
        """The Hub's answers for a gated repo's files: 401 anonymous, 403 for a user who was not granted access."""
        if not repo.gated:
            return
        user, _ = self._user()
        if user is None:
            raise HttpError(401, f"Access to model {repo.id} is restricted. You must have access to it and be "
                                 "authenticated to access it. Please log in.", code="GatedRepo")
        if user not in repo.granted and repo.id.split("/")[0] != user:
            raise HttpError(403, f"Access to model {repo.id} is restricted and you are not in the authorized list. "
                                 f"Visit {self.base}/{repo.id} to ask for access.", code="GatedRepo")

    def _resolve(self, repo: Repo, rev: str) -> tuple[str, dict[str, Entry]]:
        oid = repo.refs.get(rev) or next((c for c in repo.commits if len(rev) >= 7 and c.startswith(rev)), None)
        if oid is None:
            raise HttpError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return oid, repo.commits[oid]

    # ---- API routes -----------------------------------------------------------------------------------------------
    def whoami(self) -> None:
        user, role = self._user()
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": o, "roleInOrg": r} for o, r in sorted(self.hub.orgs.get(user, {}).items())]
        token: dict[str, Any] = {"displayName": "test", "role": role}
        if (scope := self._scope()) is not None:  # described like a fine-grained token limited to one repo
            repo_type, repo_id = scope.split(":", 1)
            token = {"displayName": "trusted publisher", "role": "fineGrained", "fineGrained": {"scoped": [
                {"entity": {"type": repo_type, "name": repo_id}, "permissions": ["repo.content.read", "repo.write"]}]}}
        self._json({"type": "user", "name": user, "orgs": orgs, "auth": {"type": "access_token", "accessToken": token}})

    def oauth_token(self) -> None:
        """Trusted Publishers (RFC 8693): an OIDC id token the repo trusts, for a short-lived token scoped to it."""
        try:
            key = self.hub.trust.resolve(self._json_body(), audience=self.base)
            if key not in self.hub.repos:
                raise OAuthError("invalid_grant", "The subject token does not match any trusted publisher for this resource")
        except OAuthError as e:
            self._json({"error": e.code, "error_description": e.description}, 400)
            return
        self._json({"access_token": self.hub.mint_scoped_token(key), "token_type": "bearer",
                    "expires_in": HUB_TOKEN_TTL, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"})

    def create(self) -> None:
        body = self._json_body()
        user, role = self._user()
        ns = body.get("organization") or user or ""
        if self._scope() is not None:
            raise HttpError(403, "A trusted-publisher token cannot create repositories")
        self._can_write_ns(user, role, ns)
        repo_type = body.get("type") or "model"
        repo_id = f"{ns}/{body['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.base}/{prefix}{repo_id}"
        if f"{repo_type}:{repo_id}" in self.hub.repos:
            self._json({"error": "You already created this model repo", "url": url}, 409)
            return
        private = body["visibility"] == "private" if "visibility" in body else bool(body.get("private", False))
        self.hub.create_repo(repo_type, repo_id, private)
        self._json({"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    def delete(self) -> None:
        body = self._json_body()
        ns = body.get("organization") or self._user()[0] or ""
        repo = self._repo(body.get("type") or "model", ns, body["name"], write=True)
        if self._scope() is not None:
            raise HttpError(403, "A trusted-publisher token cannot delete repositories")
        with self.hub.lock:
            del self.hub.repos[f"{repo.type}:{repo.id}"]
        self._json({})

    def settings(self, type: str, ns: str, name: str) -> None:
        repo = self._repo(type, ns, name, write=True)
        body = self._json_body()
        if "visibility" in body:
            repo.private = body["visibility"] == "private"
        elif "private" in body:
            repo.private = bool(body["private"])
        self._json({})

    def validate_yaml(self) -> None:
        errors, warnings = _front_matter_errors(self._json_body().get("content", ""))
        self._json({"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]},
                   400 if errors else 200)

    def info(self, type: str, ns: str, name: str, rev: str = "main") -> None:
        repo = self._repo(type, ns, name)
        oid, tree = self._resolve(repo, rev)
        siblings = [{"rfilename": p, "size": e.size, "blobId": e.oid} for p, e in sorted(tree.items())]
        self._json({"id": repo.id, "modelId": repo.id, "sha": oid, "private": repo.private, "siblings": siblings,
                    "gated": "manual" if repo.gated else False,
                    "lastModified": "2026-01-01T00:00:00.000Z", "author": ns, "tags": [], "downloads": 0})

    def tree(self, type: str, ns: str, name: str, rev: str, path: str = "") -> None:
        repo = self._repo(type, ns, name)
        _, files = self._resolve(repo, rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HttpError(404, f"{path} does not exist", code="EntryNotFound")
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries: dict[str, dict[str, Any]] = {}
        for p, e in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                d = prefix + "/".join(parts[:depth])
                if depth == 1 or recursive:
                    entries.setdefault(d, {"type": "directory", "oid": git_blob_oid(d.encode()), "size": 0, "path": d})
            if len(parts) == 1 or recursive:
                item: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": p}
                if e.lfs:
                    item["lfs"] = {"oid": e.lfs, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs, e.size))}
                entries[p] = item
        self._json(list(entries.values()))

    def preupload(self, type: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(type, ns, name, write=True)
        body = self._json_body()
        _, tree = self._resolve(repo, rev)
        attrs = tree.get(".gitattributes")
        lfs_patterns = [line.split()[0] for line in (attrs.data or b"").decode().splitlines()
                        if attrs and "filter=lfs" in line]
        out = []
        for f in body["files"]:
            sample = base64.b64decode(f["sample"])
            is_lfs = (f["size"] >= LFS_SIZE_THRESHOLD or b"\0" in sample
                      or any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], pat) for pat in lfs_patterns))
            remote = tree.get(f["path"])
            oid = None
            if remote is not None:
                oid = remote.lfs if is_lfs else (remote.oid if remote.lfs is None else None)
            out.append({"path": f["path"], "uploadMode": "lfs" if is_lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._json({"files": out})

    def branch(self, type: str, ns: str, name: str, branch: str) -> None:
        repo = self._repo(type, ns, name, write=True)
        start = self._json_body().get("startingPoint") or "main"
        if branch in repo.refs:
            raise HttpError(409, f"Branch {branch} already exists")
        repo.refs[branch], _ = self._resolve(repo, start)
        self._json({})

    def xet_token(self, type: str, ns: str, name: str, rev: str) -> None:
        raise HttpError(404, "Xet is not served by this Hub")

    def commit(self, type: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(type, ns, name, write=True)
        if not self.headers.get("Content-Type", "").startswith("application/x-ndjson"):
            raise HttpError(400, "commit payload must be application/x-ndjson")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "the first line must be the commit header")
        header = lines[0]["value"]
        head, tree = self._resolve(repo, rev)
        create_pr = self.query.get("create_pr") == "1"
        parent = header.get("parentCommit")
        if parent and not create_pr and parent != head:
            raise HttpError(412, f"A commit has happened since. Please refresh and try again. ({parent} != {head})")
        with self.hub.lock:
            new_tree = self._apply(repo, dict(repo.commits[parent] if parent and create_pr else tree), lines[1:])
            oid = self.hub._new_commit(repo, new_tree)
            repo.titles[oid] = header.get("summary", "")
            pr_url = None
            if create_pr:
                repo.prs += 1
                repo.refs[f"refs/pr/{repo.prs}"] = oid
                pr_url = f"{self.base}/{repo.id}/discussions/{repo.prs}"
            else:
                repo.refs[rev] = oid
        self._json({"success": True, "commitOid": oid, "commitUrl": f"{self.base}/{repo.id}/commit/{oid}",
                    "pullRequestUrl": pr_url})

    def _apply(self, repo: Repo, tree: dict[str, Entry], ops: list[dict[str, Any]]) -> dict[str, Entry]:
        for op in ops:
            key, value = op["key"], op["value"]
            path = value["path"]
            if key == "file":
                tree[path] = _regular(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                data = repo.lfs.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    raise HttpError(400, f"{path}: LFS object {value['oid']} of size {value['size']} was not uploaded")
                tree[path] = _lfs_entry(value["oid"], value["size"])
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            elif key == "deletedFolder":
                gone = [p for p in tree if p.startswith(path.rstrip("/") + "/")]
                if not gone:
                    raise HttpError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in gone:
                    del tree[p]
            else:
                raise HttpError(400, f"unsupported commit operation {key!r}")
        return tree

    # ---- LFS ------------------------------------------------------------------------------------------------------
    def lfs_batch(self, ns: str, name: str, prefix: str = "") -> None:
        repo = self._repo("dataset" if prefix else "model", ns, name, write=True)
        body = self._json_body()
        if body.get("operation") != "upload" or body.get("hash_algo", "sha256") != "sha256":
            raise HttpError(400, "only sha256 uploads are supported")
        out = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                raise HttpError(422, f"invalid object {obj}")
            if oid in self.hub.lfs_errors:
                code, message = self.hub.lfs_errors[oid]
                out.append({"oid": oid, "size": size, "error": {"code": code, "message": message}})
            elif oid in repo.lfs:
                out.append({"oid": oid, "size": size})  # no actions: already stored, nothing to send
            else:
                out.append({"oid": oid, "size": size, "authenticated": True, "actions": self._actions(repo, oid, size)})
        self._json({"transfer": "basic", "objects": out})

    def _actions(self, repo: Repo, oid: str, size: int) -> dict[str, Any]:
        session = uuid.uuid4().hex
        self.hub.uploads[session] = Upload(repo, oid, size)
        verify = {"href": f"{self.base}/{repo.id}.git/info/lfs/objects/verify"}
        if size < self.hub.multipart_threshold:
            return {"upload": {"href": f"{self.base}/_lfs/put/{session}"}, "verify": verify}
        chunk = self.hub.chunk_size
        header = {"chunk_size": str(chunk)}
        header.update({str(i): f"{self.base}/_lfs/part/{session}/{i}" for i in range(1, math.ceil(size / chunk) + 1)})
        return {"upload": {"href": f"{self.base}/_lfs/complete/{session}", "header": header}, "verify": verify}

    def _store(self, upload: Upload, data: bytes, transfer: str) -> None:
        if len(data) != upload.size or hashlib.sha256(data).hexdigest() != upload.oid:
            raise HttpError(400, f"content does not match oid {upload.oid} / size {upload.size}")
        with self.hub.lock:
            upload.repo.lfs[upload.oid] = data
            self.hub.stored[upload.oid] += 1
            self.hub.transfers[transfer] += 1

    def _upload(self, session: str) -> Upload:
        upload = self.hub.uploads.get(session)
        if upload is None:
            raise HttpError(404, "unknown upload session")
        return upload

    def lfs_put(self, session: str) -> None:
        upload = self._upload(session)
        self._store(upload, self._body(link=True), "basic")
        self._json({})

    def lfs_part(self, session: str, part: str) -> None:
        data = self._body(link=True)
        self._upload(session).parts[int(part)] = data
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, "text/plain")

    def lfs_complete(self, session: str) -> None:
        upload = self._upload(session)
        body = self._json_body()
        if body.get("oid") != upload.oid:
            raise HttpError(400, "completion oid does not match the upload")
        chunks = []
        for p in sorted(body["parts"], key=lambda p: p["partNumber"]):
            data = upload.parts.get(p["partNumber"])
            if data is None or p["etag"] != f'"{hashlib.md5(data).hexdigest()}"':
                raise HttpError(400, f"part {p['partNumber']} missing or its etag differs")
            chunks.append(data)
        self._store(upload, b"".join(chunks), "multipart")
        self._json({})

    def lfs_verify(self, ns: str, name: str, prefix: str = "") -> None:
        repo = self._repo("dataset" if prefix else "model", ns, name)
        body = self._json_body()
        data = repo.lfs.get(body.get("oid", ""))
        if data is None or len(data) != body.get("size"):
            raise HttpError(404, "object not found")
        self._json({})

    # ---- downloads ------------------------------------------------------------------------------------------------
    def resolve(self, ns: str, name: str, rev: str, path: str, prefix: str = "") -> None:
        repo = self._repo("dataset" if prefix else "model", ns, name)
        self._gate(repo)
        oid, tree = self._resolve(repo, rev)
        entry = tree.get(path)
        if entry is None:
            raise HttpError(404, f"{path} not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        data = repo.lfs[entry.lfs] if entry.lfs else entry.data or b""
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry.oid}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": str(entry.size)})
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            start, end = int(rng.group(1)), int(rng.group(2) or len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start:end + 1], headers, "application/octet-stream")
            return
        self._send(200, data, headers, "application/octet-stream")


ROUTES: list[tuple[str, str, str]] = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/oauth/token", "oauth_token"),
    ("POST", r"/api/repos/create", "create"),
    ("DELETE", r"/api/repos/delete", "delete"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", REPO_ROUTE, "info"),
    ("GET", REPO_ROUTE + r"/revision/(?P<rev>[^/]+)", "info"),
    ("GET", REPO_ROUTE + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", REPO_ROUTE + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", REPO_ROUTE + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", REPO_ROUTE + r"/branch/(?P<branch>[^/]+)", "branch"),
    ("PUT", REPO_ROUTE + r"/settings", "settings"),
    ("GET", REPO_ROUTE + r"/xet-write-token/(?P<rev>[^/]+)", "xet_token"),
    ("PUT", r"/_lfs/put/(?P<session>\w+)", "lfs_put"),
    ("PUT", r"/_lfs/part/(?P<session>\w+)/(?P<part>\d+)", "lfs_part"),
    ("POST", r"/_lfs/complete/(?P<session>\w+)", "lfs_complete"),
    ("POST", GIT_ROUTE + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", GIT_ROUTE + r"\.git/info/lfs/objects/verify", "lfs_verify"),
    ("GET", GIT_ROUTE + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", GIT_ROUTE + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
