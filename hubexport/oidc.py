"""Keyless publishing from CI (Hugging Face Trusted Publishers): the job's OIDC id token is exchanged for a Hub token
that lasts one hour and can write to one repo only.

The exchange is huggingface_hub's own (`get_token()` with `HF_OIDC_RESOURCE` set): it takes `HF_OIDC_ID_TOKEN`, or
mints an id token from GitHub (`GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=<endpoint>` with
`Authorization: Bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN`, both set only in jobs with `permissions: id-token: write`),
and posts it to `{endpoint}/oauth/token` (RFC 8693 token exchange, `resource` = the repo). This module adds what the
GitHub Action needs around it: one error line for each way it fails, and the token written to a file only its owner
can read, so it never passes through a command line, an environment dump or a log."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from hubexport.errors import HubError, TargetError
from hubexport.hub import current_endpoint
from hubexport.redaction import known_secrets, redact

GITHUB_VARS = ("ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN")
PERMISSION_HINT = "give the job `permissions: id-token: write` (GitHub sets these variables only then)"


@contextlib.contextmanager
def _oidc_resource(repo_id: str, endpoint: str) -> Iterator[None]:
    """huggingface_hub exchanges for `HF_OIDC_RESOURCE` at `constants.ENDPOINT` (also the id token's audience), which
    it froze at import: both are set for the call and restored after, as hub.py does for HF_HUB_DISABLE_XET."""
    from huggingface_hub import constants

    before = os.environ.get("HF_OIDC_RESOURCE"), constants.ENDPOINT
    os.environ["HF_OIDC_RESOURCE"], constants.ENDPOINT = repo_id, endpoint
    try:
        yield
    finally:
        if before[0] is None:
            os.environ.pop("HF_OIDC_RESOURCE", None)
        else:
            os.environ["HF_OIDC_RESOURCE"] = before[0]
        constants.ENDPOINT = before[1]


def _clean(text: object) -> str:
    return redact(" ".join(str(text).split()), known_secrets())


def _from_github(url: object) -> bool:
    """Whether a failed request went to GitHub's id token endpoint (else it was the Hub's exchange)."""
    github, failed = urlsplit(os.environ.get(GITHUB_VARS[0], "")), urlsplit(str(url))
    return bool(github.netloc) and (github.netloc, github.path) == (failed.netloc, failed.path)


def _http_error(url: object, status: int, detail: str, repo_id: str, endpoint: str) -> HubError:
    if _from_github(url):
        return HubError(f"GitHub's OIDC token endpoint (ACTIONS_ID_TOKEN_REQUEST_URL) answered HTTP {status}: {detail}",
                        hint="GitHub could not issue an id token for this job: re-run it; if it persists, check "
                             "githubstatus.com")
    return HubError(f"{endpoint} refused the OIDC exchange for {repo_id}: HTTP {status}: {detail}",
                    hint=f"add a Trusted Publisher to {endpoint}/{repo_id}/settings whose claims (repository, workflow, "
                         "ref) match this job exactly; the repo must already exist")


def exchange(repo_id: str, log: Callable[[str], None] = print) -> str:
    """A Hub token for `repo_id` from this job's OIDC id token, or one HubError naming what failed."""
    import httpx2
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, OIDCError

    from hubexport.card import REPO_ID_RE

    if not REPO_ID_RE.fullmatch(repo_id):
        raise HubError(f"--repo-id {repo_id!r} is not namespace/name",
                       hint="a trusted-publisher token is for one existing repo: name it in full, e.g. my-org/model")
    if not os.environ.get("HF_OIDC_ID_TOKEN") and not all(os.environ.get(v) for v in GITHUB_VARS):
        raise HubError(f"no OIDC id token for this job: {' and '.join(GITHUB_VARS)} are not set", hint=PERMISSION_HINT)
    endpoint = current_endpoint()
    with _oidc_resource(repo_id, endpoint):
        try:
            token = get_token()
        except OIDCError as e:  # e.g. not in GitHub Actions, and no HF_OIDC_ID_TOKEN
            raise HubError(f"OIDC exchange for {repo_id} not possible: {_clean(e)}", hint=PERMISSION_HINT) from None
        except HfHubHTTPError as e:
            detail = _clean(e.server_message or str(e).splitlines()[0])
            raise _http_error(e.response.request.url, e.response.status_code, detail, repo_id, endpoint) from None
        except httpx2.TransportError as e:
            where = "GitHub's OIDC token endpoint" if _from_github(e.request.url) else endpoint
            raise HubError(f"cannot reach {where} for the OIDC exchange: {_clean(e) or type(e).__name__}",
                           hint="check the runner's network and HF_ENDPOINT, then re-run") from None
        except (KeyError, ValueError) as e:  # an answer without `value` / `access_token`, or not JSON
            raise HubError(f"the OIDC exchange for {repo_id} got a malformed answer: {_clean(repr(e))}",
                           hint="re-run; if it persists, the Hub or GitHub changed the protocol") from None
    if not token:
        raise HubError(f"{endpoint} returned an empty token for {repo_id}", hint="re-run the job")
    log(f"exchanged this job's OIDC id token for a short-lived token for {repo_id} on {endpoint}")
    return token


def write_private(path: Path, secret: str) -> None:
    """Write `secret` to `path` readable by its owner only, in one rename: never half-written, never through a link."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 600
    except OSError as e:
        raise TargetError(f"cannot write the token file {path}: {e.strerror}", hint="pass a writable --output") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
