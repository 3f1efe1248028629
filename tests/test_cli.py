"""The CLI as users drive it: verl's flag spellings, the console script, --json, --dry-run, sharding, casting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open

from hubexport.cli import cli
from tests.fsdp_cases import actor_dir


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def dtypes_in(folder) -> set[str]:
    found = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            found |= {sf.get_slice(k).get_dtype() for k in sf.keys()}
    return found


def test_verl_spelling_merges(fsdp_root, tmp_path):
    src = actor_dir(fsdp_root, "qwen2_fsdp2_w2_dim1")
    r = run("merge", "--backend", "fsdp", "--local_dir", str(src), "--target_dir", str(tmp_path / "out"),
            "--use_cpu_initialization")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.architectures == [
        "Qwen2ForCausalLM"]


def test_run_root_resolves_latest_step_and_json(fsdp_root, tmp_path):
    r = run("merge", "--local-dir", str(fsdp_root / "qwen3_fsdp2_w2_tied"), "--target-dir", str(tmp_path / "o"),
            "--json")
    assert r.exit_code == 0, r.output
    assert "latest_checkpointed_iteration.txt says step 1" in r.stderr
    result = json.loads(r.stdout)
    assert result["source_version"] == "fsdp2" and result["tied_embeddings"] is True
    assert result["architecture"] == "Qwen3ForCausalLM" and result["global_step"] == 1
    [f] = result["files"]
    assert f["size"] == (tmp_path / "o" / "model.safetensors").stat().st_size and len(f["sha256"]) == 64


def test_dry_run_writes_nothing(fsdp_root, tmp_path):
    r = run("merge", "--local-dir", str(actor_dir(fsdp_root, "qwen3moe_fsdp2_w2")), "--target-dir",
            str(tmp_path / "o"), "--dry-run", "--json", "--max-shard-size", "10KB")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert len(plan["files"]) > 1 and all(f["sha256"] is None for f in plan["files"])
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_sharded_output_with_index(fsdp_root, tmp_path):
    out = tmp_path / "o"
    r = run("merge", "--local-dir", str(actor_dir(fsdp_root, "qwen3moe_fsdp2_w2")), "--target-dir", str(out),
            "--max-shard-size", "10KB")
    assert r.exit_code == 0, r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    data_bytes = 0
    for p in shards:
        with safe_open(p, "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                data_bytes += t.numel() * t.element_size()
                assert index["weight_map"][k] == p.name
    assert index["metadata"]["total_size"] == data_bytes
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 4


def test_dtype_cast_on_purpose(fsdp_root, tmp_path):
    out = tmp_path / "o"
    assert run("merge", "--local-dir", str(actor_dir(fsdp_root, "qwen2_fsdp2_w3")), "--target-dir", str(out),
               "--dtype", "bf16").exit_code == 0
    assert dtypes_in(out) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert dtypes_in(fsdp_root / "qwen2_fsdp2_w3" / "expected") == {"F32"}


def test_default_keeps_fp32(fsdp_root, tmp_path):
    out = tmp_path / "o"
    assert run("merge", "--local-dir", str(actor_dir(fsdp_root, "qwen2_fsdp2_w3")), "--target-dir", str(out)).exit_code == 0
    assert dtypes_in(out) == {"F32"}


def test_overwrite_replaces_and_refusal_keeps(fsdp_root, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    src = str(actor_dir(fsdp_root, "qwen2_plain_w1"))
    r = run("merge", "--local-dir", src, "--target-dir", str(out))
    assert r.exit_code == 2 and "is not empty" in r.stderr and "--overwrite" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run("merge", "--local-dir", src, "--target-dir", str(out), "--overwrite").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging or backup left behind


def test_tie_flag_contradicting_config_is_an_error(fsdp_root, tmp_path):
    r = run("merge", "--local-dir", str(actor_dir(fsdp_root, "qwen2_fsdp2_w4")), "--target-dir", str(tmp_path / "o"),
            "--tie-word-embedding")
    assert r.exit_code == 2 and "tie_word_embeddings=false" in r.stderr
    assert not (tmp_path / "o").exists()
    ok = run("merge", "--local-dir", str(actor_dir(fsdp_root, "llama_hsdp_fsdp1_w4_tied")), "--target-dir",
             str(tmp_path / "t"), "--tie-word-embedding")
    assert ok.exit_code == 0, ok.output


def test_value_model_flag(fsdp_root, tmp_path):
    r = run("merge", "--local-dir", str(actor_dir(fsdp_root, "qwen2_fsdp2_w4")), "--target-dir", str(tmp_path / "o"),
            "--is-value-model")
    assert r.exit_code == 2 and "score.weight" in r.stderr
    ok = run("merge", "--local-dir", str(actor_dir(fsdp_root, "qwen2_critic_fsdp2_w2")), "--target-dir",
             str(tmp_path / "c"), "--is_value_model")
    assert ok.exit_code == 0
    model = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "c")
    assert model.config.num_labels == 1


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "hubexport"], ["hubexport"]])
def test_real_subprocess(entry, fsdp_root, tmp_path):
    assert entry[0] != "hubexport" or shutil.which("hubexport"), "the console script is not installed (pip install .)"
    out = tmp_path / "o"
    proc = subprocess.run([*entry, "merge", "--local-dir", str(actor_dir(fsdp_root, "llama_fsdp1_w3_bf16")),
                           "--target-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
