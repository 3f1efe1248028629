"""Publishing to the Hub: preflight (token, role, namespace), repo and branch, then one commit holding what changed.

Re-runs are safe: files whose content the repo already has are not sent, a run with nothing new makes no commit,
and an interrupted upload resumes because the Hub answers "already stored" for LFS objects it holds. The card is
rendered into the folder as README.md when the folder has none; an existing README.md is the user's and is kept.
The token is passed to huggingface_hub only; every message that could echo it goes through `_Session.redact`."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hubexport.card import REPO_ID_RE, CardOptions, find_training_config, render_card, sha256_file, validate_card
from hubexport.detect import is_hf_folder
from hubexport.errors import HubError, HubexportError

if TYPE_CHECKING:
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    from hubexport.convert import MergeResult

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


@dataclass(frozen=True)
class LocalFile:
    path: str  # in the repo, posix
    file: Path
    size: int
    sha256: str


@dataclass
class _Session:
    api: HfApi
    endpoint: str
    token: str
    log: Callable[[str], None]
    user: str = ""

    def redact(self, text: str) -> str:
        """One line, no token: huggingface_hub errors can quote headers or the token itself."""
        text = text.replace(self.token, "***")
        text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
        text = " ".join(text.split())
        return text if len(text) <= 400 else text[:397] + "..."


def git_blob_oid(path: Path) -> str:
    """The oid git (and the Hub) gives a regular file: sha1 of 'blob <size>\\0' + content."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---- session and errors ---------------------------------------------------------------------------------------------
def _session(endpoint: str | None, token: str | None, log: Callable[[str], None]) -> _Session:
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed", hint="unset HF_HUB_OFFLINE to push")
    # HF_ENDPOINT is read here, not at import time, so a value set after huggingface_hub was imported still counts.
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
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
def _errors(s: _Session, action: str, repo_id: str = "") -> Iterator[None]:
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


@contextlib.contextmanager
def _xet_only_on_hf(endpoint: str) -> Iterator[None]:
    """huggingface_hub picks Xet whenever hf_xet is importable, and Xet exists only on huggingface.co: elsewhere it
    fails at /xet-write-token, so it is switched off for other endpoints (restored afterwards)."""
    from huggingface_hub import constants

    host = urlsplit(endpoint).hostname or ""
    before = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = before or not (host == HUB_HOSTS[0] or host.endswith(HUB_HOSTS[1]))
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = before


def _preflight(s: _Session, repo_id: str) -> str:
    """whoami once, then refuse read-only tokens and namespaces the user cannot write to. Returns the full repo id."""
    with _errors(s, "checking the token"):
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
def _ensure_repo(s: _Session, repo_id: str, private: bool, dry_run: bool) -> tuple[str, bool, bool]:
    """Returns (url, visibility, exists). An existing repo keeps its visibility: a mismatch is a warning."""
    from huggingface_hub.errors import RepositoryNotFoundError

    url = f"{s.endpoint}/{repo_id}"
    with _errors(s, f"looking up {repo_id}", repo_id):
        try:
            info = s.api.repo_info(repo_id)
        except RepositoryNotFoundError:
            info = None
    visibility = "private" if private else "public"
    if info is None:
        if dry_run:
            s.log(f"dry run: would create {visibility} repo {repo_id}")
            return url, private, False
        with _errors(s, f"creating {repo_id}", repo_id):
            url = str(s.api.create_repo(repo_id, private=private, exist_ok=True))
        s.log(f"created {visibility} repo {repo_id}")
        return url, private, True
    if bool(info.private) != private:
        actual = "private" if info.private else "public"
        s.log(f"warning: {repo_id} already exists and is {actual}; it stays {actual} although this run asked for "
              f"{visibility} (change it in the repo settings)")
    return url, bool(info.private), True


def _ensure_revision(s: _Session, repo_id: str, revision: str, exists: bool, dry_run: bool) -> str:
    """Create a missing branch from main. Returns the revision whose files the upload is compared against."""
    from huggingface_hub.errors import RevisionNotFoundError

    if revision == "main" or revision.startswith("refs/pr/") or not exists:
        return revision if exists else "main"
    if dry_run:
        with _errors(s, f"looking up {revision}", repo_id):
            try:
                s.api.repo_info(repo_id, revision=revision)
                return revision
            except RevisionNotFoundError:
                s.log(f"dry run: would create branch {revision} from main")
                return "main"
    with _errors(s, f"creating branch {revision}", repo_id):
        s.api.create_branch(repo_id, branch=revision, exist_ok=True)
    return revision


def _remote(s: _Session, repo_id: str, revision: str) -> tuple[str, dict[str, RepoFile]]:
    from huggingface_hub.hf_api import RepoFile

    with _errors(s, f"listing {repo_id}@{revision}", repo_id):
        head = s.api.repo_info(repo_id, revision=revision).sha or ""
        tree = s.api.list_repo_tree(repo_id, revision=head, recursive=True)
        return head, {f.path: f for f in tree if isinstance(f, RepoFile)}


def _local_files(folder: Path, known: Mapping[str, str]) -> list[LocalFile]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or IGNORED_DIRS.intersection(rel.parts[:-1]):
            continue
        size = path.stat().st_size
        out.append(LocalFile(rel.as_posix(), path, size, known.get(rel.as_posix()) or sha256_file(path)))
    return out


def _changed(f: LocalFile, remote: RepoFile | None) -> bool:
    if remote is None:
        return True
    if remote.lfs is not None:
        return remote.lfs.sha256 != f.sha256
    return remote.blob_id != git_blob_oid(f.file)


def _stale_weights(local: list[LocalFile], remote: Mapping[str, RepoFile]) -> list[str]:
    """Weight files on the Hub that this upload does not have (e.g. after re-sharding): left there, they would make
    the repo hold two models. Only when this upload carries weights itself."""
    names = {f.path for f in local}
    if not any(fnmatch.fnmatch(n, "*.safetensors") for n in names):
        return []
    return sorted(p for p in remote if p not in names and any(fnmatch.fnmatch(p, w) for w in WEIGHT_PATTERNS))


def _known_digests(merge_result: MergeResult | None, folder: Path) -> dict[str, str]:
    """sha256 the merge already computed, trusted only while the file still has the size the merge wrote."""
    if merge_result is None:
        return {}
    return {f.name: f.sha256 for f in merge_result.files
            if f.sha256 and (folder / f.name).is_file() and (folder / f.name).stat().st_size == f.size}


# ---- card ---------------------------------------------------------------------------------------------------------
def _prepare_card(s: _Session, folder: Path, repo_id: str, card: CardOptions | None, merge_result: MergeResult | None,
                  known: Mapping[str, str], dry_run: bool) -> str | None:
    """Validate the README that will be uploaded; render it when absent. Returns the text when it is not on disk."""
    readme = folder / "README.md"
    if readme.is_file():
        if card is not None and card != CardOptions():
            s.log("warning: README.md exists, so the card options were not used (run `hubexport card` to regenerate)")
        validate_card(readme.read_text())
        s.log("card: using the existing README.md")
        return None
    options = card or CardOptions()
    text = render_card(folder, merge_result=merge_result, base_model=options.base_model, license=options.license,
                       variables={"repo_id": repo_id, **options.variables}, card_data=options.card_data,
                       template=options.template, training_config=options.training_config, sha256=known, log=s.log)
    if dry_run:
        return text
    readme.write_text(text)
    s.log(f"card: wrote {readme}")
    return None


# ---- push ---------------------------------------------------------------------------------------------------------
def push_folder(
    folder: Path,
    *,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    merge_result: MergeResult | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    log: Callable[[str], None] = print,
    card: CardOptions | None = None,
) -> PushResult:
    """Upload a Hugging Face model folder: card, preflight, repo, branch, then one commit of what changed."""
    s = _session(endpoint, token, log)
    return _push_folder(s, Path(folder), repo_id=repo_id, private=private, revision=revision,
                        commit_message=commit_message, create_pr=create_pr, dry_run=dry_run, merge_result=merge_result,
                        card=card)


def _push_folder(s: _Session, folder: Path, *, repo_id: str, private: bool, revision: str | None,
                 commit_message: str | None, create_pr: bool, dry_run: bool, merge_result: MergeResult | None,
                 card: CardOptions | None) -> PushResult:
    if not (folder / "config.json").is_file():
        raise HubError(f"{folder} is not a Hugging Face model folder (no config.json)",
                       hint="pass the output of `hubexport merge`, or a training checkpoint to merge and push")
    known = _known_digests(merge_result, folder)
    # The card is checked before any request, so bad metadata never costs an upload.
    virtual_readme = _prepare_card(s, folder, repo_id, card, merge_result, known, dry_run)
    repo_id = _preflight(s, repo_id)
    return _push(s, folder, repo_id=repo_id, private=private, revision=revision or "main",
                 commit_message=commit_message or _default_message(merge_result), create_pr=create_pr,
                 dry_run=dry_run, known=known, virtual_readme=virtual_readme)


def _default_message(merge_result: MergeResult | None) -> str:
    step = merge_result.global_step if merge_result else None
    return f"Upload global_step_{step} with hubexport" if step is not None else "Upload model with hubexport"


def _push(s: _Session, folder: Path, *, repo_id: str, private: bool, revision: str, commit_message: str,
          create_pr: bool, dry_run: bool, known: Mapping[str, str], virtual_readme: str | None) -> PushResult:
    url, private, exists = _ensure_repo(s, repo_id, private, dry_run)
    base = _ensure_revision(s, repo_id, revision, exists, dry_run)
    head, remote = _remote(s, repo_id, base) if exists else ("", {})
    local = _local_files(folder, known)
    changed = [f for f in local if _changed(f, remote.get(f.path))]
    stale = _stale_weights(local, remote)
    n_files, n_bytes = len(changed), sum(f.size for f in changed)
    result = PushResult(repo_id, url, None, None, revision, private, n_files, n_bytes, no_op=False)
    if dry_run:
        return _report_dry_run(s, result, changed, stale, len(local), virtual_readme)
    if not changed and not stale:
        s.log(f"nothing changed: {repo_id}@{revision} already has these {len(local)} files; no commit made")
        return replace(result, commit_sha=head, commit_url=f"{url}/commit/{head}", no_op=True)
    s.log(f"uploading {n_files} of {len(local)} files ({n_bytes:,} bytes) to {repo_id}@{revision}"
          + (f", deleting {len(stale)} stale weight files" if stale else ""))
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list[Any] = []
    for f in changed:
        op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.file))
        op.upload_info.sha256 = bytes.fromhex(f.sha256)  # hashed once, here, not again by the client
        ops.append(op)
    ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
    with _errors(s, f"uploading to {repo_id}", repo_id), _xet_only_on_hf(s.endpoint):
        info = s.api.create_commit(repo_id, ops, commit_message=commit_message, revision=revision,
                                   create_pr=create_pr, parent_commit=head or None)
    s.log(f"committed {info.oid} to {repo_id}@{revision}" + (f"; pull request {info.pr_url}" if info.pr_url else ""))
    return replace(result, commit_sha=info.oid, commit_url=info.commit_url, pr_url=info.pr_url)


def _report_dry_run(s: _Session, result: PushResult, changed: list[LocalFile], stale: list[str], n_local: int,
                    virtual_readme: str | None) -> PushResult:
    for f in changed:
        s.log(f"  + {f.path} ({f.size:,} bytes)")
    if virtual_readme is not None:
        s.log(f"  + README.md ({len(virtual_readme.encode()):,} bytes, generated card)")
        result = replace(result, files_uploaded=result.files_uploaded + 1,
                         bytes_uploaded=result.bytes_uploaded + len(virtual_readme.encode()))
    for p in stale:
        s.log(f"  - {p} (stale weight file)")
    s.log(f"dry run: would upload {result.files_uploaded} files ({result.bytes_uploaded:,} bytes) to "
          f"{result.repo_id}@{result.revision}; {n_local - len(changed)} unchanged; nothing was sent")
    return replace(result, no_op=result.files_uploaded == 0 and not stale)


# ---- checkpoint → merge → card → push -----------------------------------------------------------------------------
@contextlib.contextmanager
def _merge_target(target_dir: Path | None) -> Iterator[Path]:
    if target_dir is not None:
        yield Path(target_dir)
        return
    with tempfile.TemporaryDirectory(prefix="hubexport-") as tmp:
        yield Path(tmp) / "model"


def publish(
    source: Path,
    *,
    repo_id: str,
    target_dir: Path | None = None,
    merge_options: Mapping[str, Any] | None = None,
    card: CardOptions | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    log: Callable[[str], None] = print,
) -> PushResult:
    """`hubexport push`: an HF folder is pushed as is; a training checkpoint is merged first (into `target_dir`, or a
    temporary directory removed afterwards), its card rendered with the training config found next to it."""
    source = Path(source)
    if not source.is_dir():
        raise HubError(f"{source} is not a directory", hint="pass a model folder or a global_step_N/actor checkpoint")
    s = _session(endpoint, token, log)
    push = dict(private=private, revision=revision, commit_message=commit_message, create_pr=create_pr,
                dry_run=dry_run)
    if is_hf_folder(source):
        return _push_folder(s, source, repo_id=repo_id, merge_result=None, card=card, **push)
    from hubexport.convert import merge

    repo_id = _preflight(s, repo_id)  # a bad token should fail before a long merge, not after it
    options = card or CardOptions()
    training_config = options.training_config or find_training_config(source)
    if training_config is not None:
        log(f"card: training config {training_config}")
    with _merge_target(target_dir) as out:
        result = merge(source, out, dry_run=dry_run, log=log, **(merge_options or {}))
        if dry_run:
            size = sum(f.size for f in result.files)
            log(f"dry run: would merge into {len(result.files)} files ({size:,} bytes) and push them to {repo_id}")
            return PushResult(repo_id, f"{s.endpoint}/{repo_id}", None, None, revision or "main", private,
                              len(result.files), size, no_op=False)
        return _push_folder(s, result.target_dir, repo_id=repo_id, merge_result=result,
                            card=replace(options, training_config=training_config), **push)
