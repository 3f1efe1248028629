"""verl's Megatron LoRA (Megatron-Bridge LoRALinear adapters, TP=2, saved by megatron-core): exported as a PEFT adapter
PEFT loads onto the base model with the trained model's logits, or fused bit-exactly — from torch_dist or from
verl <= 0.8's adapter_checkpoint/ rank files (TP=2, and TP=1 PP=2) — and the refusals (alpha unknown, a LoRA with no
mapping, a PEFT checkpoint without adapter tensors). Expected values come from the LoRA matrices the
fixture drew in HF space and from the megatron model's own forward."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from hubexport import lora
from hubexport import mcore_lora as mlora
from hubexport.cli import cli
from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError, MappingError
from hubexport.executor import merge as run_merge
from hubexport.options import MergeOptions, Output
from tests.fixtures_mcore import IDS
from tests.fixtures_mcore_lora import ALPHA, PEFT, R
from tests.tensors import folder_tensors

TOL = 1e-4  # megatron's forward vs transformers' + PEFT's, fp32


def quiet(_: str) -> None:
    pass


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits.float()


# v1_full: base + adapters in dist_ckpt; v2_adapter: adapters in model/dist_ckpt; v1_base: the base in dist_ckpt, the
# adapters in adapter_checkpoint/ rank files; v1_adapter, pp2_adapter: adapter rank files only (TP=2; TP=1 PP=2)
LAYOUTS = ["v1_full", "v2_adapter", "v1_base", "v1_adapter", "pp2_adapter"]


def options(case, layout: str) -> dict:
    """verl <= 0.8 records no alpha (pass it); adapters-only layouts take the base from --base-model."""
    alpha = {} if layout == "v2_adapter" else {"lora_alpha": ALPHA}
    base = {"lora_base_model": case.hf_ref} if layout in ("v2_adapter", "v1_adapter", "pp2_adapter") else {}
    return {**alpha, **base}


@pytest.fixture(scope="module")
def exported(mcore_lora, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore_lora_out")
    done = {}
    for layout in LAYOUTS:
        for mode in ("adapter", "fuse"):
            target = out / f"{layout}-{mode}"
            opts = MergeOptions(lora_mode=mode, **options(mcore_lora, layout))
            done[layout, mode] = (run_merge(getattr(mcore_lora, layout), Output(target), opts, log=quiet), target)
    return done


@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapter_loads_with_peft_and_gives_the_trained_logits(layout, exported, mcore_lora):
    result, target = exported[layout, "adapter"]
    base_ref = load_file(mcore_lora.hf_ref / "model.safetensors")
    written = folder_tensors(target)
    assert set(written) == set(base_ref)
    for key, value in base_ref.items():  # the base model is what training started from
        assert torch.equal(written[key], value), key
    expected = torch.load(mcore_lora.logits)
    base = transformers.AutoModelForCausalLM.from_pretrained(target)
    assert (logits_of(base) - expected).abs().max() > 100 * TOL  # the LoRA really changes the model
    peft_model = PeftModel.from_pretrained(base, target / lora.ADAPTER_DIR)
    torch.testing.assert_close(logits_of(peft_model), expected, rtol=TOL, atol=TOL)
    assert result.lora["r"] == R and result.lora["lora_alpha"] == ALPHA and result.lora["modules"] == 14


@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapter_tensors_are_the_trained_matrices_under_peft_names(layout, exported, mcore_lora):
    _, target = exported[layout, "adapter"]
    adapter = load_file(target / lora.ADAPTER_DIR / "adapter_model.safetensors")
    expected = load_file(mcore_lora.expected_adapter)
    assert set(adapter) == set(expected)
    for key, value in expected.items():
        assert torch.equal(adapter[key], value), key
    config = LoraConfig.from_pretrained(target / lora.ADAPTER_DIR)
    assert (config.r, config.lora_alpha) == (R, ALPHA)
    assert sorted(config.target_modules) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_weights_are_w_plus_scaled_ba(layout, exported, mcore_lora):
    _, target = exported[layout, "fuse"]
    assert not (target / lora.ADAPTER_DIR).exists()
    base_ref = load_file(mcore_lora.hf_ref / "model.safetensors")
    mats = load_file(mcore_lora.expected_adapter)
    fused = folder_tensors(target)
    assert set(fused) == set(base_ref)
    scale = ALPHA / R
    changed = 0
    for key, w in base_ref.items():
        module = key.removesuffix(".weight")
        a_key = f"{PEFT}{module}.lora_A.weight"
        if a_key in mats:  # computed here, independently of hubexport: W + (alpha/r)·B·A in fp32
            want = (w.float() + scale * (mats[f"{PEFT}{module}.lora_B.weight"].float() @ mats[a_key].float())).to(w.dtype)
            changed += 1
        else:
            want = w
        assert torch.equal(fused[key], want), key
    assert changed == 14
    model = transformers.AutoModelForCausalLM.from_pretrained(target)
    torch.testing.assert_close(logits_of(model), torch.load(mcore_lora.logits), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("layout", ["v2_adapter", "v1_adapter"])
def test_adapter_only_checkpoint_without_base_model_writes_the_adapter_alone(layout, mcore_lora, tmp_path):
    opts = MergeOptions(lora_alpha=None if layout == "v2_adapter" else ALPHA)
    run_merge(getattr(mcore_lora, layout), Output(tmp_path / "o"), opts, log=quiet)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [lora.ADAPTER_DIR]
    adapter = load_file(tmp_path / "o" / lora.ADAPTER_DIR / "adapter_model.safetensors")
    assert adapter.keys() == load_file(mcore_lora.expected_adapter).keys()


def test_unknown_alpha_is_a_one_line_error(mcore_lora, tmp_path):
    r = CliRunner().invoke(cli, ["merge", "--local-dir", str(mcore_lora.v1_full), "--target-dir", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert "lora_alpha" in r.stderr and "--lora-alpha" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_lora_on_a_module_without_mapping_is_refused(mcore_lora):
    config = transformers.AutoConfig.from_pretrained(mcore_lora.hf_ref)
    metas = {"output_layer.adapter.linear_in.weight": TensorSpec("output_layer.adapter.linear_in.weight", (R, 64),
                                                                 torch.float32),
             "output_layer.adapter.linear_out.weight": TensorSpec("output_layer.adapter.linear_out.weight",
                                                                  (128, R), torch.float32)}
    _, modules = mlora.split_adapter_keys(metas)
    with pytest.raises(MappingError, match="LoRA on output_layer has no Hugging Face"):
        mlora.peft_groups(modules, metas, config)


def test_half_an_adapter_is_refused():
    metas = {"decoder.layers.0.mlp.linear_fc2.adapter.linear_in.weight":
             TensorSpec("decoder.layers.0.mlp.linear_fc2.adapter.linear_in.weight", (R, 96), torch.float32)}
    with pytest.raises(MappingError, match=r"only decoder\.layers\.0\.mlp\.linear_fc2\.adapter\.linear_in\.weight"):
        mlora.split_adapter_keys(metas)


def test_peft_checkpoint_without_adapter_tensors_is_refused(tmp_path, mcore_lora):
    """ckpt_contents.json says peft but model/dist_ckpt/ holds no adapter: never export the base alone."""
    actor = tmp_path / "actor"
    hf = actor / "model/huggingface"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text((mcore_lora.hf_ref / "config.json").read_text())
    (actor / "model" / "dist_ckpt").mkdir(parents=True)
    (actor / "ckpt_contents.json").write_text(json.dumps({"schema_version": 2, "backend": {"peft": True}}))
    with pytest.raises(CheckpointError, match="Megatron LoRA checkpoint"):
        run_merge(actor, Output(tmp_path / "o"), MergeOptions(), log=quiet)
    assert not (tmp_path / "o").exists()
