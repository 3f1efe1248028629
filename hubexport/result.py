"""What a command did, as one type for every command (printed by --json): the facts both directions share, plus the
direction's own (LoRA export, Megatron layout) and the push, when there was one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hubexport.hub import PushResult


@dataclass(frozen=True)
class WrittenFile:
    name: str  # relative to the output folder, posix
    size: int
    sha256: str | None  # None in a dry run, and for files hubexport does not hash (torch_dist)


OnFile = Callable[[WrittenFile, Path], None]  # told of each output file once it is complete


@dataclass(frozen=True)
class Throughput:
    """How fast the bytes moved: from the first write to the swap into place (fsync included; start-up, planning and
    the Hub excluded). `benchmarks/run.py` compares it with the disk floor of the same machine."""

    bytes: int  # what every rank wrote
    seconds: float
    bytes_per_s: float

    @classmethod
    def of(cls, nbytes: int, seconds: float) -> Throughput:
        return cls(nbytes, round(seconds, 3), round(nbytes / seconds) if seconds > 0 else 0)

    def __str__(self) -> str:
        return f"{self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s, {self.bytes_per_s / 1e9:.2f} GB/s"


@dataclass
class MegatronFacts:
    spec: str  # "te" | "local"
    layer_keys: str  # "stacked" | "per-layer"
    num_tensors: int  # logical megatron tensors (one layer, one expert) written
    num_keys: int  # stored tensor keys
    padded_vocab: int
    world_size: int  # writer processes
    tested: bool  # --test read everything back bit-exact before publishing
    mtp_num_layers: int = 0  # MTP blocks written (DeepSeek-V3's num_nextn_predict_layers): the model's mtp_num_layers


@dataclass
class Result:
    command: str  # "merge" | "to-megatron" | "push"
    target_dir: Path | None  # None after a push from a temporary merge (removed)
    source_format: str  # "fsdp" | "megatron" | "hf"
    source_version: str  # e.g. "fsdp2", "v2", "mbridge", "safetensors"
    parallel: dict[str, int]  # {"world_size": 4} or {"tp": 2, "pp": 2, "ep": 1}; {} for an HF folder
    architecture: str
    dtype: str  # dominant dtype of the written weights, e.g. "bfloat16"
    num_parameters: int
    tied_embeddings: bool
    value_model: bool
    global_step: int | None
    peak_tensor_bytes: int = 0  # planned upper bound of tensor bytes one process holds at once
    files: list[WrittenFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False
    lora: dict | None = None  # {"mode", "r", "lora_alpha", "modules", "adapter_dir", ...} for PEFT checkpoints
    megatron: MegatronFacts | None = None  # to-megatron only
    resolved: dict | None = None  # an input given as a Hub id: {"repo_id", "revision", "sha", "path"}
    push: PushResult | None = None  # push and merge --hf-upload-path
    throughput: Throughput | None = None  # None in a dry run
