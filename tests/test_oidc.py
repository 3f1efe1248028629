"""Keyless publishing (hubexport/oidc.py, `hubexport oidc-token`): huggingface_hub's real exchange, with this test
playing GitHub's id token endpoint (tests/oidc_fakes.py: JWTs signed HS256 with a test key, GitHub's claims) and the
Hub emulator answering `POST /oauth/token` for the repos that trust the job's claims."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubexport.errors import HubError
from hubexport.oidc import exchange
from hubexport.redaction import redact
from tests.fakehub import FakeHub
from tests.hub_fixtures import ORG, TOKEN, hub_env
from tests.oidc_fakes import WORKFLOW_REF, FakeGitHubOIDC, github_claims

REPO = f"{ORG}/oidc-model"


@pytest.fixture
def trusted(fakehub: FakeHub, github: FakeGitHubOIDC, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """A job with `permissions: id-token: write`, and REPO trusting its repository and workflow file."""
    import huggingface_hub.utils._auth as hf_auth

    monkeypatch.setattr(hf_auth, "_OIDC_TOKEN_CACHE", None)  # huggingface_hub caches one exchange per process
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    for key, value in github.env().items():
        monkeypatch.setenv(key, value)
    for var in ("HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    fakehub.create_repo("model", REPO, private=True)
    fakehub.create_repo("model", f"{ORG}/other", private=False)
    fakehub.add_trusted_publisher(REPO, repository="rl-org/trainer", workflow_ref=WORKFLOW_REF)
    return fakehub


def api(hub: FakeHub, token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=token)


def test_exchange_gives_a_token_that_writes_to_the_trusted_repo_only(trusted: FakeHub, github: FakeGitHubOIDC,
                                                                     model_dir: Path) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    from hubexport.executor import push
    from hubexport.options import PushOptions

    token = exchange(REPO, log=lambda _: None)
    assert token.startswith("hf_jwt_") and token != TOKEN  # the exchange, not HF_TOKEN (set by the fixture)
    assert github.requests == [{"audience": trusted.url, "authorized": True}]  # audience: the Hub that checks it
    assert trusted.trust.exchanges == [(REPO, True)]
    assert os.environ.get("HF_OIDC_RESOURCE") is None  # restored after the call

    me = api(trusted, token).whoami()
    assert me["name"] == "[OIDC]" and me["auth"]["accessToken"]["role"] == "fineGrained"
    result = push(model_dir, PushOptions(REPO, token=token), log=lambda _: None).push  # preflight, upload, commit
    assert result is not None and result.commit_sha == trusted.repos[f"model:{REPO}"].refs["main"]
    assert set(trusted.files(REPO)) >= {"config.json", "README.md", "model.safetensors.index.json"}
    with pytest.raises(HfHubHTTPError) as other:
        api(trusted, token).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=f"{ORG}/other")
    assert other.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as create:
        api(trusted, token).create_repo(f"{ORG}/new-model")
    assert create.value.response.status_code == 403 and f"model:{ORG}/new-model" not in trusted.repos


def test_missing_id_token_permission_is_one_error_before_any_request(trusted: FakeHub, github: FakeGitHubOIDC,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", "")  # what a job without id-token: write sees: nothing
    monkeypatch.delenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    with pytest.raises(HubError) as e:
        exchange(REPO)
    assert "ACTIONS_ID_TOKEN_REQUEST_URL and ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set" in e.value.message
    assert "permissions: id-token: write" in (e.value.hint or "")
    assert github.requests == [] and trusted.requests == []


@pytest.mark.parametrize("fault", ["outage", "bad request token"])
def test_github_token_endpoint_failure_is_named(trusted: FakeHub, github: FakeGitHubOIDC, fault: str) -> None:
    if fault == "outage":
        github.fail_status = 503
    else:
        github.request_token = "ghs_SomeOtherJobsRequestToken"
    with pytest.raises(HubError) as e:
        exchange(REPO)
    status = 503 if fault == "outage" else 401
    assert e.value.message.startswith(f"GitHub's OIDC token endpoint (ACTIONS_ID_TOKEN_REQUEST_URL) answered HTTP {status}")
    assert len(github.requests) == 1 and trusted.paths(contains="/oauth/token") == []


REFUSALS = {
    "another repository": dict(claims=github_claims(repository="someone/fork")),
    "another workflow file": dict(claims=github_claims(workflow_file="evil.yml")),
    "another issuer": dict(claims=github_claims(iss="https://gitlab.com")),
    "an expired id token": dict(lifetime=-30),
    "a forged signature": dict(key=b"not GitHub's key"),
}


@pytest.mark.parametrize("case", [*REFUSALS, "a repo without publishers", "a missing repo"])
def test_hub_refusal_is_one_error_with_the_fix(trusted: FakeHub, github: FakeGitHubOIDC, case: str) -> None:
    for attr, value in REFUSALS.get(case, {}).items():
        setattr(github, attr, value)
    repo = {"a repo without publishers": f"{ORG}/other", "a missing repo": f"{ORG}/nowhere"}.get(case, REPO)
    with pytest.raises(HubError) as e:
        exchange(repo)
    assert e.value.message == (f"{trusted.url} refused the OIDC exchange for {repo}: HTTP 400: invalid_grant: "
                               "The subject token does not match any trusted publisher for this resource")
    assert f"{trusted.url}/{repo}/settings" in (e.value.hint or "")
    assert trusted.trust.exchanges[-1][1] is False or case == "a missing repo"
    assert not any(t.startswith("hf_jwt_") for t in trusted.tokens)  # nothing was minted


def test_an_id_token_from_another_ci_is_exchanged_through_hf_oidc_id_token(trusted: FakeHub, github: FakeGitHubOIDC,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("GITHUB_ACTIONS", "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("HF_OIDC_ID_TOKEN", github.mint(trusted.url))
    assert exchange(REPO, log=lambda _: None) in trusted.scopes


def test_emulator_rejects_malformed_exchanges_and_expired_tokens(trusted: FakeHub) -> None:
    import httpx2

    bad = httpx2.post(f"{trusted.url}/oauth/token", json={"grant_type": "password", "resource": REPO})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
    from huggingface_hub.errors import HfHubHTTPError

    stale = trusted.mint_scoped_token(f"model:{REPO}", ttl=0)
    with pytest.raises(HfHubHTTPError) as e:
        api(trusted, stale).whoami()
    assert e.value.response.status_code == 401


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hubexport", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_oidc_token_command_writes_a_private_file_and_prints_no_token(trusted: FakeHub, github: FakeGitHubOIDC,
                                                                     tmp_path: Path) -> None:
    env = hub_env(trusted) | github.env() | {"GITHUB_ACTIONS": "true"}
    out = tmp_path / "hf-token"
    proc = cli("oidc-token", "--repo-id", REPO, "--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    token = out.read_text()
    assert trusted.scopes[token][0] == f"model:{REPO}"
    assert (out.stat().st_mode & 0o777) == 0o600 and proc.stdout == ""
    assert token not in proc.stderr and "exchanged this job's OIDC id token" in proc.stderr
    assert "oidc-token" not in cli("--help", env=env).stdout  # hidden: the action's helper, not a user command

    missing = cli("oidc-token", "--repo-id", REPO, "--output", str(tmp_path / "none"),
                  env={k: v for k, v in env.items() if k != "ACTIONS_ID_TOKEN_REQUEST_TOKEN"})
    assert missing.returncode == 2 and not (tmp_path / "none").exists()
    assert missing.stderr.splitlines() == [
        "error: no OIDC id token for this job: ACTIONS_ID_TOKEN_REQUEST_URL and ACTIONS_ID_TOKEN_REQUEST_TOKEN are "
        "not set", "hint: give the job `permissions: id-token: write` (GitHub sets these variables only then)"]


def test_redaction_hides_tokens_and_keeps_ordinary_words() -> None:
    jwt = FakeGitHubOIDC().mint("https://huggingface.co")
    text = (f"Authorization: Bearer abc.def {TOKEN} hf_jwt_eyJhbGci.x-y_z id={jwt} secret-value-123 "
            "--hf_upload_path hf_home")
    out = redact(text, ["secret-value-123"])
    assert out == "Authorization: Bearer *** *** *** id=*** *** --hf_upload_path hf_home"
