"""`hubexport to-megatron` on models as the Hub publishes them: the seed's own command with a Hub id (downloaded from
the emulator through the real huggingface_hub client, pinned, offline from the cache), and DeepSeek-V3's FP8 block
quantization dequantized on the fly, bit-exactly as DeepSeek's kernel computes it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hubexport.cli import cli
from tests.hub_fixtures import TOKEN, USER
from tests.test_quantized import _tiny_deepseek, reference
from tests.test_to_megatron import stored
from tests.tree import tree_hash

REPO = f"{USER}/tiny-dsv3-fp8"


def run(*args, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fp8") / "model"
    _tiny_deepseek(folder)
    return folder


@pytest.fixture(scope="module")
def dequantized_folder(fp8_folder: Path, tmp_path_factory) -> Path:
    """What the published FP8 model means: every weight dequantized by the reference formula, config unquantized."""
    out = tmp_path_factory.mktemp("bf16") / "model"
    shutil.copytree(fp8_folder, out)
    sd = load_file(fp8_folder / "model.safetensors")
    plain = {n: reference(t, sd[n + "_scale_inv"], torch.bfloat16) if t.dtype == torch.float8_e4m3fn else t
             for n, t in sd.items() if not n.endswith("_scale_inv")}
    save_file(plain, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_fp8_checkpoint_converts_like_its_dequantized_weights(fp8_folder, dequantized_folder, tmp_path) -> None:
    before = tree_hash(fp8_folder)
    r = run("to-megatron", "--hf-model-path", fp8_folder, "--output-path", tmp_path / "fp8", "--test", "--json")
    assert r.exit_code == 0, r.output
    assert run("to-megatron", "--hf-model-path", dequantized_folder, "--output-path", tmp_path / "bf16").exit_code == 0
    got, want = stored(tmp_path / "fp8"), stored(tmp_path / "bf16")
    assert got.keys() == want.keys() and not any("scale_inv" in k for k in got)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
    assert json.loads(r.stdout)["dtype"] == "bfloat16" and tree_hash(fp8_folder) == before


def test_fp8_round_trip_gives_the_dequantized_model(fp8_folder, dequantized_folder, tmp_path) -> None:
    actor = tmp_path / "global_step_1" / "actor"
    assert run("to-megatron", "--hf-model-path", fp8_folder, "--output-path", actor / "dist_ckpt").exit_code == 0
    (actor / "huggingface").mkdir()
    shutil.copy(dequantized_folder / "config.json", actor / "huggingface" / "config.json")
    r = run("merge", "--backend", "megatron", "--local-dir", actor, "--target-dir", tmp_path / "back")
    assert r.exit_code == 0, r.output
    back, want = load_file(tmp_path / "back" / "model.safetensors"), load_file(dequantized_folder / "model.safetensors")
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_quantizations_are_refused_by_name(method, dequantized_folder, tmp_path) -> None:
    folder = Path(shutil.copytree(dequantized_folder, tmp_path / "q"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    r = run("to-megatron", "--hf-model-path", folder, "--output-path", tmp_path / "out")
    assert r.exit_code == 2 and method in r.stderr and "hint:" in r.stderr and not (tmp_path / "out").exists()


def test_the_seeds_command_with_a_hub_id(fp8_folder, fakehub, hf_home, tmp_path, monkeypatch) -> None:
    """`to-megatron --hf_model_path ORG/NAME` as verl's docs write it, against the emulator: downloaded once, the
    commit recorded, then again offline from the cache; a repo that is not cached offline is one line."""
    api = HfApi(endpoint=fakehub.url, token=TOKEN)
    api.create_repo(REPO)
    sha = api.upload_folder(repo_id=REPO, folder_path=fp8_folder).oid
    r = run("to-megatron", "--hf_model_path", REPO, "--output_path", tmp_path / "a", "--use_cpu_initialization",
            "--test", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resolved"] == {"repo_id": REPO, "revision": None, "sha": sha,
                                                "path": str(hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
                                                            / "snapshots" / sha)}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run("to-megatron", "--hf-model-path", f"{REPO}@{sha}", "--output-path", tmp_path / "b")
    assert r.exit_code == 0, r.output
    a, b = stored(tmp_path / "a"), stored(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r = run("to-megatron", "--hf-model-path", f"{USER}/never-downloaded", "--output-path", tmp_path / "c")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and f"{USER}/never-downloaded" in errors[0]
    assert not (tmp_path / "c").exists()
