"""`hubexport to-megatron` as users drive it: verl's spellings, --json, --test, --overwrite, errors with hints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubexport.cli import cli
from tests.fixtures_mcore import tiny_hf


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return tiny_hf("qwen3", tmp_path_factory.mktemp("hf") / "qwen3")


def test_verl_spelling_with_test(qwen3, tmp_path) -> None:
    out = tmp_path / "mcore"
    r = run("to-megatron", "--hf_model_path", str(qwen3), "--output_path", str(out), "--use_cpu_initialization",
            "--test", "--pp_size", "2")
    assert r.exit_code == 0, r.output
    assert (out / "metadata.json").is_file() and (out / ".metadata").is_file()
    assert "bit-exact" in r.stderr and "--pp_size/--ep_size ignored" in r.stderr


def test_json_and_local_spec(qwen3, tmp_path) -> None:
    r = run("to-megatron", "--hf-model-path", str(qwen3), "--output-path", str(tmp_path / "mcore"), "--spec",
            "local", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    m = info["megatron"]
    assert m["spec"] == "local" and m["layer_keys"] == "stacked" and m["tested"] is False
    assert info["architecture"] == "Qwen3ForCausalLM" and m["padded_vocab"] == 128
    assert m["num_tensors"] == 2 + 4 * 8 + 1  # embed, final norm; 8 per layer; untied output layer


def test_same_input_same_bytes(qwen3, tmp_path) -> None:
    """Two runs write byte-identical folders: `.metadata` records neither the run's staging folder nor a random
    save id (torch's writer would put both there)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run("to-megatron", "--hf-model-path", str(qwen3), "--output-path", str(out)).exit_code == 0
    a, b = ({p.relative_to(o): p.read_bytes() for p in sorted(o.rglob("*")) if p.is_file()} for o in outs)
    assert a == b and a
    assert b"hubexport-partial" not in a[Path(".metadata")]


def test_non_empty_output_refused_then_overwritten(qwen3, tmp_path) -> None:
    out = tmp_path / "mcore"
    out.mkdir()
    (out / "old.txt").write_text("x")
    r = run("to-megatron", "--hf-model-path", str(qwen3), "--output-path", str(out))
    assert r.exit_code == 2
    assert "is not empty" in r.stderr and "--overwrite" in r.stderr
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    r = run("to-megatron", "--hf-model-path", str(qwen3), "--output-path", str(out), "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "old.txt").exists() and (out / "common.pt").is_file()


def test_not_a_model_folder(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    r = run("to-megatron", "--hf-model-path", str(tmp_path / "in"), "--output-path", str(tmp_path / "out"))
    assert r.exit_code == 2 and "config.json does not exist" in r.stderr and "hint:" in r.stderr
    assert not (tmp_path / "out").exists()


def test_python_dash_m_entry_point(qwen3, tmp_path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "hubexport", "to-megatron", "--hf_model_path", str(qwen3),
                           "--output_path", str(tmp_path / "mcore"), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["megatron"]["num_keys"] == 2 + 8 + 1
