"""torch DCP checkpoints as their producers write them, made by real FSDP2 (gloo, 2 processes) on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubexport.examples import FsdpCase
from hubexport.examples_dcp import DcpCase, make_dcp_checkpoints

CASES = {c.name: c for c in [
    # dcp.save(get_model_state_dict(model)) into a verl-style actor dir; odd vocab: embeddings sharded on dim 1
    DcpCase("plain_qwen2_dim1", "plain", FsdpCase("m", vocab_size=127)),
    # accelerate's save_fsdp_model (TRL / axolotl): checkpoint-N/pytorch_model_fsdp_0/, {"model": ...}, tied
    DcpCase("accelerate_llama_tied", "accelerate", FsdpCase("m", family="llama", tied=True)),
    # NeMo RL: step_N/policy/weights/, {"model": ...}; transformers 5's fused experts in the state dict
    DcpCase("nemo_rl_qwen3moe", "nemo_rl", FsdpCase("m", family="qwen3_moe")),
    # a bf16 critic (value head) saved bare
    DcpCase("plain_qwen2_critic_bf16", "plain", FsdpCase("m", critic=True, dtype="bfloat16")),
    # safetensors DCP, NeMo Automodel's layout: model/shard-R-model-X-of-2 (+ consolidated/), tied head left out
    DcpCase("automodel_qwen3_tied", "automodel", FsdpCase("m", family="qwen3", tied=True, vocab_size=127)),
    # safetensors DCP through torch's own consolidating writer: sharded/ beside the full files, bf16
    DcpCase("torch_hf_llama_bf16", "torch_hf", FsdpCase("m", family="llama", dtype="bfloat16")),
]}


def local_dir(root: Path, name: str) -> Path:
    return root / name / CASES[name].local_dir


@pytest.fixture(scope="session")
def dcp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    make_dcp_checkpoints(list(CASES.values()), root)
    return root
