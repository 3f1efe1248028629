"""`push` of a training checkpoint sends each weight file while the next one is merged (issue 16, part 4), against
the Hub emulator through the real huggingface_hub client: the upload of file 1 hangs while the merge goes on to the
end; a re-run after a failed commit sends no weight byte again; the publish gate, judging file by file, holds back
what may not go (a model identical to its base sends nothing; NaN in a later file stops the stream and the repo this
run created is removed); under torchrun the other ranks' files go too; Ctrl-C never waits for a hung upload."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from huggingface_hub import snapshot_download

from hubexport.cli import cli
from hubexport.examples import FsdpCase, make_checkpoints
from tests.fakehub import FakeHub
from tests.hub_fixtures import TOKEN, USER, hub_env
from tests.tree import tree_hash

REPO = f"{USER}/streamed"
ROOT = Path(__file__).resolve().parent.parent
SHARD = "40KB"  # the tiny model (~110 KB in fp32) becomes 3 weight files, on both LFS paths
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # huggingface_hub's own PUTs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained one step from a saved base (found through huggingface/config.json), and one never trained (= its base)."""
    root = tmp_path_factory.mktemp("stream")
    make_checkpoints([FsdpCase("ft", fsdp=0, world_size=1, save_base=True),
                      FsdpCase("same", fsdp=0, world_size=1, save_base=True, reference=False, seed=1)], root)
    return root


def actor(runs: Path, name: str) -> Path:
    return runs / name / "global_step_1" / "actor"


def push(source: Path, target: Path | None, *args: str) -> Result:
    where = ["--target-dir", str(target)] if target is not None else []
    return CliRunner().invoke(cli, ["push", str(source), "--repo-id", REPO, "--private", "--license", "mit",
                                    "--max-shard-size", SHARD, *where, *args])


def weight_puts(hub: FakeHub) -> list[str]:
    return [p for p in hub.paths("PUT") if "/_lfs/" in p]


def test_each_file_is_sent_while_the_next_one_is_merged(fakehub: FakeHub, runs: Path, tmp_path: Path) -> None:
    target = tmp_path / "merged"
    release = threading.Event()
    fakehub.inject("PUT", r"^/_lfs/(put|part)/", stall=release, times=3)  # each file's upload hangs until released
    before = tree_hash(actor(runs, "ft"))
    outcome: list[Result] = []
    worker = threading.Thread(target=lambda: outcome.append(push(actor(runs, "ft"), target)))
    worker.start()
    try:
        assert fakehub.stalled.wait(120), "no weight file was sent"
        assert not target.exists()  # the first upload began before the merge was done (the folder is still staged)
        staged = _wait_for(lambda: [p for p in tmp_path.glob(".merged.hubexport-partial-*/config.json")])
        assert staged, "the merge did not go on while file 1 was being sent"
        shards = sorted(staged[0].parent.glob("model-*.safetensors"))
        assert len(shards) == 3  # every file was merged while file 1's upload hung
        hung = _wait_for(lambda: len({p.split("/")[3] for m, p, status in fakehub.requests
                                      if m == "PUT" and status == 0 and p.startswith("/_lfs/")}) == 3)
        assert hung, "the files were not in flight at once"  # one at a time would leave the link idle
    finally:
        release.set()
        worker.join(240)
    [r] = outcome
    assert r.exit_code == 0, r.output
    assert r.output.count("sent while the merge goes on") == 3
    assert tree_hash(actor(runs, "ft")) == before
    got = Path(snapshot_download(REPO, endpoint=fakehub.url, token=TOKEN, cache_dir=tmp_path / "dl"))
    for shard in sorted(target.glob("*.safetensors")):
        assert (got / shard.name).read_bytes() == shard.read_bytes()
    assert fakehub.commit_count(REPO) == 2  # the repo's first commit, then one commit of the whole model


def _wait_for(probe, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_rerun_after_a_failed_commit_sends_no_weight_byte_again(fakehub: FakeHub, runs: Path, tmp_path: Path) -> None:
    fakehub.inject("POST", r"/commit/", status=500)
    failed = push(actor(runs, "ft"), None)
    assert failed.exit_code == 2 and "HTTP 500" in failed.stderr and "Traceback" not in failed.output
    assert REPO in {k.split(":", 1)[1] for k in fakehub.repos}  # kept after a Hub error: the re-run reuses it
    sent = dict(fakehub.stored)
    assert len(sent) == 3 and set(sent.values()) == {1}
    ok = push(actor(runs, "ft"), None)
    assert ok.exit_code == 0, ok.output
    assert dict(fakehub.stored) == sent  # the LFS objects were already stored: nothing sent twice
    assert {f for f in fakehub.files(REPO) if f.endswith(".safetensors")} == {
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)}


def test_a_model_identical_to_its_base_sends_nothing(fakehub: FakeHub, runs: Path, tmp_path: Path) -> None:
    r = push(actor(runs, "same"), tmp_path / "merged")
    assert r.exit_code == 2 and "identical to its base" in r.stderr, r.output
    assert weight_puts(fakehub) == [] and not fakehub.repos  # every file held back, then refused: nothing went
    assert (tmp_path / "merged" / "config.json").is_file()  # the merge is kept for the user to inspect


def test_nan_in_a_later_file_stops_the_stream_and_removes_the_repo_it_made(fakehub: FakeHub, runs: Path,
                                                                          tmp_path: Path) -> None:
    import shutil

    ckpt = Path(shutil.copytree(runs / "ft", tmp_path / "ft")) / "global_step_1" / "actor"
    [rank_file] = ckpt.glob("model_world_size_1_rank_0.pt")
    state = torch.load(rank_file, weights_only=True)
    state["model.norm.weight"][0] = float("nan")  # the last tensor by name: file 3; files 1 and 2 differ from the base
    torch.save(state, rank_file)
    r = push(ckpt, None)
    assert r.exit_code == 2 and "NaN/Inf" in r.stderr, r.output
    assert len(weight_puts(fakehub)) > 0, r.output  # files 1 and 2 went while the merge went on ...
    assert not fakehub.repos and "removed" in r.output  # ... the repo this run made is gone, nothing was published
    assert not [p for p in fakehub.paths("POST") if "/commit/" in p]


def test_under_torchrun_the_other_ranks_files_are_sent_too(fakehub: FakeHub, runs: Path, tmp_path: Path) -> None:
    target = tmp_path / "merged"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hubexport",
           "push", str(actor(runs, "ft")), "--repo-id", REPO, "--private", "--license", "mit", "--max-shard-size",
           SHARD, "--target-dir", str(target)]
    proc = subprocess.run(cmd, cwd=ROOT, env=hub_env(fakehub), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_hub = fakehub.files(REPO)
    shards = sorted(target.glob("model-*.safetensors"))
    assert len(shards) == 3 and proc.stderr.count("sent while the merge goes on") == 3
    for shard in shards:
        assert on_hub[shard.name].lfs is not None and fakehub.stored[on_hub[shard.name].lfs] == 1


def test_an_interrupted_push_leaves_at_once_while_its_uploads_hang(fakehub: FakeHub, runs: Path, tmp_path: Path) -> None:
    """Ctrl-C while every file's upload hangs: the run exits 130 without waiting for them, and removes the repo it
    made (nothing was committed to it)."""
    import signal

    release = threading.Event()
    fakehub.inject("PUT", r"^/_lfs/(put|part)/", stall=release, times=3)
    cmd = [sys.executable, "-m", "hubexport", "push", str(actor(runs, "ft")), "--repo-id", REPO, "--private",
           "--license", "mit", "--max-shard-size", SHARD]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=hub_env(fakehub), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert fakehub.stalled.wait(120), "no weight file was sent"
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=50)  # a hung upload waits 60 s in the emulator before it is dropped
        assert time.monotonic() - started < 30, "the exit waited for the hung uploads"
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not fakehub.repos and f"removed {REPO}" in err
