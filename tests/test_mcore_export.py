"""Real megatron-core checkpoints (made by megatron-core on CPU at test time) exported to HF and compared with the
HF model they were initialised from: bit-exact tensors, logits from transformers, and megatron's own forward."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_mcore import McoreCase
from tests.mcore_check import assert_same_tensors, export_megatron, load_logits

pytestmark = pytest.mark.slow


def _check(case: McoreCase, tmp_path, **flags) -> dict:
    info, _ = export_megatron(case.actor, tmp_path / "out", **flags)
    assert_same_tensors(tmp_path / "out", case.hf_ref)
    got, ref = load_logits(tmp_path / "out"), load_logits(case.hf_ref)
    assert torch.equal(got, ref)  # same weights, same transformers code
    if case.mcore_logits is not None:  # megatron's own forward (TP ranks over gloo) agrees to fp32 rounding
        torch.testing.assert_close(torch.load(case.mcore_logits), ref, atol=2e-4, rtol=1e-4)
    return info


def test_tp1_untied_qwen3(mcore_tp1, tmp_path) -> None:
    info = _check(mcore_tp1["untied"], tmp_path)
    assert info["layout"].version == "v1" and info["updates"]["tie_word_embeddings"] is False
    assert "lm_head.weight" in info["tensors"]


def test_tp1_tied_qwen2(mcore_tp1, tmp_path) -> None:
    info = _check(mcore_tp1["tied"], tmp_path, tie_word_embedding=True)
    assert info["updates"]["tie_word_embeddings"] is True and "lm_head.weight" not in info["tensors"]


def test_tp1_critic_exports_token_classification(mcore_tp1, tmp_path) -> None:
    info = _check(mcore_tp1["critic"], tmp_path, value_model=True)
    assert info["updates"]["architectures"] == ["Qwen2ForTokenClassification"] and info["updates"]["num_labels"] == 1
    assert "score.weight" in info["tensors"]


def test_critic_detected_without_flag(mcore_tp1, tmp_path) -> None:
    info, _ = export_megatron(mcore_tp1["critic"].actor, tmp_path / "out")
    assert info["updates"]["architectures"] == ["Qwen2ForTokenClassification"]


def test_tp2_untied_qwen2(mcore_tp2, tmp_path) -> None:
    _check(mcore_tp2["untied"], tmp_path)


def test_tp2_tied_qwen2(mcore_tp2, tmp_path) -> None:
    _check(mcore_tp2["tied"], tmp_path)


def test_pp2_tied_v2_layout(mcore_pp2, tmp_path) -> None:
    info = _check(mcore_pp2["tied_v2"], tmp_path)
    assert info["layout"].version == "v2" and info["layout"].parallel["pp"] == 2


def test_tp2_pp2_qwen3(mcore_tp2pp2, tmp_path) -> None:
    info = _check(mcore_tp2pp2["v1"], tmp_path)
    assert info["layout"].parallel["tp"] == 2 and info["layout"].parallel["pp"] == 2


def test_tp2_pp2_legacy_v0_mp_rank_files(mcore_tp2pp2, tmp_path) -> None:
    info = _check(mcore_tp2pp2["v0"], tmp_path)
    assert info["layout"].version == "v0" and len(info["layout"].files) == 4


def test_moe_ep2_qwen2_moe(mcore_moe_ep2, tmp_path) -> None:
    info = _check(mcore_moe_ep2["ep2"], tmp_path)
    assert "model.layers.3.mlp.experts.3.down_proj.weight" in info["tensors"]
    assert "model.layers.0.mlp.shared_expert_gate.weight" in info["tensors"]
