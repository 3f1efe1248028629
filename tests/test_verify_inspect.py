"""`verify` finds every kind of difference and nothing else; `inspect` reports what the fixtures know they are."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hubexport.cli import cli
from hubexport.executor import merge
from hubexport.options import MergeOptions, Output
from tests.fsdp_cases import CASES, actor_dir

SOURCE = "qwen3moe_fsdp2_w2"


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def merged(fsdp_root, tmp_path_factory):
    """The same checkpoint merged single-file and sharded."""
    out = tmp_path_factory.mktemp("verify")
    merge(actor_dir(fsdp_root, SOURCE), Output(out / "single"), log=lambda _: None)
    merge(actor_dir(fsdp_root, SOURCE), Output(out / "sharded"), MergeOptions(max_shard_size="10KB"),
          log=lambda _: None)
    assert len(list((out / "sharded").glob("*.safetensors"))) > 2
    return out


def altered(merged, tmp_path, change) -> object:
    """A copy of the single-file folder whose tensors went through `change(dict)`."""
    dst = tmp_path / "altered"
    shutil.copytree(merged / "single", dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_identical_folders_pass(merged):
    r = run("verify", merged / "single", "--reference", merged / "single", "--logits", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["ok"] is True and report["compared"] > 40 and report["max_logit_diff"] == 0.0


def test_sharded_against_single_file_both_ways(merged):
    assert run("verify", merged / "sharded", "--reference", merged / "single").exit_code == 0
    assert run("verify", merged / "single", "--reference", merged / "sharded").exit_code == 0


def test_one_ulp_is_found_and_named(merged, tmp_path):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"

    def nudge(t):
        flat = t[name].view(-1)
        flat[5] = torch.nextafter(flat[5], torch.tensor(float("inf")))

    r = run("verify", altered(merged, tmp_path, nudge), "--reference", merged / "single")
    assert r.exit_code == 1
    assert f"value    {name}: 1 of" in r.stdout and "flat index 5" in r.stdout
    assert r.stdout.count("value ") == 1 and "DIFFERENT" in r.stdout


def test_missing_extra_and_dtype(merged, tmp_path):
    def change(t):
        del t["model.norm.weight"]
        t["model.extra.weight"] = torch.zeros(3)
        t["lm_head.weight"] = t["lm_head.weight"].to(torch.bfloat16)

    r = run("verify", altered(merged, tmp_path, change), "--reference", merged / "sharded", "--json")
    assert r.exit_code == 1
    kinds = {(d["kind"], d["name"]) for d in json.loads(r.stdout)["differences"]}
    assert kinds == {("missing", "model.norm.weight"), ("extra", "model.extra.weight"), ("dtype", "lm_head.weight")}


def test_against_the_training_checkpoint(merged, fsdp_root, tmp_path):
    src = actor_dir(fsdp_root, SOURCE)
    assert run("verify", merged / "sharded", "--reference", src).exit_code == 0
    assert run("test", "--backend", "fsdp", "--local_dir", src, "--test_hf_dir", merged / "single").exit_code == 0

    def nudge(t):
        t["model.embed_tokens.weight"][0, 0] += 1

    bad = run("test", "--backend", "fsdp", "--local_dir", src, "--test_hf_dir", altered(merged, tmp_path, nudge))
    assert bad.exit_code == 1 and "model.embed_tokens.weight" in bad.stdout


def test_verify_needs_an_hf_candidate(fsdp_root, merged):
    r = run("verify", actor_dir(fsdp_root, SOURCE), "--reference", merged / "single")
    assert r.exit_code == 2 and "is not a Hugging Face folder" in r.stderr


def _expected_params(fsdp_root, name: str) -> int:
    sd = load_file(fsdp_root / name / "expected" / "state_dict.safetensors")
    case = CASES[name]
    return sum(t.numel() for k, t in sd.items() if not (case.tied and k == "lm_head.weight"))


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_fsdp_fixture(name, fsdp_root):
    case = CASES[name]
    r = run("inspect", actor_dir(fsdp_root, name), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == "fsdp"
    assert info["version"] == ("legacy" if case.legacy else {0: "fsdp2", 1: "fsdp1", 2: "fsdp2"}[case.fsdp])
    assert info["parallel"] == {"world_size": case.world_size}
    assert [f["path"].rsplit("/", 1)[1] for f in info["files"]] == [
        f"model_world_size_{case.world_size}_rank_{r}.pt" for r in range(case.world_size)]
    assert info["dtype"] == case.dtype and info["global_step"] == 1
    assert info["tied_embeddings"] is case.tied and info["value_model"] is case.critic
    assert info["architecture"].endswith("ForTokenClassification" if case.critic else "ForCausalLM")
    assert info["num_parameters"] == _expected_params(fsdp_root, name)
    itemsize = torch.finfo(getattr(torch, case.dtype)).bits // 8
    assert info["plan"]["total_size"] == info["num_parameters"] * itemsize
    assert info["plan"]["peak_tensor_bytes"] >= 2 * case.vocab_size * case.hidden_size * itemsize


def _hf_params(folder) -> int:
    return sum(t.numel() for f in folder.glob("*.safetensors") for t in load_file(f).values())


@pytest.mark.slow
def test_inspect_megatron_fixtures(mcore_tp2pp2, mcore_pp2, mcore_moe_ep2, mcore_tp1):
    cases = [(mcore_tp2pp2["v1"], "v1", {"tp": 2, "pp": 2}), (mcore_tp2pp2["v0"], "v0", {"tp": 2, "pp": 2}),
             (mcore_pp2["tied_v2"], "v2", {"pp": 2}), (mcore_moe_ep2["ep2"], "v1", {"ep": 2}),
             (mcore_tp1["critic"], "v1", {"tp": 1})]
    for case, version, parallel in cases:
        r = run("inspect", case.actor, "--json")
        assert r.exit_code == 0, r.output
        info = json.loads(r.stdout)
        ref = json.loads((case.hf_ref / "config.json").read_text())
        assert info["format"] == "megatron" and info["version"] == version
        assert {k: info["parallel"].get(k) for k in parallel} == parallel
        assert info["architecture"] == ref["architectures"][0]
        assert info["tied_embeddings"] is case.tied and info["value_model"] is case.value
        assert info["num_parameters"] == _hf_params(case.hf_ref)
        assert info["global_step"] == 3


def test_inspect_hf_folder(merged):
    r = run("inspect", merged / "sharded", "--json")
    info = json.loads(r.stdout)
    assert info["format"] == "hf" and info["architecture"] == "Qwen3MoeForCausalLM"
    assert len(info["files"]) == len(list((merged / "sharded").glob("*.safetensors")))
    single = json.loads(run("inspect", merged / "single", "--json").stdout)
    assert info["num_parameters"] == single["num_parameters"] == sum(
        math.prod(t.shape) for t in load_file(merged / "single" / "model.safetensors").values())
    text = run("inspect", merged / "single").stdout
    assert "Qwen3MoeForCausalLM" in text and f"{single['num_parameters']:,}" in text
