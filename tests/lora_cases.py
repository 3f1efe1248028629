"""LoRA checkpoints as verl writes them: real PEFT models on tiny random HF models, one step under torch FSDP on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubexport.examples import FsdpCase, LoraSpec, make_checkpoints

CASES = {c.name: c for c in [
    # verl's LoRA: every linear of the decoder, lora_train_meta.json (>= 2026-05)
    FsdpCase("qwen2_lora_fsdp2_w2", lora=LoraSpec()),
    # checkpoint.save_lora_only: no base weight in the rank files
    FsdpCase("qwen2_lora_only_fsdp2_w2", lora=LoraSpec(only=True)),
    # PEFT beyond verl's defaults, settings from the legacy workers' lora_adapter/adapter_config.json
    FsdpCase("qwen2_lora_patterns_fsdp2_w2", lora=LoraSpec(
        targets=("q_proj", "v_proj", "down_proj", "embed_tokens"), rank_pattern=(("layers.1.self_attn.q_proj", 2),),
        alpha_pattern=(("v_proj", 3),), modules_to_save=("lm_head",), bias="lora_only", meta="adapter_config")),
    # FSDP1, bf16, LoRA with a bias on lora_B
    FsdpCase("qwen2_lora_bias_fsdp1_w2_bf16", fsdp=1, dtype="bfloat16",
             lora=LoraSpec(targets=("q_proj", "k_proj", "v_proj"), lora_bias=True)),
    # world size 1 (plain tensors), tied embeddings with LoRA on them, no record of alpha at all
    FsdpCase("qwen3_lora_tied_w1", family="qwen3", fsdp=0, world_size=1, tied=True,
             lora=LoraSpec(targets=("q_proj", "embed_tokens"), meta="none")),
    # not LoRA: the LoRA options must refuse it
    FsdpCase("qwen2_full_w1", fsdp=0, world_size=1),
]}


def build_all(root: Path) -> Path:
    make_checkpoints(list(CASES.values()), root)
    return root


def actor_dir(root: Path, name: str) -> Path:
    return root / name / "global_step_1" / "actor"


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory) -> Path:
    """Every LoRA case, made once per session with real PEFT + torch FSDP (gloo, 2 processes)."""
    return build_all(tmp_path_factory.mktemp("lora"))
