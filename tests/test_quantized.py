"""FP8 block-quantized sources: the test quantizes weights the way DeepSeek-V3 is published (one float32 scale per
128x128 block, amax / 448, ragged edge blocks), and checks the dequantization bit-exactly against the reference
formula, against transformers' own function, and through a tiny DeepSeek-V3-shaped safetensors folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hubexport.errors import CheckpointError, ConfigError
from hubexport.sources.hf import SafetensorsSource
from hubexport.sources.quantized import (
    DequantizedSource,
    dequantize_fp8,
    dequantized,
    fp8_block_size,
    without_quantization,
)

BLOCK = (128, 128)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def quantize(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """As the published checkpoint: per block, scale = amax / 448 (float32) and weight = fp8(w / scale)."""
    rows, cols = w.shape
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            s[i, j] = tile.abs().max().clamp(min=1e-12) / E4M3_MAX
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (tile / s[i, j]).to(q.dtype)
    return q, s


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.view({2: torch.int16, 4: torch.int32}[t.dtype.itemsize])


def reference(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """DeepSeek's weight_dequant kernel, one program per block: y = fp32(x) * s[pid_m, pid_n], stored as `dtype`."""
    y = torch.empty(q.shape, dtype=dtype)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            y[rs, cs] = (q[rs, cs].to(torch.float32) * s[i, j]).to(dtype)
    return y


@pytest.mark.parametrize("shape", [(300, 200), (256, 384), (7, 130), (129, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_is_bit_exact_to_the_block_formula(shape: tuple[int, int], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # blocks of very different magnitudes
    q, s = quantize(w)
    got = dequantize_fp8(q, s, BLOCK, dtype)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(bits(got), bits(reference(q, s, dtype)))
    if dtype == torch.float32:  # and the quantization itself is right: e4m3 keeps 3 mantissa bits
        s_full = s.repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]
        assert ((got - w).abs() <= w.abs() * 2**-4 + s_full * 2**-10).all()


def test_dequantize_equals_transformers_fp8_dequantize() -> None:
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    torch.manual_seed(1)
    w = torch.randn(384, 256)
    q, s = quantize(w)
    theirs = finegrained.Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    assert torch.equal(bits(dequantize_fp8(q, s, BLOCK, torch.bfloat16)), bits(theirs))


def _tiny_deepseek(folder: Path) -> dict[str, torch.Tensor]:
    """A DeepSeek-V3-shaped model (MLA, a dense layer, routed + shared experts) whose dims are not multiples of 128,
    saved the way the Hub publishes it: the decoder's linear weights FP8 with block scales, the rest as is."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=300, hidden_size=192, intermediate_size=320, moe_intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=136, kv_lora_rank=72, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, quantization_config=FP8_CONFIG)
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in saved.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight") and t.dim() == 2:
            out[name], out[name + "_scale_inv"] = quantize(t)
        else:
            out[name] = t
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    return out


def test_deepseek_v3_fp8_folder_reads_dequantized(tmp_path: Path) -> None:
    from transformers import AutoConfig

    stored = _tiny_deepseek(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    raw = SafetensorsSource(tmp_path)
    src = dequantized(raw, config, dtype=torch.bfloat16, where=str(tmp_path / "config.json"))
    assert isinstance(src, DequantizedSource)
    specs = src.metas()
    quantized = [n for n, t in stored.items() if t.dtype == torch.float8_e4m3fn]
    assert len(quantized) >= 20 and any(stored[n].shape[0] % 128 and stored[n].shape[1] % 128 for n in quantized)
    assert set(specs) == {n for n in stored if not n.endswith("_scale_inv")}
    for name, spec in specs.items():
        t = src.read(name)
        assert (spec.shape, spec.dtype) == (tuple(t.shape), t.dtype)
        if name in quantized:
            assert spec.dtype == torch.bfloat16
            assert torch.equal(bits(t), bits(reference(stored[name], stored[name + "_scale_inv"], torch.bfloat16)))
        else:
            assert torch.equal(t, stored[name]), name
    plain = without_quantization(config)
    assert "quantization_config" not in plain.to_dict() and "quantization_config" in config.to_dict()
    assert dequantized(raw, plain, where="x") is raw


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors", "mxfp4", None])
def test_other_quantizations_are_refused_by_name(method: str | None) -> None:
    with pytest.raises(ConfigError, match=f"quant_method {method!r} is not supported"):
        fp8_block_size({"quantization_config": {"quant_method": method, "bits": 4}}, "cfg.json")


def test_fp8_variants_and_inconsistent_checkpoints_are_refused(tmp_path: Path) -> None:
    for bad in ({"weight_block_size": None}, {"fmt": "e5m2"}, {"activation_scheme": "static"}):
        with pytest.raises(ConfigError, match=r"cfg\.json: FP8"):
            fp8_block_size({"quantization_config": FP8_CONFIG | bad}, "cfg.json")
    assert fp8_block_size({"quantization_config": FP8_CONFIG}, "cfg.json") == (128, 128)
    assert without_quantization({"quantization_config": FP8_CONFIG, "a": 1}) == {"a": 1}
    q, s = quantize(torch.randn(200, 130))
    cases = {
        "no scale": ({"w.weight": q}, "has no w.weight_scale_inv"),
        "wrong grid": ({"w.weight": q, "w.weight_scale_inv": s[:1]}, r"not float32 \[2, 2\]"),
        "orphan scale": ({"w.weight_scale_inv": s}, "no such tensor"),
    }
    for case, (tensors, message) in cases.items():
        folder = tmp_path / case.replace(" ", "-")
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            dequantized(SafetensorsSource(folder), {"quantization_config": FP8_CONFIG}, where="cfg.json")
