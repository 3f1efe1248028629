"""Both sides of a Trusted Publishers exchange, for tests (docs: huggingface.co/docs/hub/trusted-publishers).

- `FakeGitHubOIDC` stands for GitHub's `ACTIONS_ID_TOKEN_REQUEST_URL`: `GET <url>&audience=<aud>` with
  `Authorization: Bearer <ACTIONS_ID_TOKEN_REQUEST_TOKEN>` answers `{"value": <id token>}`, a JWT with GitHub's claims
  (iss, aud, sub, repository, ref, workflow_ref, ...).
- `TrustedPublishers` is the Hub's side, used by tests/fakehub.py for `POST /oauth/token` (RFC 8693): it checks the
  id token's signature, issuer, audience, lifetime and the claims configured for the repo, and answers like the Hub:
  400 `invalid_request` for a malformed request, 400 `invalid_grant` for any refusal (without saying which check
  failed, as the Hub does not).

GitHub signs its id tokens RS256 with keys published in its JWKS; here they are HS256 with a shared test key, so both
sides stay stdlib-only. Everything else about the token (its shape, claims and checks) is as the real one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.localserver import serve, shutdown

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
TEST_KEY = b"hubexport-test-oidc-signing-key"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
HUB_TOKEN_TTL = 3600  # the Hub's trusted-publisher tokens last one hour
REQUEST_TOKEN = "ghs_TestIdTokenRequestToken0123456789"  # what GitHub puts in ACTIONS_ID_TOKEN_REQUEST_TOKEN


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_encode(claims: dict[str, Any], key: bytes = TEST_KEY) -> str:
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def jwt_decode(token: str, key: bytes = TEST_KEY) -> dict[str, Any] | None:
    """The claims of an HS256 JWT signed with `key`; None when it is malformed, of another algorithm or forged."""
    try:
        header, payload, signature = token.split(".")
        if json.loads(_unb64(header)).get("alg") != "HS256":
            return None
        expected = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature)):
            return None
        claims = json.loads(_unb64(payload))
    except (ValueError, AttributeError):
        return None
    return claims if isinstance(claims, dict) else None


def github_claims(repository: str = "rl-org/trainer", ref: str = "refs/heads/main",
                  workflow_file: str = "publish.yml", **extra: Any) -> dict[str, Any]:
    """The claims GitHub puts in a job's id token (the subset a trusted publisher matches on), without iat/exp/aud."""
    return {"iss": GITHUB_ISSUER, "sub": f"repo:{repository}:ref:{ref}", "repository": repository,
            "repository_owner": repository.split("/")[0], "ref": ref, "workflow": "publish",
            "workflow_ref": f"{repository}/.github/workflows/{workflow_file}@{ref}",
            "event_name": "workflow_dispatch", "runner_environment": "self-hosted", **extra}


# ---- GitHub's side ----------------------------------------------------------------------------------------------
@dataclass
class FakeGitHubOIDC:
    """GitHub's id token endpoint for one job. `fail_status` makes it answer that status instead (an outage);
    `lifetime` is how long minted tokens live (GitHub's last about 5 minutes; negative mints expired ones)."""

    claims: dict[str, Any] = field(default_factory=github_claims)
    key: bytes = TEST_KEY
    request_token: str = REQUEST_TOKEN
    lifetime: int = 300
    fail_status: int | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"audience", "authorized"} per request
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeGitHubOIDC:
        self._server = serve(_github_handler(self))
        return self

    def stop(self) -> None:
        shutdown(self._server)

    @property
    def url(self) -> str:
        """Like GitHub's, it already has a query: clients append `&audience=...`."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/_apis/distributedtask/idtoken?api-version=2.0"

    def env(self) -> dict[str, str]:
        """What GitHub sets in a job with `permissions: id-token: write`."""
        return {"ACTIONS_ID_TOKEN_REQUEST_URL": self.url, "ACTIONS_ID_TOKEN_REQUEST_TOKEN": self.request_token}

    def mint(self, audience: str) -> str:
        now = int(time.time())
        return jwt_encode({**self.claims, "aud": audience, "iat": now, "nbf": now, "exp": now + self.lifetime,
                           "jti": secrets.token_hex(8)}, self.key)


def _github_handler(github: FakeGitHubOIDC) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            audience = (query.get("audience") or [""])[-1]
            authorized = hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {github.request_token}")
            github.requests.append({"audience": audience, "authorized": authorized})
            if github.fail_status is not None:
                self._json(github.fail_status, {"message": "Internal error while issuing the token"})
            elif not authorized:
                self._json(401, {"message": "Bad credentials"})
            else:
                self._json(200, {"count": 1, "value": github.mint(audience or GITHUB_ISSUER)})

        def _json(self, status: int, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


# ---- the Hub's side ---------------------------------------------------------------------------------------------
class OAuthError(Exception):
    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code, self.description = code, description


@dataclass(frozen=True)
class TrustedPublisher:
    issuer: str
    claims: dict[str, str]  # claim -> exact value (the Hub matches exactly: no prefixes, no patterns)


@dataclass
class TrustedPublishers:
    key: bytes = TEST_KEY  # stands for the issuer's JWKS
    publishers: dict[str, list[TrustedPublisher]] = field(default_factory=dict)  # "model:ns/name" -> publishers
    exchanges: list[tuple[str, bool]] = field(default_factory=list)  # (resource, granted)

    def add(self, repo_key: str, issuer: str = GITHUB_ISSUER, **claims: str) -> None:
        self.publishers.setdefault(repo_key, []).append(TrustedPublisher(issuer, dict(claims)))

    def resolve(self, body: Any, audience: str) -> str:
        """The repo key ("model:ns/name") a valid exchange request is for; OAuthError otherwise."""
        if not isinstance(body, dict) or body.get("grant_type") != TOKEN_EXCHANGE:
            raise OAuthError("invalid_request", f"grant_type must be {TOKEN_EXCHANGE}")
        if body.get("subject_token_type") != ID_TOKEN_TYPE or not isinstance(body.get("subject_token"), str):
            raise OAuthError("invalid_request", f"subject_token_type must be {ID_TOKEN_TYPE}, with a subject_token")
        key = _repo_key(body.get("resource"))
        claims = jwt_decode(body["subject_token"], self.key)
        now = time.time()
        granted = (
            claims is not None
            and claims.get("aud") == audience
            and isinstance(claims.get("exp"), (int, float)) and claims["exp"] > now
            and claims.get("nbf", 0) <= now + 60
            and any(p.issuer == claims.get("iss") and all(claims.get(c) == v for c, v in p.claims.items())
                    for p in self.publishers.get(key, []))
        )
        self.exchanges.append((body.get("resource"), granted))
        if not granted:  # like the Hub: one answer for every failed check
            raise OAuthError("invalid_grant", "The subject token does not match any trusted publisher for this resource")
        return key


def _repo_key(resource: Any) -> str:
    if not isinstance(resource, str) or not resource:
        raise OAuthError("invalid_request", "resource is required")
    parts = resource.split("/")
    if len(parts) == 3 and parts[0] in ("datasets", "spaces", "kernels") and all(parts):
        return f"{parts[0][:-1]}:{parts[1]}/{parts[2]}"
    if len(parts) == 2 and all(parts):
        return f"model:{resource}"
    if len(parts) == 1:
        raise OAuthError("invalid_grant", "user publishers are not served by this emulator")
    raise OAuthError("invalid_request", f"invalid resource {resource!r}")


WORKFLOW_REF = "rl-org/trainer/.github/workflows/publish.yml@refs/heads/main"  # the job the tests' publishers trust


@pytest.fixture
def github() -> Iterator[FakeGitHubOIDC]:
    """GitHub's id token endpoint for one test."""
    fake = FakeGitHubOIDC().start()
    yield fake
    fake.stop()
