"""Merging real FSDP checkpoints: bit-exact tensors, save_pretrained's key set, equal logits, a truthful config."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from hubexport.examples import PROMPT
from hubexport.executor import merge
from hubexport.options import Output
from tests.fsdp_cases import CASES, actor_dir
from tests.tensors import folder_tensors


@pytest.fixture(scope="module")
def merged(fsdp_root, tmp_path_factory):
    """Every case merged once through the public API."""
    out = tmp_path_factory.mktemp("merged")
    return {name: (merge(actor_dir(fsdp_root, name), Output(out / name), log=lambda _: None), out / name) for name in CASES}


def auto_class(case):
    return transformers.AutoModelForTokenClassification if case.critic else transformers.AutoModelForCausalLM


@pytest.mark.parametrize("name", list(CASES))
def test_tensors_bit_exact_through_transformers_loading(name, merged, fsdp_root):
    """transformers' own loader (independent of hubexport) turns the files back into the trained model exactly."""
    case = CASES[name]
    _, folder = merged[name]
    reference = load_file(fsdp_root / name / "expected" / "state_dict.safetensors")
    model = auto_class(case).from_pretrained(folder, dtype="auto")
    loaded = model.state_dict()
    assert set(reference) == set(loaded)
    for key, value in reference.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name", list(CASES))
def test_key_set_is_what_save_pretrained_writes(name, merged, tmp_path):
    """Same names, shapes and dtypes as save_pretrained of a freshly built model of the merged config."""
    case = CASES[name]
    _, folder = merged[name]
    config = transformers.AutoConfig.from_pretrained(folder)
    fresh = auto_class(case).from_config(config, dtype=config.dtype)
    fresh.save_pretrained(tmp_path / "fresh")
    expected, got = {}, {}
    for d, into in ((tmp_path / "fresh", expected), (folder, got)):
        for f in d.glob("*.safetensors"):
            with safe_open(f, "pt") as sf:
                into.update({k: (tuple(sf.get_slice(k).get_shape()), sf.get_slice(k).get_dtype()) for k in sf.keys()})
    assert got == expected


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_the_trained_model(name, merged, fsdp_root):
    case = CASES[name]
    _, folder = merged[name]
    model = auto_class(case).from_pretrained(folder, dtype="auto").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROMPT)).logits.float()
    expected = torch.load(fsdp_root / name / "expected" / "logits.pt")
    tol = 2e-2 if case.dtype == "bfloat16" else 1e-5
    torch.testing.assert_close(logits, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_config_tells_the_truth(name, merged):
    case = CASES[name]
    result, folder = merged[name]
    config = json.loads((folder / "config.json").read_text())
    family = {"qwen2": "Qwen2", "llama": "Llama", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe",
              "deepseek_v3": "DeepseekV3"}[case.family]
    head = "ForTokenClassification" if case.critic else "ForCausalLM"
    assert config["architectures"] == [family + head]
    assert config["dtype"] == case.dtype
    assert config["tie_word_embeddings"] is case.tied
    assert result.tied_embeddings is case.tied and result.value_model is case.critic
    names = set(folder_tensors(folder))
    assert ("lm_head.weight" in names) is (not case.tied and not case.critic)
    if case.critic:
        assert transformers.AutoConfig.from_pretrained(folder).num_labels == 1 and "score.weight" in names
    assert result.parallel == {"world_size": case.world_size}
    assert result.global_step == 1


@pytest.mark.parametrize("name", ["qwen3moe_fsdp2_w2", "qwen3moe_fsdp1_w4_bf16"])
def test_fused_experts_are_saved_per_expert(name, merged, fsdp_root):
    """transformers 5 trains with fused [E, 2I, H] experts; the file holds per-expert gate/up/down (formula check)."""
    _, folder = merged[name]
    reference = load_file(fsdp_root / name / "expected" / "state_dict.safetensors")
    saved = folder_tensors(folder)
    gate_up = reference["model.layers.1.mlp.experts.gate_up_proj"]
    down = reference["model.layers.1.mlp.experts.down_proj"]
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        prefix = f"model.layers.1.mlp.experts.{e}."
        assert torch.equal(saved[prefix + "gate_proj.weight"], gate_up[e, :inter])
        assert torch.equal(saved[prefix + "up_proj.weight"], gate_up[e, inter:])
        assert torch.equal(saved[prefix + "down_proj.weight"], down[e])
    assert not any("gate_up_proj" in k for k in saved)


def test_support_files_copied(merged):
    _, folder = merged["qwen2_fsdp2_w2_dim1"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "</s>" and tok.vocab_size == 127
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert gen.temperature == 0.7
    _, legacy = merged["llama_legacy_w1"]
    assert {p.name for p in legacy.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def test_dim1_and_uneven_shards_really_occur(fsdp_root):
    """Guard the fixtures themselves: the layouts the merge must handle are really on disk."""
    from hubexport.sources.fsdp import load_rank_file

    sd = load_rank_file(actor_dir(fsdp_root, "qwen2_fsdp2_w2_dim1") / "model_world_size_2_rank_0.pt")
    assert sd["model.embed_tokens.weight"].placements[0].dim == 1
    sd = load_rank_file(actor_dir(fsdp_root, "qwen2_fsdp2_w3") / "model_world_size_3_rank_2.pt")
    local = sd["model.layers.0.self_attn.q_proj.weight"]._local_tensor
    assert local.shape[0] < -(-32 // 3)
    sd = load_rank_file(actor_dir(fsdp_root, "qwen2_hsdp_fsdp2_w4") / "model_world_size_4_rank_3.pt")
    assert sd["model.norm.weight"].device_mesh.mesh_dim_names == ("ddp", "fsdp")
    buffer = "model.layers.1.mlp.gate.e_score_correction_bias"
    copies = [load_rank_file(actor_dir(fsdp_root, "dsv3_fsdp2_w2") / f"model_world_size_2_rank_{r}.pt")[buffer]
              for r in range(2)]
    assert all(type(t) is torch.Tensor and t.shape == (4,) for t in copies) and torch.equal(*copies)
    assert copies[0].abs().sum() > 0
    sd = load_rank_file(actor_dir(fsdp_root, "qwen2_plain_w1") / "model_world_size_1_rank_0.pt")
    assert all(type(t) is torch.Tensor for t in sd.values())
