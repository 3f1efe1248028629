"""Scale-out and memory: torchrun ranks split the files and produce byte-identical output; peak RSS stays bounded by
the tensors in flight, not the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fsdp_cases import actor_dir


def merge_cmd(src: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    head = [*launcher, "-m", "hubexport"] if nproc > 1 else [sys.executable, "-m", "hubexport"]
    return [*head, "merge", "--local-dir", str(src), "--target-dir", str(out), *extra]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_output_is_byte_identical(nproc, fsdp_root, tmp_path):
    assert_torchrun_matches_single(actor_dir(fsdp_root, "qwen3moe_fsdp2_w2"), tmp_path, nproc)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_megatron_output_is_byte_identical(nproc, mcore_moe_ep2, tmp_path):
    assert_torchrun_matches_single(mcore_moe_ep2["ep2"].actor, tmp_path, nproc)


def assert_torchrun_matches_single(src: Path, tmp_path: Path, nproc: int) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(merge_cmd(src, single, "--max-shard-size", "8KB"), check=True, capture_output=True, timeout=300)
    proc = subprocess.run(merge_cmd(src, multi, "--max-shard-size", "8KB", nproc=nproc), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, many = folder_bytes(single), folder_bytes(multi)
    assert len([n for n in one if n.endswith(".safetensors")]) >= 2 * nproc  # every rank has files to write
    assert one == many
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"]


RSS_PROBE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)"
)


def peak_rss(cmd: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, *cmd], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_is_bounded_by_tensors_in_flight(mid_checkpoint, tmp_path):
    """Peak RSS of a real merge minus that of a dry run (same imports, same mapped files, same plan, no tensor read)
    stays within the plan's in-flight bound plus slack, far below the model size."""
    dry = subprocess.run(merge_cmd(mid_checkpoint, tmp_path / "dry", "--dry-run", "--json"), capture_output=True,
                         text=True, timeout=300, check=True)
    plan = json.loads(dry.stdout)
    model_bytes = sum(f["size"] for f in plan["files"])
    assert model_bytes > 400e6
    baseline = peak_rss(merge_cmd(mid_checkpoint, tmp_path / "dry2", "--dry-run"))
    peak = peak_rss(merge_cmd(mid_checkpoint, tmp_path / "out", "--max-shard-size", "100MB"))
    extra = peak - baseline
    assert extra <= plan["peak_tensor_bytes"] + 64e6, (extra, plan["peak_tensor_bytes"], model_bytes)
    assert extra < model_bytes / 2
