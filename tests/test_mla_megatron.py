"""DeepSeek-V3 (MLA, MoE with a sigmoid group-limited router and expert bias, shared experts, MTP) between Hugging Face
and megatron-core, proven with the real models on both sides: `to-megatron` output loaded strictly into a real
megatron-core GPTModel (tests/fixtures_mla.py), whose main logits equal transformers' DeepseekV3ForCausalLM and whose
MTP block computes what the HF MTP layer's weights compute; round trips keep the MTP layer bit-exact; FP8
block-quantized folders load as their dequantized reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hubexport.errors import MappingError
from hubexport.executor import to_megatron
from hubexport.options import MegatronOptions, Output
from tests.fixtures_mla import MAIN_LAYERS
from tests.mcore_check import IDS, assert_same_tensors, export_megatron, load_logits
from tests.test_to_megatron import stored

pytestmark = pytest.mark.slow
H = f"model.layers.{MAIN_LAYERS}."  # the HF MTP layer (DeepSeek-V3's layer 61)


def result(case) -> dict:
    return torch.load(case.loaded / "result.pt", weights_only=True)


def expected_mtp_state(sd: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """megatron's MTP block (local spec) from the HF MTP layer by the formats doc's formulas (test-side, not
    hubexport's tables)."""
    m, t = "mtp.layers.0.", "mtp.layers.0.transformer_layer."
    a, x = t + "self_attention.", H + "self_attn."
    out = {m + "enorm.weight": sd[H + "enorm.weight"], m + "hnorm.weight": sd[H + "hnorm.weight"],
           m + "eh_proj.weight": sd[H + "eh_proj.weight"],
           m + "final_layernorm.weight": sd[H + "shared_head.norm.weight"],
           t + "input_layernorm.weight": sd[H + "input_layernorm.weight"],
           a + "linear_kv_down_proj.weight": sd[x + "kv_a_proj_with_mqa.weight"],
           a + "kv_layernorm.weight": sd[x + "kv_a_layernorm.weight"],
           a + "linear_kv_up_proj.weight": sd[x + "kv_b_proj.weight"], a + "linear_proj.weight": sd[x + "o_proj.weight"],
           t + "pre_mlp_layernorm.weight": sd[H + "post_attention_layernorm.weight"],
           t + "mlp.router.weight": sd[H + "mlp.gate.weight"],
           t + "mlp.router.expert_bias": sd[H + "mlp.gate.e_score_correction_bias"]}
    if x + "q_a_proj.weight" in sd:
        out.update({a + "linear_q_down_proj.weight": sd[x + "q_a_proj.weight"],
                    a + "q_layernorm.weight": sd[x + "q_a_layernorm.weight"],
                    a + "linear_q_up_proj.weight": sd[x + "q_b_proj.weight"]})
    else:
        out[a + "linear_q_proj.weight"] = sd[x + "q_proj.weight"]
    mlps = {t + f"mlp.experts.local_experts.{e}.": H + f"mlp.experts.{e}." for e in range(n_experts)}
    for mc, hf in {**mlps, t + "mlp.shared_experts.": H + "mlp.shared_experts."}.items():
        out[mc + "linear_fc1.weight"] = torch.cat([sd[hf + "gate_proj.weight"], sd[hf + "up_proj.weight"]])
        out[mc + "linear_fc2.weight"] = sd[hf + "down_proj.weight"]
    return out


def mtp_reference_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """megatron's MTP computation (multi_token_prediction.py) on transformers' own modules and the HF MTP layer's
    weights: logits = head(norm_s(layer(eh_proj([enorm(embed(next ids)); hnorm(h)])))), h the main model's output,
    the next ids rolled left with a 0 at the end. The HF MTP layer is a decoder layer of a model one layer longer."""
    main = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir).eval()
    longer = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, num_hidden_layers=MAIN_LAYERS + 1).eval()
    sd = load_file(hf_dir / "model.safetensors")
    cfg = main.config

    def norm(name: str) -> torch.nn.Module:
        n = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n.weight.data.copy_(sd[H + name])
        return n

    with torch.no_grad():
        h = main.model(ids).last_hidden_state
        nxt = torch.roll(ids, -1, dims=1)
        nxt[:, -1] = 0
        x = torch.cat([norm("enorm.weight")(main.model.embed_tokens(nxt)), norm("hnorm.weight")(h)], dim=-1)
        x = x @ sd[H + "eh_proj.weight"].T
        pos = torch.arange(ids.shape[1])[None]
        mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)[None, None]
        x = longer.model.layers[MAIN_LAYERS](x, attention_mask=mask, position_ids=pos,
                                             position_embeddings=longer.model.rotary_emb(x, pos))
        return norm("shared_head.norm.weight")(x) @ sd[H + "shared_head.head.weight"].T


@pytest.mark.parametrize("name", ["mtp", "no_q_lora", "fp8"])
def test_gptmodel_main_logits_equal_transformers(mla_cases, name) -> None:
    """yarn rope + q_lora_rank (DeepSeek-V3's kind), default rope without q_lora_rank, and FP8 against its
    dequantized reference: the strictly loaded GPTModel's logits are transformers' own."""
    case = mla_cases[name]
    ref = load_logits(case.reference)
    got = result(case)["main"]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert ref.abs().max() > 1  # a real signal, not zeros
    if name == "fp8":  # quantized as published: several 128x128 blocks with ragged edges, MTP layer included
        sd = load_file(case.hf / "model.safetensors")
        scales = {n: t.shape for n, t in sd.items() if n.endswith("_scale_inv")}
        assert H + "self_attn.kv_b_proj.weight_scale_inv" in scales and any(s[0] * s[1] > 1 for s in scales.values())
        assert sd["model.layers.0.mlp.gate_proj.weight"].shape[0] % 128 != 0


@pytest.mark.parametrize("name", ["mtp", "fp8"])
def test_gptmodel_mtp_block_is_the_hf_mtp_layer(mla_cases, name) -> None:
    case = mla_cases[name]
    res = result(case)
    ref = load_file(case.reference / "model.safetensors")
    want = expected_mtp_state(ref, n_experts=4)
    assert sorted(res["state"]) == sorted(want)
    for k, w in want.items():
        assert res["state"][k].dtype == w.dtype and torch.equal(res["state"][k], w), k
    (mtp_logits,) = res["mtp"]
    torch.testing.assert_close(mtp_logits, mtp_reference_logits(case.reference, IDS), atol=2e-5, rtol=1e-5)


def test_to_megatron_records_the_mtp_block(mla_cases) -> None:
    case = mla_cases["mtp"]
    keys = set(stored(case.ckpt))
    assert "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc1.weight" in keys  # expert axis, like decoder's
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.eh_proj.weight", "mtp.layers.0.final_layernorm.weight"} <= keys
    assert not any("embed_tokens" in k or "shared_head" in k for k in keys)  # the copies: megatron shares its own
    assert any("mtp_num_layers=1" in n for n in case.notes) and any("bit-exact" in n for n in case.notes)


@pytest.mark.parametrize("spec", ["te", "local"])
def test_round_trip_keeps_the_mtp_layer_bit_exact(mla_cases, tmp_path, spec) -> None:
    """HF → to-megatron → merge gives every HF tensor back, the MTP layer and its embedding/head copies included."""
    hf = mla_cases["mtp"].hf
    actor = tmp_path / "actor"
    r = to_megatron(hf, Output(actor / "dist_ckpt"), MegatronOptions(spec=spec, test=True), log=lambda _: None)
    assert r.megatron.mtp_num_layers == 1
    (actor / "huggingface").mkdir()
    shutil.copy(hf / "config.json", actor / "huggingface" / "config.json")
    export_megatron(actor, tmp_path / "back")
    assert_same_tensors(tmp_path / "back", hf)
    assert H + "eh_proj.weight" in load_file(tmp_path / "back" / "model.safetensors")


def test_the_gptmodels_own_save_merges_back_to_the_hf_folder(mla_cases, tmp_path) -> None:
    """The merge direction on a checkpoint megatron-core itself wrote from a model with an MTP block."""
    export_megatron(mla_cases["mtp"].loaded / "actor", tmp_path / "back")
    assert_same_tensors(tmp_path / "back", mla_cases["mtp"].hf)


def _edited(src: Path, dst: Path, tensors=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if tensors:
        sd = tensors(load_file(src / "model.safetensors"))
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    return dst


def test_mtp_layers_that_megatron_cannot_hold_are_refused(mla_cases, tmp_path) -> None:
    hf = mla_cases["mtp"].hf

    def head_differs(sd):
        return {**sd, H + "shared_head.head.weight": sd[H + "shared_head.head.weight"] + 1}

    def without(name: str):
        return lambda sd: {k: v for k, v in sd.items() if k != H + name}

    cases = {"head": (dict(tensors=head_differs), "shared_head.head.weight differs from lm_head.weight"),
             "hnorm": (dict(tensors=without("hnorm.weight")), r"not in the HF folder: model\.layers\.3\.hnorm\.weight"),
             "copy": (dict(tensors=without("embed_tokens.weight")), "embed_tokens.weight is missing from MTP layer 3"),
             "count": (dict(config={"num_nextn_predict_layers": 0}), "have no deepseek_v3 mapping")}
    for name, (edit, message) in cases.items():
        folder = _edited(hf, tmp_path / name, **edit)
        with pytest.raises(MappingError, match=message) as e:
            to_megatron(folder, Output(tmp_path / f"out_{name}"), MegatronOptions(), log=lambda _: None)
        assert not (tmp_path / f"out_{name}").exists()
        if name == "count":
            assert "num_nextn_predict_layers" in e.value.hint


def test_a_folder_without_its_mtp_layer_converts_without_the_block(mla_cases, tmp_path) -> None:
    """What save_pretrained writes: config.json still says num_nextn_predict_layers=1, but no layer L is stored."""
    folder = _edited(mla_cases["mtp"].hf, tmp_path / "hf",
                     tensors=lambda sd: {k: v for k, v in sd.items() if not k.startswith(H)})
    assert json.loads((folder / "config.json").read_text())["num_nextn_predict_layers"] == 1
    r = to_megatron(folder, Output(tmp_path / "out"), MegatronOptions(test=True), log=lambda _: None)
    assert r.megatron.mtp_num_layers == 0 and not any(k.startswith("mtp.") for k in stored(tmp_path / "out"))
