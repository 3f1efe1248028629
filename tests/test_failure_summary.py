"""The action's job summary of a failed run (hubexport/failure.py): built from the failing step's captured stderr and
what is on disk, redacted. The act run in tests/test_action_oidc.py shows it for real failures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hubexport.failure import annotation, read_failure, render_failure
from tests.hub_fixtures import TOKEN
from tests.oidc_fakes import FakeGitHubOIDC

STAGE = "merging and pushing"


def write_log(tmp_path: Path, *lines: str) -> Path:
    log = tmp_path / "push.log"
    log.write_text("\n".join(lines) + "\n")
    return log


def test_summary_says_where_it_stopped_and_hides_every_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "plain-secret-without-any-pattern")
    jwt = FakeGitHubOIDC().mint("https://huggingface.co")
    log = write_log(
        tmp_path, "authenticated as tester on https://huggingface.co (write token)",
        f"debug: sent Authorization: Bearer {TOKEN} and plain-secret-without-any-pattern, id token {jwt}",
        "a line with ``` fences", "uploading 3 of 3 files (1,024 bytes) to me/model@main",
        "error: uploading to me/model failed: HTTP 403: 100% of the quota used", "hint: free some storage",
        "error: uploading to me/model failed: HTTP 403: 100% of the quota used", "hint: free some storage")  # 2 ranks
    failure = read_failure(STAGE, log, repo_id="me/model")
    assert failure.error == "uploading to me/model failed: HTTP 403: 100% of the quota used"
    assert failure.hints == ["free some storage"]
    assert failure.last_step == "uploading 3 of 3 files (1,024 bytes) to me/model@main"
    text = render_failure(failure)
    assert text.startswith("### hubexport failed while merging and pushing: `me/model`")
    assert "| Stopped | merging and pushing, after `uploading 3 of 3 files (1,024 bytes) to me/model@main` |" in text
    assert "| Error | uploading to me/model failed: HTTP 403: 100% of the quota used |\n| Fix | free some storage |" in text
    assert "\n````text\n" in text and text.rstrip().endswith("````\n\n</details>")  # longer than the log's ```
    for secret in (TOKEN, "plain-secret-without-any-pattern", jwt):
        assert secret not in text
    assert "Bearer *** and ***, id token ***" in text
    assert annotation(failure) == ("::error title=hubexport::merging and pushing: uploading to me/model failed: HTTP 403: "
                                   "100%25 of the quota used")  # % escaped, as the runner expects
    assert "#### Merged" not in text and "#### What it was publishing" not in text


def test_a_log_without_an_error_line_shows_its_last_line(tmp_path: Path) -> None:
    log = write_log(tmp_path, "merging...", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", "")
    failure = read_failure(STAGE, log)
    assert failure.error == "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"
    assert failure.last_step is None
    assert read_failure(STAGE, tmp_path / "missing.log").error == "the step failed without an error line: see its log"


def test_a_target_dir_counts_as_merged_only_when_this_run_wrote_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A failed --overwrite run leaves the previous model in target-dir: the summary must not present it as merged."""
    target = Path(shutil.copytree(tiny_model_dir, tmp_path / "merged"))
    marker = tmp_path / "started"
    marker.touch()
    log = write_log(tmp_path, "error: x")
    for weights in target.glob("*.safetensors"):
        os.utime(weights, ns=(marker.stat().st_mtime_ns - 10**9,) * 2)  # written a second before this run began
    stale = read_failure(STAGE, log, target_dir=target, since=marker, checkpoint=tiny_model_dir)
    assert stale.merged is None and stale.checkpoint is not None  # what it was publishing, instead
    assert "#### What it was publishing (no merged model was kept)" in render_failure(stale)
    assert f"| Checkpoint | `{tiny_model_dir}` (hf safetensors (sharded)) |" in render_failure(stale)

    os.utime(next(target.glob("*.safetensors")), ns=(marker.stat().st_mtime_ns + 10**9,) * 2)
    fresh = read_failure(STAGE, log, target_dir=target, since=marker, checkpoint=tiny_model_dir)
    assert fresh.merged is not None and fresh.merged["architecture"] == "Qwen2ForCausalLM" and fresh.checkpoint is None
    text = render_failure(fresh)
    assert "#### Merged before it stopped (kept in `target-dir`)" in text and f"| Folder | `{target}` |" in text
    assert f"| Weight files | {len(list(target.glob('*.safetensors')))} (" in text
