"""The GitHub Action under `act` (host mode, as tests/test_action.py runs it): keyless publishing with `auth: oidc`
against the Hub emulator, with this test playing GitHub's id token endpoint (tests/oidc_fakes.py), and the job
summaries of runs that fail: no id-token permission, an exchange the Hub refuses, a commit refused after the merge,
a read-only token."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.fakehub import FakeHub
from tests.fsdp_cases import actor_dir
from tests.hub_fixtures import ORG, READ_TOKEN, TOKEN, USER
from tests.oidc_fakes import WORKFLOW_REF, FakeGitHubOIDC
from tests.test_action import ROOT, readable, run_act, safetensors_params, summaries, visible

WORKFLOW = ROOT / "tests" / "action" / "act-oidc-workflow.yml"
TRUSTED, UNTRUSTED = f"{ORG}/act-oidc", f"{ORG}/act-untrusted"


def summary_of(log: str, step: str) -> str:
    found = summaries(log, step)
    assert found, f"no job summary for step {step}:\n{readable(log)[-6000:]}"
    return found[0]


@pytest.mark.slow
def test_keyless_push_and_failure_summaries_under_act(fakehub: FakeHub, github: FakeGitHubOIDC, fsdp_root: Path,
                                                      tmp_path: Path) -> None:
    fakehub.create_repo("model", TRUSTED, private=True)  # a trusted publisher is configured on an existing repo
    fakehub.create_repo("model", UNTRUSTED, private=True)
    fakehub.add_trusted_publisher(TRUSTED, repository="rl-org/trainer", workflow_ref=WORKFLOW_REF)
    fakehub.add_trusted_publisher(UNTRUSTED, repository="rl-org/another-trainer")
    fakehub.inject("POST", rf"/api/models/{USER}/act-refused-commit/commit/", status=403,
                   body={"error": "Private repository storage limit reached"})
    results, target, target2 = tmp_path / "results", tmp_path / "merged", tmp_path / "merged2"
    results.mkdir()
    ckpt = actor_dir(fsdp_root, "qwen2_fsdp2_w2_dim1")
    log = run_act(WORKFLOW, {"HXT_SRC": ROOT, "HXT_PYTHON": sys.executable, "HXT_CKPT": ckpt, "HXT_HUB": fakehub.url,
                             "HXT_TARGET": target, "HXT_TARGET2": target2, "HXT_RESULTS": results,
                             "HXT_TOKEN": TOKEN, "HXT_READ_TOKEN": READ_TOKEN, **github.env()}, fakehub, tmp_path)

    # No token is ever shown: neither the user tokens nor any token the exchange minted, nor GitHub's id tokens.
    shown = visible(log)
    minted = [t for t in fakehub.scopes]
    assert len(minted) == 1 and all(t not in shown for t in [TOKEN, READ_TOKEN, *minted])
    assert "eyJ" not in shown and "tokens after the action: *** ***" in log

    # The keyless push: one exchange per OIDC run that reached it, GitHub asked for the emulator as audience.
    assert fakehub.trust.exchanges == [(TRUSTED, True), (UNTRUSTED, False)]
    assert github.requests == [{"audience": fakehub.url, "authorized": True}] * 2  # noperm never asked
    repo = fakehub.repos[f"model:{TRUSTED}"]
    out = json.loads((results / "oidc.json").read_text())
    assert out["repo-id"] == TRUSTED and out["commit-sha"] == repo.refs["main"] and out["no-op"] == "false"
    files = fakehub.files(TRUSTED)
    assert set(files) == {p.name for p in target.iterdir()} | {".gitattributes"}
    assert f"[{TRUSTED}]({fakehub.url}/{TRUSTED}) (private)" in summary_of(log, "oidc")

    assert (results / "outcomes.txt").read_text().split() == ["failure"] * 4

    # No id-token permission: stopped by the input check, before anything was installed.
    noperm = summary_of(log, "noperm")
    assert noperm.startswith("### hubexport stopped: the inputs are wrong")
    assert "ACTIONS_ID_TOKEN_REQUEST_URL and ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set" in noperm
    assert "`permissions: id-token: write`" in noperm

    # The Hub refuses the exchange: the failure summary names the stage, the Hub's answer and the fix.
    refused = summary_of(log, "refused")
    assert refused.startswith(f"### hubexport failed while exchanging the OIDC token: `{UNTRUSTED}`")
    assert (f"| Error | {fakehub.url} refused the OIDC exchange for {UNTRUSTED}: HTTP 400: invalid_grant: The subject "
            "token does not match any trusted publisher for this resource |") in refused
    assert f"| Fix | add a Trusted Publisher to {fakehub.url}/{UNTRUSTED}/settings" in refused

    # A commit refused after merge and upload: what was merged (kept), where it stopped, the Hub's message.
    commit = summary_of(log, "refusedcommit")
    assert commit.startswith(f"### hubexport failed while merging and pushing: `{USER}/act-refused-commit`")
    assert (f"| Error | uploading to {USER}/act-refused-commit failed: HTTP 403: Private repository storage limit "
            "reached |") in commit
    assert "| Stopped | merging and pushing, after `uploading " in commit
    assert "#### Merged before it stopped (kept in `target-dir`)" in commit and f"| Folder | `{target2}` |" in commit
    assert f"| Parameters | {safetensors_params(target2):,} |" in commit
    assert f"model:{USER}/act-refused-commit" in fakehub.repos and fakehub.commit_count(f"{USER}/act-refused-commit") == 1

    # A read-only token: refused before the merge; the summary says what it was publishing.
    readonly = summary_of(log, "readonly")
    assert "| Error | the token of tester on " in readonly and "is read-only |" in readonly
    assert "#### What it was publishing (no merged model was kept)" in readonly
    assert f"| Checkpoint | `{ckpt}` (fsdp " in readonly and "| Parallel layout | world_size 2" in readonly
    for text in (refused, commit, readonly):
        assert TOKEN not in text and READ_TOKEN not in text
