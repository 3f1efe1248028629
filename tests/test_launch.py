"""torchrun with more processes than the work pays for: every rank but 0 leaves before importing torch, rank 0
merges as one process and says so; the output is the one-process output byte for byte. With the threshold at 0 every
rank takes its share, with the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubexport.examples import FsdpCase, make_checkpoints
from hubexport.launch import ENV, input_folder, solo_if_small

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
