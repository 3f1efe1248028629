"""Hub refusals that persist (the client's retries do not help): one line naming what failed, exit 2, no commit,
no token; a re-run once the Hub recovers completes."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fakehub import FakeHub
from tests.hub_fixtures import TOKEN, hub_env
from tests.test_hub_push import REPO, assert_downloads_bitwise, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", r"/commit/", 404),
    ("POST", r"/commit/", 409),
    ("POST", r"/commit/", 412),
    ("POST", r"/info/lfs/objects/batch", 413),
    ("POST", r"/preupload/", 500),
    ("POST", r"/commit/", 503),
])
def test_persistent_hub_errors(fakehub: FakeHub, model_dir: Path, method: str, path: str, status: int) -> None:
    fakehub.inject(method, path, status=status, times=50, body={"error": f"injected {status} {TOKEN}"})
    failed = run_cli("push", str(model_dir), "--repo-id", REPO, "--license", "mit")
    assert failed.exit_code == 2, failed.output
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(status) in errors[0], failed.stderr
    assert TOKEN not in failed.output
    assert fakehub.commit_count(REPO) <= 1  # at most the repo's initial commit: nothing of ours landed
    fakehub.faults.clear()
    again = run_cli("push", str(model_dir), "--repo-id", REPO, "--license", "mit")
    assert again.exit_code == 0, again.output
    assert {p.name for p in model_dir.iterdir()} <= set(fakehub.files(REPO))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_push_killed_at_a_random_point_then_rerun(fakehub: FakeHub, model_dir: Path, tmp_path: Path,
                                                   seed: int) -> None:
    """SIGKILL anywhere in a push: the Hub holds our complete upload or none of it, and a re-run completes with every
    LFS object stored once."""
    release = threading.Event()
    fakehub.inject("PUT", r"^/_lfs/", stall=release, times=1)  # hold one shard back so kills land mid-way
    cmd = [sys.executable, "-m", "hubexport", "push", str(model_dir), "--repo-id", REPO, "--license", "mit"]
    proc = subprocess.Popen(cmd, env=hub_env(fakehub), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not fakehub.stalled.is_set() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the upload has begun: one shard is held, the others are going through
    time.sleep(random.Random(seed).uniform(0.0, 1.0))
    proc.kill()
    proc.communicate()
    release.set()
    ours = {p.name for p in model_dir.iterdir()}
    landed = set(fakehub.files(REPO)) if f"model:{REPO}" in fakehub.repos else set()  # killed before create: none
    assert not (ours & landed) or ours <= landed  # never a partial commit
    fakehub.faults.clear()
    again = run_cli("push", str(model_dir), "--repo-id", REPO, "--license", "mit")
    assert again.exit_code == 0, again.output
    assert all(n == 1 for n in fakehub.stored.values())
    assert_downloads_bitwise(fakehub, model_dir, tmp_path)
