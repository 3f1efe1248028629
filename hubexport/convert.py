"""Orchestration: detect → source → mapping → plan → writer. Rank-aware: under torchrun every rank writes its own
files and rank 0 writes the index, config and tokenizer after a barrier."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    sha256: str


@dataclass
class MergeResult:
    target_dir: Path
    source_format: str  # "fsdp" | "megatron" | "hf"
    source_version: str  # e.g. "fsdp2", "legacy", "v1", "v2"
    parallel: dict[str, int]  # {"world_size": 4} or {"tp": 2, "pp": 2, "ep": 1}
    architecture: str  # e.g. "Qwen2ForCausalLM"
    dtype: str  # dominant dtype of the written weights, e.g. "bfloat16"
    num_parameters: int
    tied_embeddings: bool
    value_model: bool
    global_step: int | None
    files: list[WrittenFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
