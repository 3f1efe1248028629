"""Faults and bad input: a clear error, nothing half-written, a re-run that completes byte-identically."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubexport.cli import _interrupt, cli
from hubexport.targets import uninterrupted
from tests.fsdp_cases import actor_dir

SMALL = "qwen2_fsdp2_w2_dim1"


def run(*args) -> subprocess.CompletedProcess:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    return subprocess.CompletedProcess(["hubexport"], r.exit_code, r.stdout, r.stderr)


def merge_proc(src: Path, target: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hubexport", "merge", "--local-dir", str(src), "--target-dir",
                             str(target), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def ckpt(fsdp_root, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(actor_dir(fsdp_root, SMALL), dst)
    return dst


def test_stray_rank_beyond_world_size(ckpt, tmp_path):
    shutil.copy(ckpt / "model_world_size_2_rank_1.pt", ckpt / "model_world_size_2_rank_2.pt")
    r = run("merge", "--local-dir", ckpt, "--target-dir", tmp_path / "o")
    assert r.returncode == 2 and "model_world_size_2_rank_2.pt has rank 2" in r.stderr
    assert not (tmp_path / "o").exists()


def test_duplicated_rank_file(ckpt, tmp_path):
    """rank 0's file copied over rank 1's: same shapes, wrong data; the pickled mesh says whose shards they are."""
    shutil.copy(ckpt / "model_world_size_2_rank_0.pt", ckpt / "model_world_size_2_rank_1.pt")
    r = run("merge", "--local-dir", ckpt, "--target-dir", tmp_path / "o")
    assert r.returncode == 2 and "holds the shards of rank 0, not rank 1" in r.stderr


def test_symlinked_target_is_refused(ckpt, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    r = run("merge", "--local-dir", ckpt, "--target-dir", tmp_path / "link", "--overwrite")
    assert r.returncode == 2 and "symbolic link" in r.stderr
    assert list(real.iterdir()) == [] and (tmp_path / "link").is_symlink()


def test_index_pointing_outside_the_folder(ckpt, tmp_path):
    out = tmp_path / "o"
    assert run("merge", "--local-dir", ckpt, "--target-dir", out, "--max-shard-size", "30KB").returncode == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    (tmp_path / "outside.safetensors").write_bytes((out / index["weight_map"][first]).read_bytes())
    index["weight_map"][first] = "../outside.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    for args in (["inspect", out], ["verify", out, "--reference", out]):
        r = run(*args)
        assert r.returncode == 2 and "'../outside.safetensors', outside the folder" in r.stderr


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_disk_full_while_writing(ckpt, tmp_path):
    """Writes fail part-way (RLIMIT_FSIZE: EFBIG, like ENOSPC to the writer): one line, nothing left behind."""
    target = tmp_path / "o"
    proc = merge_proc(ckpt, target, "--max-shard-size", "30KB", preexec_fn=_limit_file_size(20_000))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "error: writing model-0000" in err and "File too large" in err and "Traceback" not in err
    assert not target.exists() and leftovers(target) == []


def test_disk_full_keeps_the_previous_output(ckpt, tmp_path):
    target = tmp_path / "o"
    assert run("merge", "--local-dir", ckpt, "--target-dir", target).returncode == 0
    before = folder_bytes(target)
    proc = merge_proc(ckpt, target, "--overwrite", "--dtype", "fp16", preexec_fn=_limit_file_size(20_000))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "File too large" in err
    assert folder_bytes(target) == before and leftovers(target) == []


def _wait_for_staging(target: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not leftovers(target):
        assert proc.poll() is None and time.time() < deadline, "merge ended before writing started"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_merge(sig, mid_checkpoint, tmp_path):
    target = tmp_path / "o"
    proc = merge_proc(mid_checkpoint, target, "--max-shard-size", "50MB")
    _wait_for_staging(target, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert not target.exists() and leftovers(target) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_then_rerun_is_byte_identical(seed, mid_checkpoint, tmp_path_factory, tmp_path):
    reference = tmp_path_factory.getbasetemp() / "mid_reference"
    if not reference.exists():
        assert run("merge", "--local-dir", mid_checkpoint, "--target-dir", reference, "--max-shard-size",
                   "50MB").returncode == 0
    target = tmp_path / "o"
    proc = merge_proc(mid_checkpoint, target, "--max-shard-size", "50MB")
    _wait_for_staging(target, proc)
    time.sleep(random.Random(seed).uniform(0, 1.5))
    proc.kill()
    proc.wait()
    assert not target.exists() or folder_bytes(target) == folder_bytes(reference)  # never a half model
    rerun = run("merge", "--local-dir", mid_checkpoint, "--target-dir", target, "--max-shard-size", "50MB",
                "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    assert folder_bytes(target) == folder_bytes(reference) and leftovers(target) == []


@pytest.fixture
def immutable_dir(tmp_path):
    """A directory nobody, root included, may write into (chattr +i): what a read-only target looks like."""
    d = tmp_path / "ro"
    d.mkdir()
    subprocess.run(["chattr", "+i", str(d)], check=True)
    yield d
    subprocess.run(["chattr", "-i", str(d)], check=True)


def test_read_only_target_dir(ckpt, immutable_dir):
    r = run("merge", "--local-dir", ckpt, "--target-dir", immutable_dir / "o")
    assert r.returncode == 2 and "is not writable" in r.stderr
    assert list(immutable_dir.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB filesystem, so the write fails with ENOSPC itself."""
    d = tmp_path / "tiny"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_no_space_left_on_device(ckpt, tiny_tmpfs):
    target = tiny_tmpfs / "o"
    r = run("merge", "--local-dir", ckpt, "--target-dir", target)
    assert r.returncode == 2 and "No space left on device" in r.stderr
    assert list(tiny_tmpfs.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_a_claim_or_clean_up_waits_for_its_end(sig):
    """Taking the lock, making the staging folder, the swap and the clean-up run to their end when Ctrl-C or SIGTERM
    arrives inside them (else a lock file or staging folder was left behind); the signal then interrupts as usual."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt), uninterrupted():
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler has run by now
            done.append("the block went on")
        assert done == ["the block went on"]
        assert signal.getsignal(signal.SIGTERM) is _interrupt and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
