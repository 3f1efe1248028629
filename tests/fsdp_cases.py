"""The FSDP checkpoint matrix the tests merge: every layout verl writes, made by real torch FSDP on CPU."""

from __future__ import annotations

from pathlib import Path

from hubexport.examples import FsdpCase, make_checkpoints

CASES = {c.name: c for c in [
    # world size 1: an unwrapped model saves plain tensors (verl issue #903)
    FsdpCase("qwen2_plain_w1", fsdp=0, world_size=1),
    FsdpCase("llama_legacy_w1", family="llama", fsdp=0, world_size=1, legacy=True, tied=True),
    # world size 2
    FsdpCase("qwen2_fsdp2_w2_dim1", vocab_size=127),  # odd vocab: embeddings sharded on dim 1
    FsdpCase("llama_fsdp1_w2_tied_bf16", family="llama", fsdp=1, tied=True, dtype="bfloat16"),
    FsdpCase("qwen3_fsdp2_w2_tied", family="qwen3", tied=True),
    FsdpCase("qwen3moe_fsdp2_w2", family="qwen3_moe"),
    FsdpCase("qwen2_critic_fsdp2_w2", critic=True),
    FsdpCase("dsv3_fsdp2_w2", family="deepseek_v3"),  # MLA + an unsharded buffer on every rank
    FsdpCase("qwen2_legacy_fsdp1_w2", fsdp=1, legacy=True),
    # world size 3: uneven shards, last rank smaller
    FsdpCase("qwen2_fsdp2_w3", world_size=3, vocab_size=128),
    FsdpCase("llama_fsdp1_w3_bf16", family="llama", fsdp=1, world_size=3, dtype="bfloat16"),
    # world size 4: flat and HSDP 2x2
    FsdpCase("qwen2_fsdp2_w4", world_size=4),
    FsdpCase("qwen2_hsdp_fsdp2_w4", world_size=4, hsdp=True),
    FsdpCase("llama_hsdp_fsdp1_w4_tied", family="llama", fsdp=1, world_size=4, hsdp=True, tied=True),
    FsdpCase("qwen3moe_fsdp1_w4_bf16", family="qwen3_moe", fsdp=1, world_size=4, dtype="bfloat16"),
]}


def build_all(root: Path) -> Path:
    make_checkpoints(list(CASES.values()), root)
    return root


def actor_dir(root: Path, name: str) -> Path:
    return root / name / "global_step_1" / "actor"
