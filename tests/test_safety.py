"""What the user owns is never lost or touched: a target overlapping the input is refused whatever --overwrite says,
no command writes under its input (a before/after tree hash), and one run at a time owns a target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubexport.cli import cli
from hubexport.targets import TargetLock
from tests.fsdp_cases import actor_dir
from tests.tree import tree_hash

SMALL = "qwen2_fsdp2_w2_dim1"


def run(*args) -> subprocess.CompletedProcess:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return subprocess.CompletedProcess(["hubexport"], r.exit_code, r.stdout, r.stderr)


def errors(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


@pytest.fixture
def run_root(fsdp_root, tmp_path) -> Path:
    """A run as verl leaves it: run/latest_checkpointed_iteration.txt, run/global_step_1/actor/..."""
    root = tmp_path / "run"
    shutil.copytree(fsdp_root / SMALL, root)
    return root


@pytest.fixture(scope="module")
def hf_model(fsdp_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert run("merge", "--local-dir", actor_dir(fsdp_root, SMALL), "--target-dir", out).returncode == 0
    return out


def _overlap(where: str, tmp_path: Path, input_dir: Path) -> Path:
    if where == "same":
        return input_dir
    if where == "inside":
        return input_dir / "merged"
    if where == "above":
        return input_dir.parent
    link = tmp_path / "link"  # a path that reaches into the input through a symbolic link
    link.symlink_to(input_dir)
    return link / "merged"


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["same", "inside", "above", "through-a-link"])
def test_merge_target_overlapping_the_checkpoint_is_refused(where, overwrite, run_root, tmp_path):
    actor = run_root / "global_step_1" / "actor"
    target = _overlap(where, tmp_path, actor)
    before = tree_hash(run_root)
    r = run("merge", "--local-dir", actor, "--target-dir", target, *(["--overwrite"] if overwrite else []))
    assert r.returncode == 2, r.stdout + r.stderr
    [line] = errors(r)
    assert str(target) in line and str(actor) in line and "never writes into" in line
    assert tree_hash(run_root) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_target_inside_the_run_root_is_refused(overwrite, run_root):
    """--local-dir may be the run root; the step it resolves to is inside it, and so is this target."""
    before = tree_hash(run_root)
    r = run("merge", "--local-dir", run_root, "--target-dir", run_root / "hf", *(["--overwrite"] if overwrite else []))
    assert r.returncode == 2 and "is inside the input" in errors(r)[0]
    assert tree_hash(run_root) == before


@pytest.mark.parametrize("where", ["same", "inside", "above"])
def test_to_megatron_and_push_targets_overlapping_their_input_are_refused(where, hf_model, run_root, tmp_path):
    model = Path(shutil.copytree(hf_model, tmp_path / "m" / "model"))
    before = tree_hash(model.parent)
    r = run("to-megatron", "--hf-model-path", model, "--output-path", _overlap(where, tmp_path, model), "--overwrite")
    assert r.returncode == 2 and "--output-path" in errors(r)[0] and str(model) in errors(r)[0]
    assert tree_hash(model.parent) == before
    actor = run_root / "global_step_1" / "actor"
    before = tree_hash(run_root)
    r = run("push", actor, "--repo-id", "me/x", "--target-dir", _overlap(where, tmp_path / "p", actor), "--overwrite")
    assert r.returncode == 2 and "never writes into" in errors(r)[0]
    assert tree_hash(run_root) == before


def test_no_command_writes_under_its_input(run_root, hf_model, tmp_path, fakehub):
    """merge, inspect, verify, to-megatron and push (of a folder and of a checkpoint) leave their input's tree as it
    was: names, modes, sizes, mtimes and bytes."""
    actor = run_root / "global_step_1" / "actor"
    model = Path(shutil.copytree(hf_model, tmp_path / "model"))
    ckpt, folder = tree_hash(run_root), tree_hash(model)
    steps = [
        ("merge", "--local-dir", run_root, "--target-dir", tmp_path / "out"),
        ("inspect", actor),
        ("verify", tmp_path / "out", "--reference", actor),
        ("to-megatron", "--hf-model-path", model, "--output-path", tmp_path / "mcore", "--test"),
        ("push", model, "--repo-id", "tester/folder", "--license", "mit"),
        ("push", actor, "--repo-id", "tester/ckpt", "--license", "mit", "--target-dir", tmp_path / "pushed"),
    ]
    for args in steps:
        r = run(*args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        assert tree_hash(run_root) == ckpt and tree_hash(model) == folder, args
    assert "README.md" not in os.listdir(model) and (tmp_path / "pushed" / "README.md").is_file()


# ---- one run at a time --------------------------------------------------------------------------------------------
def test_a_second_run_on_a_held_target_fails_and_leaves_the_first_runs_staging(run_root, tmp_path):
    target = tmp_path / "o"
    lock = TargetLock(target)
    lock.acquire()  # a run in progress: it holds the lock and stages into its own folder
    theirs = tmp_path / ".o.hubexport-partial-theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"in progress")
    try:
        r = run("merge", "--local-dir", run_root, "--target-dir", target, "--overwrite")
        assert r.returncode == 2
        [line] = errors(r)
        assert f"another hubexport run (pid {os.getpid()} on " in line and str(target) in line
        assert (theirs / "model.safetensors").read_bytes() == b"in progress" and not target.exists()
    finally:
        lock.release()
    assert leftovers(target) == [theirs.name]


def test_staging_of_a_dead_run_is_cleaned_and_a_half_swap_recovered(run_root, tmp_path):
    """A killed run leaves its lock file (no longer held: its owner is gone), its staging folder, and, if it died
    between the two renames of --overwrite, the previous output moved aside: that output comes back, the rest goes."""
    target = tmp_path / "o"
    assert run("merge", "--local-dir", run_root, "--target-dir", target).returncode == 0
    previous = {p.name: p.read_bytes() for p in target.iterdir()}
    target.rename(tmp_path / ".o.hubexport-old")
    (tmp_path / ".o.hubexport-partial-dead").mkdir()
    (tmp_path / ".o.hubexport-lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": 0}))
    r = run("merge", "--local-dir", run_root, "--target-dir", target)
    assert r.returncode == 2 and "is not empty" in errors(r)[0]  # the previous output is back in place
    assert {p.name: p.read_bytes() for p in target.iterdir()} == previous and leftovers(target) == []


@pytest.mark.parametrize("offset", [0.0, 0.4, 1.5])
def test_two_runs_racing_on_one_target(offset, mid_checkpoint, tmp_path):
    """Two real processes on one target: each either completes or is told another run holds it; the target ends
    complete and byte-identical to a lone run's, with nothing left beside it."""
    target = tmp_path / "o"
    cmd = [sys.executable, "-m", "hubexport", "merge", "--local-dir", str(mid_checkpoint), "--target-dir", str(target),
           "--max-shard-size", "50MB", "--overwrite"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(offset)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcomes = []
    for proc in (first, second):
        _, err = proc.communicate(timeout=600)
        if proc.returncode:
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert proc.returncode == 2 and len(lines) == 1 and "another hubexport run" in lines[0], err[-2000:]
        outcomes.append(proc.returncode)
    assert 0 in outcomes and leftovers(target) == []
    alone = tmp_path / "alone"
    assert run("merge", "--local-dir", mid_checkpoint, "--target-dir", alone, "--max-shard-size", "50MB").returncode == 0
    assert {p.name: p.read_bytes() for p in target.iterdir()} == {p.name: p.read_bytes() for p in alone.iterdir()}
