"""DeepSpeed ZeRO 1/2/3 checkpoints as the transformers Trainer and OpenRLHF leave them, made by real DeepSpeed
(CPU accelerator, gloo, 2 processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubexport.examples import FsdpCase
from hubexport.examples_deepspeed import DeepSpeedCase, make_deepspeed_checkpoints

CASES = {c.name: c for c in [
    # ZeRO-1 bf16 under the Trainer (bf16_zero_pp_rank_* files, model.safetensors beside them); one frozen norm
    # that only the module copy holds (ZeRO-1 records no frozen params)
    DeepSpeedCase("trainer_zero1_qwen2_bf16", 1, "trainer", FsdpCase("m", hidden_size=64, dtype="bfloat16"),
                  frozen=("model.layers.0.input_layernorm.weight",)),
    # ZeRO-2 fp32 under OpenRLHF, tied (shared_params), odd-numel MLP biases with per-parameter alignment padding,
    # a frozen final norm (frozen_param_fragments)
    DeepSpeedCase("openrlhf_zero2_llama_tied", 2, "openrlhf",
                  FsdpCase("m", family="llama", hidden_size=64, intermediate_size=75, tied=True),
                  frozen=("model.norm.weight",), mlp_bias=True, parameter_alignment=True),
    # ZeRO-2: DeepSeek-V3 (transformers 5's fused experts, converted to per-expert keys; a persistent fp32 buffer)
    DeepSpeedCase("trainer_zero2_deepseek_v3", 2, "trainer", FsdpCase("m", family="deepseek_v3", hidden_size=64)),
    # ZeRO-3 bf16, odd numels (partition padding), a frozen odd-numel bias (per-rank padded fragments)
    DeepSpeedCase("trainer_zero3_llama_bf16", 3, "trainer",
                  FsdpCase("m", family="llama", hidden_size=64, intermediate_size=75, dtype="bfloat16"),
                  frozen=("model.layers.1.mlp.up_proj.bias",), mlp_bias=True),
    # ZeRO-3 tied (shared by ds_id)
    DeepSpeedCase("trainer_zero3_qwen2_tied", 3, "trainer", FsdpCase("m", hidden_size=64, tied=True)),
]}


def local_dir(root: Path, name: str) -> Path:
    """What a user passes as --local-dir: the folder engine.save_checkpoint was given."""
    return root / name / CASES[name].save_dir


@pytest.fixture(scope="session")
def deepspeed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    make_deepspeed_checkpoints(list(CASES.values()), root)
    return root
