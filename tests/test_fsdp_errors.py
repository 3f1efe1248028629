"""Bad FSDP input: one line naming the file and the fix, exit code 2, nothing written at the target."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hubexport.cli import cli
from tests.fsdp_cases import actor_dir


@pytest.fixture
def ckpt(fsdp_root, tmp_path) -> Path:
    """A private, damageable copy of a W=2 FSDP2 checkpoint."""
    dst = tmp_path / "run" / "global_step_1" / "actor"
    shutil.copytree(actor_dir(fsdp_root, "qwen2_fsdp2_w2_dim1"), dst)
    return dst


def merge_cli(src: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    """In-process through Click (fast); one test below runs the real subprocess."""
    r = CliRunner().invoke(cli, ["merge", "--local-dir", str(src), "--target-dir", str(target), *extra])
    return subprocess.CompletedProcess(["hubexport"], r.exit_code, r.stdout, r.stderr)


def assert_clean_failure(proc: subprocess.CompletedProcess, target: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[-2] + lines[-1], proc.stderr
    assert not target.exists()
    assert not any(p.name.startswith(f".{target.name}") for p in target.parent.iterdir())


def test_missing_rank_file_in_a_real_process(ckpt, tmp_path):
    (ckpt / "model_world_size_2_rank_1.pt").unlink()
    proc = subprocess.run([sys.executable, "-m", "hubexport", "merge", "--local-dir", str(ckpt), "--target-dir",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert_clean_failure(proc, tmp_path / "o", "model_world_size_2_rank_1.pt", "missing")


def test_world_size_mismatch(ckpt, tmp_path):
    (ckpt / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "fsdp_config.json", "world_size=4")


def test_two_world_sizes_mixed(ckpt, tmp_path):
    shutil.copy(ckpt / "model_world_size_2_rank_0.pt", ckpt / "model_world_size_4_rank_0.pt")
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "several world sizes")


def test_truncated_rank_file(ckpt, tmp_path):
    f = ckpt / "model_world_size_2_rank_1.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "model_world_size_2_rank_1.pt", "truncated")


def test_corrupt_rank_file(ckpt, tmp_path):
    f = ckpt / "model_world_size_2_rank_0.pt"
    data = bytearray(f.read_bytes())
    data[:64] = os.urandom(64)
    f.write_bytes(bytes(data))
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "model_world_size_2_rank_0.pt", "corrupt")


def test_no_config_anywhere(ckpt, tmp_path):
    shutil.rmtree(ckpt / "huggingface")
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "no config.json", "huggingface/")


def test_unknown_layout(tmp_path):
    src = tmp_path / "random"
    src.mkdir()
    (src / "notes.txt").write_text("hello")
    assert_clean_failure(merge_cli(src, tmp_path / "o"), tmp_path / "o",
                         "is not a verl FSDP, Megatron, torch DCP or DeepSpeed checkpoint")


def test_missing_directory(tmp_path):
    assert_clean_failure(merge_cli(tmp_path / "nope", tmp_path / "o"), tmp_path / "o", "does not exist")


def test_target_is_a_file(ckpt, tmp_path):
    target = tmp_path / "o"
    target.write_text("x")
    proc = merge_cli(ckpt, target)
    assert proc.returncode == 2 and "is a file" in proc.stderr and target.read_text() == "x"


def test_config_contradicting_weights(ckpt, tmp_path):
    cfg = json.loads((ckpt / "huggingface" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (ckpt / "huggingface" / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "has shape", "config.json")


def test_untied_weights_under_a_tied_config(ckpt, tmp_path):
    """A config claiming tied embeddings must not silently drop a trained, different lm_head."""
    cfg = json.loads((ckpt / "huggingface" / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (ckpt / "huggingface" / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "lm_head.weight differs")


def test_unknown_architecture(ckpt, tmp_path):
    cfg = json.loads((ckpt / "huggingface" / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForSomethingNew"]
    (ckpt / "huggingface" / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "Qwen2ForSomethingNew")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    sd = {"model.embed_tokens.weight": torch.zeros(2), "evil": _Exploit(marker)}
    with open(ckpt / "model_world_size_2_rank_1.pt", "wb") as f:
        torch.save(sd, f, pickle_module=pickle)
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "model_world_size_2_rank_1.pt", "refused")
    assert not marker.exists()


def test_rank_files_of_different_models(ckpt, fsdp_root, tmp_path):
    shutil.copy(actor_dir(fsdp_root, "llama_fsdp1_w2_tied_bf16") / "model_world_size_2_rank_1.pt",
                ckpt / "model_world_size_2_rank_1.pt")
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "model_world_size_2_rank_1.pt")


def test_failed_overwrite_keeps_previous_output(ckpt, tmp_path):
    target = tmp_path / "o"
    assert merge_cli(ckpt, target).returncode == 0
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    (ckpt / "model_world_size_2_rank_1.pt").write_bytes(b"garbage")
    proc = merge_cli(ckpt, target, "--overwrite")
    assert proc.returncode == 2 and "model_world_size_2_rank_1.pt" in proc.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
