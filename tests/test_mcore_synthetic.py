"""ShardedTensor checkpoints the CPU model cannot write (made with dist_checkpointing.save from the formats doc's
formulas): DeepSeek-V3 MLA with TE names, per-layer keys and an MTP block; Mixtral with stacked keys and local-spec
norm names. Expected values are the HF model's own tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.mcore_check import export_megatron, load_logits

pytestmark = pytest.mark.slow


def test_deepseek_v3_mla_moe_and_mtp(mcore_synthetic, tmp_path) -> None:
    case = mcore_synthetic["deepseek_v3"]
    export_megatron(case.actor, tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    ref = load_file(case.hf_ref / "model.safetensors")
    mtp = load_file(case.actor / "expected_mtp.safetensors")
    assert sorted(got) == sorted([*ref, *mtp])
    for name, want in [*ref.items(), *mtp.items()]:
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in got  # from router.expert_bias
    assert torch.equal(load_logits(tmp_path / "out"), load_logits(case.hf_ref))  # MTP layer is ignored by HF


def test_mixtral_names_and_logits(mcore_synthetic, tmp_path) -> None:
    case = mcore_synthetic["mixtral"]
    export_megatron(case.actor, tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")
    ref = load_file(case.hf_ref / "model.safetensors")
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in got
    assert torch.equal(load_logits(tmp_path / "out"), load_logits(case.hf_ref))
