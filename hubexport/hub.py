"""The Hub client side of publishing: a session (token, endpoint), the preflight (whoami, role, namespace), repo and
branch, then one commit holding what changed.

Re-runs are safe: files whose content the repo already has are not sent, a run with nothing new makes no commit,
and an interrupted upload resumes because the Hub answers "already stored" for LFS objects it holds. Files can come
from memory (the generated card), so publishing never writes into the folder it publishes.
The token is passed to huggingface_hub only; every message that could echo it goes through `_Session.redact`."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hubexport.card_metadata import REPO_ID_RE
from hubexport.errors import HubError, HubexportError
from hubexport.model_facts import ModelFacts, sha256_file
from hubexport.options import PushOptions
from hubexport.redaction import redacted_line

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.hf_api import RepoFile

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
IGNORED_DIRS = {".git", ".cache"}  # what upload_folder skips too: VCS data and huggingface_hub's local state
HUB_HOSTS = ("huggingface.co", ".huggingface.co")


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    commit_sha: str | None
    commit_url: str | None
    revision: str
    private: bool
    files_uploaded: int  # files in the commit (new or changed); on --dry-run, files that would be
    bytes_uploaded: int  # their size; LFS objects the Hub already stored are not sent again
    no_op: bool
    pr_url: str | None = None
    target_dir: str | None = None  # the folder that was uploaded, unless it was a temporary merge (removed)
    model: ModelFacts | None = None  # what was merged from what, and the shards with sizes and sha256
    dry_run: bool = False
    delta: dict | None = None  # the publish gate's findings vs the base model (gate.Delta.summary)
    evaluation: dict | None = None  # the step published and its validation values (evidence.Evidence.summary)


@dataclass(frozen=True)
class LocalFile:
    path: str  # in the repo, posix
    file: Path | bytes  # a file on disk, or content made in memory (the generated card)
    size: int
    sha256: str

    def content(self) -> bytes:
        return self.file if isinstance(self.file, bytes) else self.file.read_bytes()


@dataclass
class _Session:
    api: HfApi
    endpoint: str
    token: str
    log: Callable[[str], None]
    user: str = ""

    def redact(self, text: str) -> str:
        """huggingface_hub errors can quote headers or the token itself."""
        return redacted_line(text, [self.token])


def git_blob_oid(data: bytes) -> str:
    """The oid git (and the Hub) gives a regular file: sha1 of 'blob <size>\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def current_endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub froze its own copy at import time), else huggingface.co."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# ---- session and errors ---------------------------------------------------------------------------------------------
def connect(endpoint: str | None, token: str | None, log: Callable[[str], None]) -> _Session:
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed", hint="unset HF_HUB_OFFLINE to push")
    # HF_ENDPOINT is read here, not at import time, so a value set after huggingface_hub was imported still counts.
    endpoint = endpoint.rstrip("/") if endpoint else current_endpoint()
    token = token or get_token()
    if not token:
        raise HubError(f"no Hugging Face token found for {endpoint}",
                       hint=f"export HF_TOKEN=<a write token from {endpoint}/settings/tokens>, or run `hf auth login`")
    return _Session(HfApi(endpoint=endpoint, token=token), endpoint, token, log)


_STATUS_HINTS = {
    401: "the token was rejected: set HF_TOKEN to a valid token from {endpoint}/settings/tokens",
    403: "the token lacks write access to {namespace}: use a write token, or a fine-grained one with write access",
    404: "check --repo-id and --revision, and that the token can see the repo",
    412: "someone pushed to the branch during the upload: re-run to upload on top of it",
    429: "rate limited by the Hub: wait a few minutes and re-run; stored files are not sent again",
}


@contextlib.contextmanager
def errors(s: _Session, action: str, repo_id: str = "") -> Iterator[None]:
    """Turn huggingface_hub and network failures into one redacted line with a remedy."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    namespace = repo_id.split("/")[0] if repo_id else "the namespace"
    try:
        yield
    except HubexportError:
        raise
    except LocalTokenNotFoundError:
        raise HubError(f"no Hugging Face token found for {s.endpoint}", hint="export HF_TOKEN") from None
    except HfHubHTTPError as e:
        status = e.response.status_code
        detail = e.server_message or str(e).splitlines()[0]
        hint = _STATUS_HINTS.get(status, "re-run: stored files are not sent again" if status >= 500 else None)
        raise HubError(s.redact(f"{action} failed: HTTP {status}: {detail}"),
                       hint=hint and hint.format(endpoint=s.endpoint, namespace=namespace)) from None
    except (httpx2.TransportError, ConnectionError) as e:  # ConnectionError: what the Xet path raises
        raise HubError(s.redact(f"cannot reach {s.endpoint} while {action}: {e or type(e).__name__}"),
                       hint="check HF_ENDPOINT and the network, then re-run: stored files are not sent again") from None
    except ValueError as e:  # the client's own checks: README metadata refused, LFS batch errors, bad server answers
        hint = "nothing was committed; fix the cause and re-run"
        raise HubError(s.redact(f"{action} failed: {e}"), hint=hint) from None


class _XetSwitch:
    """The process-wide Xet setting while uploads (on several threads) are in flight: saved by the first, restored
    by the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uploads = 0
        self.saved = False


_xet = _XetSwitch()


@contextlib.contextmanager
def xet_only_on_hf(endpoint: str) -> Iterator[None]:
    """huggingface_hub picks Xet whenever hf_xet is importable, and Xet exists only on huggingface.co: elsewhere it
    fails at /xet-write-token, so it is switched off for other endpoints, and restored when the last upload in
    flight is done (several threads upload at once)."""
    from huggingface_hub import constants

    host = urlsplit(endpoint).hostname or ""
    with _xet.lock:
        if not _xet.uploads:
            _xet.saved = constants.HF_HUB_DISABLE_XET
        _xet.uploads += 1
        constants.HF_HUB_DISABLE_XET = _xet.saved or not (host == HUB_HOSTS[0] or host.endswith(HUB_HOSTS[1]))
    try:
        yield
    finally:
        with _xet.lock:
            _xet.uploads -= 1
            if not _xet.uploads:
                constants.HF_HUB_DISABLE_XET = _xet.saved


def preflight(s: _Session, repo_id: str) -> str:
    """whoami once, then refuse read-only tokens and namespaces the user cannot write to. Returns the full repo id."""
    with errors(s, "checking the token"):
        me = s.api.whoami(cache=True)
    s.user = me.get("name", "")
    if "/" not in repo_id:
        repo_id = f"{s.user}/{repo_id}"
    if not REPO_ID_RE.fullmatch(repo_id):
        raise HubError(f"--repo-id {repo_id!r} is not a valid repo id", hint="use namespace/name, e.g. my-org/model")
    role = (me.get("auth", {}).get("accessToken") or {}).get("role", "write")
    if role == "read":
        raise HubError(f"the token of {s.user} on {s.endpoint} is read-only",
                       hint=f"create a write token at {s.endpoint}/settings/tokens and set HF_TOKEN")
    namespace = repo_id.split("/")[0]
    org_roles = {o.get("name"): o.get("roleInOrg") for o in me.get("orgs", [])}
    # Fine-grained tokens carry per-repo scopes whoami does not spell out; the Hub itself answers for them.
    if role != "fineGrained" and namespace != s.user and org_roles.get(namespace, "read") == "read":
        raise HubError(f"{s.user} cannot write to the namespace {namespace}",
                       hint=f"push to {s.user}/<name>, or get write access to {namespace}")
    s.log(f"authenticated as {s.user} on {s.endpoint} ({role} token)")
    return repo_id


# ---- repo, branch, and what changed -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RepoTarget:
    """Where a commit goes: the repo (made if missing, unless a dry run) and the revision compared against."""

    url: str
    private: bool
    exists: bool
    base: str  # the revision whose files the upload is compared against
    created: bool  # this run created the repo


def open_target(s: _Session, repo_id: str, opts: PushOptions) -> RepoTarget:
    url, private, exists, created = _ensure_repo(s, repo_id, opts.private, opts.dry_run)
    return RepoTarget(url, private, exists, _ensure_revision(s, repo_id, opts.revision or "main", exists, opts.dry_run),
                      created)


def _ensure_repo(s: _Session, repo_id: str, private: bool | None, dry_run: bool) -> tuple[str, bool, bool, bool]:
    """Returns (url, is private, exists, created). An existing repo keeps its visibility: a mismatch is a warning. A
    new repo with neither --private nor --public gets the Hub's default (public), with a warning."""
    from huggingface_hub.errors import RepositoryNotFoundError

    url = f"{s.endpoint}/{repo_id}"
    with errors(s, f"looking up {repo_id}", repo_id):
        try:
            info = s.api.repo_info(repo_id)
        except RepositoryNotFoundError:
            info = None
    if info is not None:
        actual = "private" if info.private else "public"
        if private is not None and bool(info.private) != private:
            s.log(f"warning: {repo_id} already exists and is {actual}; it stays {actual} although this run asked for "
                  f"{'private' if private else 'public'} (change it in the repo settings)")
        return url, bool(info.private), True, False
    if private is None:
        s.log(f"warning: {repo_id} does not exist and will be created with the Hub's default visibility (public); "
              "pass --private to keep it private, or --public to say so")
    if dry_run:
        s.log(f"dry run: would create {'private' if private else 'public'} repo {repo_id}")
        return url, bool(private), False, False
    with errors(s, f"creating {repo_id}", repo_id):
        url = str(s.api.create_repo(repo_id, private=private, exist_ok=True))
        created_private = bool(s.api.repo_info(repo_id).private) if private is None else private
    s.log(f"created {'private' if created_private else 'public'} repo {repo_id}")
    return url, created_private, True, True


def _ensure_revision(s: _Session, repo_id: str, revision: str, exists: bool, dry_run: bool) -> str:
    """Create a missing branch from main. Returns the revision whose files the upload is compared against."""
    from huggingface_hub.errors import RevisionNotFoundError

    if revision == "main" or revision.startswith("refs/pr/") or not exists:
        return revision if exists else "main"
    if dry_run:
        with errors(s, f"looking up {revision}", repo_id):
            try:
                s.api.repo_info(repo_id, revision=revision)
                return revision
            except RevisionNotFoundError:
                s.log(f"dry run: would create branch {revision} from main")
                return "main"
    with errors(s, f"creating branch {revision}", repo_id):
        s.api.create_branch(repo_id, branch=revision, exist_ok=True)
    return revision


def _remote(s: _Session, repo_id: str, revision: str) -> tuple[str, dict[str, RepoFile]]:
    from huggingface_hub.hf_api import RepoFile

    with errors(s, f"listing {repo_id}@{revision}", repo_id):
        head = s.api.repo_info(repo_id, revision=revision).sha or ""
        tree = s.api.list_repo_tree(repo_id, revision=head, recursive=True)
        return head, {f.path: f for f in tree if isinstance(f, RepoFile)}


def local_files(folder: Path, known: Mapping[str, str], extra: Mapping[str, bytes]) -> list[LocalFile]:
    """The folder's files (hashed unless `known`), with `extra` (made in memory) in place of files of the same path."""
    out = [LocalFile(p, data, len(data), hashlib.sha256(data).hexdigest()) for p, data in extra.items()]
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or IGNORED_DIRS.intersection(rel.parts[:-1]) or rel.as_posix() in extra:
            continue
        size = path.stat().st_size
        out.append(LocalFile(rel.as_posix(), path, size, known.get(rel.as_posix()) or sha256_file(path)))
    return sorted(out, key=lambda f: f.path)


def _changed(f: LocalFile, remote: RepoFile | None) -> bool:
    if remote is None:
        return True
    if remote.lfs is not None:
        return remote.lfs.sha256 != f.sha256
    return remote.blob_id != git_blob_oid(f.content())


def _stale_weights(local: list[LocalFile], remote: Mapping[str, RepoFile]) -> list[str]:
    """Weight files on the Hub that this upload does not have (e.g. after re-sharding): left there, they would make
    the repo hold two models. Only when this upload carries weights itself."""
    names = {f.path for f in local}
    if not any(fnmatch.fnmatch(n, "*.safetensors") for n in names):
        return []
    return sorted(p for p in remote if p not in names and any(fnmatch.fnmatch(p, w) for w in WEIGHT_PATTERNS))


def upload(s: _Session, folder: Path, opts: PushOptions, *, repo_id: str, extra: Mapping[str, bytes],
           known: Mapping[str, str], facts: Callable[[dict[str, str]], ModelFacts], message: str,
           target: RepoTarget | None = None, sent: Mapping[str, CommitOperationAdd] | None = None) -> PushResult:
    """One commit of what differs between `folder` (plus `extra`) and the repo's revision; nothing when nothing does.
    `known` holds sha256 digests already computed; `facts` describes the model from every file's digest; `target`
    and `sent`: the repo opened and the LFS files already sent while the folder was being merged (upload_stream)."""
    revision = opts.revision or "main"
    target = target or open_target(s, repo_id, opts)
    head, remote = _remote(s, repo_id, target.base) if target.exists else ("", {})
    local = local_files(folder, known, extra)
    changed = [f for f in local if _changed(f, remote.get(f.path))]
    stale = _stale_weights(local, remote)
    n_files, n_bytes = len(changed), sum(f.size for f in changed)
    result = PushResult(repo_id, target.url, None, None, revision, target.private, n_files, n_bytes, no_op=False,
                        target_dir=str(folder), model=facts({f.path: f.sha256 for f in local}))
    if opts.dry_run:
        return _report_dry_run(s, result, changed, stale, len(local))
    if not changed and not stale:
        s.log(f"nothing changed: {repo_id}@{revision} already has these {len(local)} files; no commit made")
        return replace(result, commit_sha=head, commit_url=f"{target.url}/commit/{head}", no_op=True)
    from huggingface_hub import CommitOperationDelete

    ops: list[Any] = [_addition(f, (sent or {}).get(f.path)) for f in changed]
    early = [f for f, op in zip(changed, ops, strict=True) if op._is_uploaded]
    s.log(f"uploading {n_files - len(early)} of {len(local)} files ({n_bytes - sum(f.size for f in early):,} bytes) "
          f"to {repo_id}@{revision}" + (f", with {len(early)} sent during the merge" if early else "")
          + (f", deleting {len(stale)} stale weight files" if stale else ""))
    ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
    with errors(s, f"uploading to {repo_id}", repo_id), xet_only_on_hf(s.endpoint):
        info = s.api.create_commit(repo_id, ops, commit_message=opts.commit_message or message, revision=revision,
                                   create_pr=opts.create_pr, parent_commit=head or None)
    s.log(f"committed {info.oid} to {repo_id}@{revision}" + (f"; pull request {info.pr_url}" if info.pr_url else ""))
    return replace(result, commit_sha=info.oid, commit_url=info.commit_url, pr_url=info.pr_url)


def addition(path_in_repo: str, file: Path | bytes, sha256: str) -> CommitOperationAdd:
    from huggingface_hub import CommitOperationAdd

    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=file if isinstance(file, bytes) else str(file))
    op.upload_info.sha256 = bytes.fromhex(sha256)  # hashed once, by the writer or here, not again by the client
    return op


def _addition(f: LocalFile, sent: CommitOperationAdd | None) -> CommitOperationAdd:
    """The operation already sent for this content (its LFS object is stored: not sent again), or a new one."""
    if sent is not None and sent._is_uploaded and sent.upload_info.sha256.hex() == f.sha256 \
            and sent.upload_info.size == f.size:
        return sent
    return addition(f.path, f.file, f.sha256)


def _report_dry_run(s: _Session, result: PushResult, changed: list[LocalFile], stale: list[str],
                    n_local: int) -> PushResult:
    for f in changed:
        s.log(f"  + {f.path} ({f.size:,} bytes{', generated' if isinstance(f.file, bytes) else ''})")
    for p in stale:
        s.log(f"  - {p} (stale weight file)")
    s.log(f"dry run: would upload {result.files_uploaded} files ({result.bytes_uploaded:,} bytes) to "
          f"{result.repo_id}@{result.revision}; {n_local - len(changed)} unchanged; nothing was sent")
    return replace(result, no_op=result.files_uploaded == 0 and not stale, dry_run=True)
