"""Model references: a local folder, or a Hub id `ORG/NAME[@REVISION]` downloaded into the Hugging Face cache.

Only what the commands read is downloaded (safetensors, their index, JSON configs, tokenizer and processor files),
never pickled weights. The environment is read at call time (HF_ENDPOINT, HF_HOME/HF_HUB_CACHE, HF_HUB_OFFLINE,
HF_TOKEN), so values set after huggingface_hub was imported still count. Under torchrun rank 0 downloads while the
others wait; a rank that then cannot find the snapshot has a cache of its own (per node), and the first such rank
of each cache downloads it once. The token is only handed to huggingface_hub; messages are redacted."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubexport.card_metadata import REPO_ID_RE
from hubexport.dist import Dist
from hubexport.errors import HubexportError, ResolveError
from hubexport.hub import current_endpoint
from hubexport.redaction import redacted_line

MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "*.json", "README.md", "*.model", "*.tiktoken",
               "merges.txt", "vocab.*", "*.jinja")  # weights, configs, tokenizer/processor files, chat templates
CARD_FILES = ("README.md", "config.json")  # what `card --base-model` reads: the license and the architecture
PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")  # never fetched, even if a pattern above matches


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a folder holding config.json and the weights
    repo_id: str | None = None  # None for a local folder
    revision: str | None = None  # as asked for; None means the default branch
    sha: str | None = None  # the commit the files come from; None for a local folder

    def __str__(self) -> str:
        return str(self.path) if self.repo_id is None else f"{self.repo_id}@{self.sha}"

    def as_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "repo_id": self.repo_id, "revision": self.revision, "sha": self.sha}


def parse_hub_ref(ref: str, purpose: str) -> tuple[str, str | None]:
    """`ORG/NAME[@REVISION]` -> (repo id, revision or None)."""
    repo_id, _, revision = ref.partition("@")
    if not REPO_ID_RE.fullmatch(repo_id) or (_ and not revision):
        raise ResolveError(f"{purpose} {ref}: no such folder, and not a Hub id",
                           hint="pass a local model folder or ORG/NAME[@REVISION]")
    return repo_id, revision or None


def hub_environment() -> tuple[str, Path, bool]:
    """(endpoint, cache folder, offline), from the environment as it is now, falling back to huggingface_hub's."""
    from huggingface_hub import constants

    endpoint = current_endpoint()
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(home) / "hub") if home else constants.HF_HUB_CACHE)
    flag = os.environ.get("HF_HUB_OFFLINE")
    offline = constants.HF_HUB_OFFLINE if flag is None else flag.strip().upper() in ("1", "ON", "YES", "TRUE")
    return endpoint, Path(cache).expanduser(), offline


def resolve_model(ref: str | Path, *, purpose: str, log: Callable[[str], None], dist: Dist | None = None,
                  files: Sequence[str] = MODEL_FILES) -> ResolvedModel:
    """A local folder as it is, or a Hub id downloaded (only `files`) into the cache. `purpose` names the flag in
    messages (e.g. "--hf-model-path"). Collective under torchrun: every rank must call it."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return ResolvedModel(path)
    repo_id, revision = parse_hub_ref(str(ref), purpose)
    hub = _Hub(repo_id, revision, purpose, files, *hub_environment())
    dist = dist or Dist()
    if hub.offline:
        folder, error = _attempt(lambda: hub.fetch(local=True, revision=revision))
        dist.sync(error)
    else:
        folder = _download_once_per_cache(hub, dist, log)
    assert folder is not None
    resolved = ResolvedModel(folder, repo_id, revision, folder.name)  # .../snapshots/<commit sha>
    _check_weights(resolved, purpose, files)
    if dist.is_main:
        log(f"{purpose} {repo_id}{'@' + revision if revision else ''}: commit {resolved.sha} ({folder})")
    return resolved


def resolve_cached(ref: str, *, purpose: str) -> ResolvedModel | None:
    """A Hub id whose snapshot is in the cache, found without any request (never a download); None when it is not
    there. The caller checks that the files it needs are complete."""
    try:
        repo_id, revision = parse_hub_ref(str(ref), purpose)
    except ResolveError:
        return None
    hub = _Hub(repo_id, revision, purpose, MODEL_FILES, *hub_environment())
    folder, _ = _attempt(lambda: hub.fetch(local=True, revision=revision))
    return ResolvedModel(folder, repo_id, revision, folder.name) if folder is not None else None


@dataclass(frozen=True)
class _Hub:
    repo_id: str
    revision: str | None
    purpose: str
    files: Sequence[str]
    endpoint: str
    cache: Path
    offline: bool

    def fetch(self, *, local: bool, revision: str | None) -> Path:
        from huggingface_hub import snapshot_download

        with self.errors():
            return Path(snapshot_download(self.repo_id, revision=revision, cache_dir=self.cache, endpoint=self.endpoint,
                                          allow_patterns=list(self.files), ignore_patterns=list(PICKLES),
                                          local_files_only=local))

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """huggingface_hub's failures as one redacted line naming the repo."""
        import httpx2
        from huggingface_hub import get_token
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        name = f"{self.purpose} {self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        token_hint = f"set HF_TOKEN to a token from {self.endpoint}/settings/tokens"
        try:
            yield
        except HubexportError:
            raise
        except GatedRepoError as e:
            raise self._error(e, get_token(), f"{name} is gated on {self.endpoint}",
                              f"accept its terms at {self.endpoint}/{self.repo_id} and {token_hint}") from None
        except RepositoryNotFoundError as e:
            raise self._error(e, get_token(), f"{name}: no such repo on {self.endpoint}, or it is private",
                              f"check the id; for a private repo {token_hint}") from None
        except RevisionNotFoundError as e:
            raise self._error(e, get_token(), f"{name}: the repo has no revision {self.revision}",
                              "use a branch, tag or commit sha of the repo") from None
        except LocalEntryNotFoundError as e:
            if self.offline:
                raise ResolveError(f"{name} is not in the cache {self.cache} and HF_HUB_OFFLINE is set",
                                   hint="download it once without HF_HUB_OFFLINE, or pass a local folder") from None
            raise self._error(e, get_token(), f"{name}: cannot download from {self.endpoint}",
                              "check HF_ENDPOINT and the network, then re-run") from None
        except HfHubHTTPError as e:
            status = e.response.status_code
            hint = {401: f"the token was rejected: {token_hint}", 403: "the token has no access to this repo"}.get(
                status, "re-run: files already downloaded are kept")
            raise self._error(e, get_token(), f"{name}: HTTP {status} from {self.endpoint}", hint) from None
        except (httpx2.TransportError, OSError) as e:  # OSError: a file that arrived short after the retries
            raise self._error(e, get_token(), f"{name}: download from {self.endpoint} failed",
                              "re-run: files already downloaded are kept") from None

    @staticmethod
    def _error(e: Exception, token: str | None, message: str, hint: str) -> ResolveError:
        detail = getattr(e, "server_message", None) or (str(e).splitlines() or [type(e).__name__])[0]
        return ResolveError(redacted_line(f"{message}: {detail}", [token] if token else []), hint=hint)


def _attempt(fn: Callable[[], Path]) -> tuple[Path | None, HubexportError | None]:
    try:
        return fn(), None
    except HubexportError as e:
        return None, e


def _download_once_per_cache(hub: _Hub, dist: Dist, log: Callable[[str], None]) -> Path:
    """Rank 0 downloads; the others then look in their cache. Where the snapshot is not there (a cache per node), the
    lowest such rank of each (host, cache folder) downloads it, pinned to rank 0's commit, and its peers wait."""
    folder, error = None, None
    if dist.is_main:
        log(f"{hub.purpose}: fetching {hub.repo_id} from {hub.endpoint} (cache {hub.cache}: cached files are kept)")
        folder, error = _attempt(lambda: hub.fetch(local=False, revision=hub.revision))
    dist.sync(error)
    sha = dist.gather(folder.name if folder else None)[0]
    if not dist.is_main:
        folder, _ = _attempt(lambda: hub.fetch(local=True, revision=sha))
    key = (socket.gethostname(), str(hub.cache.resolve()))
    found = dist.gather((key, folder is not None))
    missing = [r for r, (k, ok) in enumerate(found) if not ok]
    if not missing:
        assert folder is not None
        return folder
    if [r for r in missing if found[r][0] == key][:1] == [dist.rank]:
        log(f"{hub.purpose}: rank {dist.rank} has a cache of its own ({hub.cache}): downloading {hub.repo_id}@{sha}")
        folder, error = _attempt(lambda: hub.fetch(local=False, revision=sha))
    dist.sync(error)
    if folder is None:
        folder, error = _attempt(lambda: hub.fetch(local=True, revision=sha))
    dist.sync(error)
    assert folder is not None
    return folder


def _check_weights(model: ResolvedModel, purpose: str, files: Sequence[str]) -> None:
    if "*.safetensors" in files and not any(model.path.rglob("*.safetensors")):
        raise ResolveError(f"{purpose} {model}: the repo has no *.safetensors weights",
                           hint="hubexport never loads pickled weights (*.bin, *.pt): use a repo with safetensors")
