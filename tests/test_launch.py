"""torchrun with more processes than the work pays for (too little work, or a recorded merge one process repeats
without torch): every rank but 0 leaves before importing torch, rank 0 merges as one process and says so; the output
is the one-process output byte for byte. With the threshold at 0 every rank takes its share, with the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubexport.examples import FsdpCase, make_checkpoints
from hubexport.launch import DECISION, ENV, alone_if, input_folder, solo_if_small

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def actor(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launch")
    make_checkpoints([FsdpCase("launch_w2", world_size=2, reference=False)], out)
    return out / "launch_w2" / "global_step_1" / "actor"


def merge(actor: Path, out: Path, nproc: int, env: dict[str, str], script: bool = False) -> subprocess.CompletedProcess:
    """`python -m hubexport merge`, or with `script` the installed `hubexport` console script, under torchrun when
    `nproc` > 1."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if script:
        launch = [*torchrun, "--no-python"] if nproc > 1 else []
        program = [str(Path(sys.executable).parent / "hubexport")]
    else:
        launch, program = (torchrun if nproc > 1 else [sys.executable]), ["-m", "hubexport"]
    cmd = [*launch, *program, "merge", "--local-dir", str(actor),
           "--target-dir", str(out), "--max-shard-size", "20KB"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_input_folder_is_read_from_the_command_line(tmp_path: Path) -> None:
    d = str(tmp_path)
    assert input_folder(["merge", "--backend", "fsdp", "--local-dir", d, "--target-dir", "/x"]) == tmp_path
    assert input_folder(["merge", f"--local_dir={d}"]) == tmp_path
    assert input_folder(["to-megatron", "--hf-model-path", d, "--output-path", "/x"]) == tmp_path
    assert input_folder(["push", d, "--repo-id", "a/b"]) == tmp_path
    assert input_folder(["to-megatron", "--hf-model-path", "Qwen/Qwen2.5-0.5B"]) is None  # a Hub id: not counted
    assert input_folder(["merge", "--local-dir", str(tmp_path / "missing")]) is None
    assert input_folder(["verify", d]) is None


def test_only_one_node_with_little_work_falls_back(tmp_path: Path) -> None:
    (tmp_path / "model_world_size_2_rank_0.pt").write_bytes(b"x" * 1000)
    argv = ["merge", "--local-dir", str(tmp_path), "--target-dir", "/x"]
    one_node = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env = dict(one_node)
    assert solo_if_small(argv, env) and "WORLD_SIZE" not in env and "RANK" not in env
    assert not solo_if_small(argv, {**one_node, ENV: "400"})  # 1000 bytes ≥ 2 ranks × 400
    assert not solo_if_small(argv, {**one_node, "LOCAL_WORLD_SIZE": "1"})  # several nodes: every rank works
    with pytest.raises(SystemExit) as left:
        solo_if_small(argv, {**one_node, "RANK": "1", "LOCAL_RANK": "1"})
    assert left.value.code == 0


def test_torchrun_on_small_work_runs_one_process_with_the_same_bytes(actor: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    single = merge(actor, tmp_path / "one", 1, env)
    solo = merge(actor, tmp_path / "solo", 2, env)
    every = merge(actor, tmp_path / "every", 2, {**env, ENV: "0"})
    script = merge(actor, tmp_path / "script", 2, env, script=True)  # the console script falls back alike
    assert "working as 1 process" in solo.stderr + script.stderr and "working as 1 process" not in every.stderr + single.stderr
    one = files(tmp_path / "one")
    assert len([n for n in one if n.endswith(".safetensors")]) > 1  # several shards: the ranks had files to share
    assert files(tmp_path / "solo") == one
    assert files(tmp_path / "every") == one
    assert files(tmp_path / "script") == one


def alone(make, env: dict[str, str]):
    return alone_if(make, env, why="repeats a recorded job")


def attempt(tmp_path: Path, rank: int) -> dict[str, str]:
    """The variables torchrun gives the worker of `rank` on one node of 2, with its agent's attempt folder."""
    (tmp_path / "attempt_0" / str(rank)).mkdir(parents=True, exist_ok=True)
    return {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "TORCHELASTIC_ERROR_FILE": str(tmp_path / "attempt_0" / str(rank) / "error.json")}


def test_rank_0_decides_and_the_others_follow(tmp_path: Path) -> None:
    env = attempt(tmp_path, 0)
    assert alone(lambda world: f"a job, {world} writers", env) == "a job, 2 writers"
    assert "WORLD_SIZE" not in env and "RANK" not in env  # rank 0 is now a single process
    assert (tmp_path / "attempt_0" / DECISION).read_text() == "1"
    with pytest.raises(SystemExit) as left:
        alone(lambda world: pytest.fail("only rank 0 makes the job"), attempt(tmp_path, 1))
    assert left.value.code == 0

    env = attempt(tmp_path, 0)
    assert alone(lambda world: None, env) is None and env["WORLD_SIZE"] == "2"  # no recorded merge: every rank
    assert (tmp_path / "attempt_0" / DECISION).read_text() == "0"
    assert alone(lambda world: pytest.fail("only rank 0 makes the job"), attempt(tmp_path, 1)) is None


def test_a_failure_to_decide_still_tells_the_other_ranks(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        alone(lambda world: (_ for _ in ()).throw(OSError("unreadable")), attempt(tmp_path, 0))
    assert (tmp_path / "attempt_0" / DECISION).read_text() == "0"


def test_nothing_is_decided_elsewhere(tmp_path: Path) -> None:
    env = attempt(tmp_path, 0)
    never = lambda world: pytest.fail("not asked")  # noqa: E731
    assert alone(never, {**env, "LOCAL_WORLD_SIZE": "1"}) is None  # several nodes
    assert alone(never, {**env, ENV: "0"}) is None  # the tests of the multi-rank path
    assert alone(never, {k: v for k, v in env.items() if k != "TORCHELASTIC_ERROR_FILE"}) is None  # another launcher
    assert alone(never, {**env, "LOCAL_RANK": "1"}) is None  # not torchrun's layout
    assert alone(never, {}) is None
    assert not (tmp_path / "attempt_0" / DECISION).exists()


def test_torchrun_repeating_a_recorded_merge_runs_one_process_with_the_same_bytes(actor: Path, tmp_path: Path) -> None:
    """Enough work for 2 processes by the size rule (1 byte per rank), but one process has a fast path: a first
    merge written while it is planned, then the recorded merge, each written several files at a time."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), ENV: "1"}
    first = merge(actor, tmp_path / "first", 2, env)
    again = merge(actor, tmp_path / "again", 2, env)
    for proc in (first, again):
        assert "one process copies this merge file to file without torch, several files at a time" in proc.stderr, proc.stderr
    assert "planning did not confirm" not in first.stderr
    single = merge(actor, tmp_path / "one", 1, {**env, "HF_HOME": str(tmp_path / "hf-single")})
    one = files(tmp_path / "one")
    assert len([n for n in one if n.endswith(".safetensors")]) > 2  # more files than writers
    assert files(tmp_path / "first") == one and files(tmp_path / "again") == one
    assert "working as 1 process" not in single.stderr


def to_megatron(model: Path, out: Path, nproc: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(torchrun if nproc > 1 else [sys.executable]), "-m", "hubexport", "to-megatron", "--hf-model-path",
           str(model), "--output-path", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_torchrun_repeating_a_recorded_conversion_runs_one_process_with_the_same_bytes(actor: Path,
                                                                                       tmp_path: Path) -> None:
    """to-megatron with enough work for 2 processes by the size rule: once one process has recorded the conversion,
    rank 0 repeats it alone, without torch, and writes what one process writes; before that, both ranks convert."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), ENV: "1"}
    merge(actor, tmp_path / "model", 1, env)
    cold = to_megatron(tmp_path / "model", tmp_path / "cold", 2, env)  # nothing recorded: every rank converts
    single = to_megatron(tmp_path / "model", tmp_path / "one", 1, env)  # one process records it
    again = to_megatron(tmp_path / "model", tmp_path / "again", 2, env)
    assert "working as 1 process" not in cold.stderr + single.stderr
    assert "one process copies this conversion file to file without torch" in again.stderr, again.stderr
    assert tree(tmp_path / "again") == tree(tmp_path / "one") and len(tree(tmp_path / "one")) > 1


def test_ranks_already_joined_all_stay(tmp_path: Path) -> None:
    """`push` sets up torch.distributed before it merges: no rank may leave the group then."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", rank=0, world_size=1, store=tdist.HashStore())
    try:
        assert alone(lambda world: pytest.fail("not asked"), attempt(tmp_path, 0)) is None
    finally:
        tdist.destroy_process_group()
    assert not (tmp_path / "attempt_0" / DECISION).exists()
