"""What the user asked for, one frozen object per command family: the CLI builds them, the executor reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hubexport.errors import ConfigError

if TYPE_CHECKING:
    import torch

# --dtype spellings → torch's dtype names (torch is imported only where a cast happens: the CLI starts without it)
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}


def torch_dtype(name: str) -> torch.dtype:
    """A --dtype spelling as the torch dtype."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


LORA_MODES = ("adapter", "fuse", "both")


@dataclass(frozen=True)
class Output:
    """Where a command writes, and how."""

    target: Path
    overwrite: bool = False
    dry_run: bool = False
    option: str = "--target-dir"  # the flag that named the target, for messages


@dataclass(frozen=True)
class MergeOptions:
    """Training checkpoint → Hugging Face folder (`merge`, and `push`/`verify`/`inspect` of a checkpoint)."""

    backend: str = "auto"
    dtype: str | None = None
    max_shard_size: int | str = "5GB"
    tie_word_embedding: bool = False
    is_value_model: bool = False
    trust_remote_code: bool = False
    lora_mode: str | None = None
    lora_alpha: float | None = None
    lora_rank: int | None = None
    lora_base_model: Path | None = None  # the base weights of a LoRA-only checkpoint

    @property
    def cast(self) -> torch.dtype | None:
        return torch_dtype(self.dtype) if self.dtype else None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {self.dtype!r} is not a dtype", hint=f"use one of {', '.join(DTYPE_NAMES)}")
        if self.lora_mode is not None and self.lora_mode not in LORA_MODES:
            raise ConfigError(f"--lora {self.lora_mode!r} is not a LoRA export mode", hint="use adapter, fuse or both")


@dataclass(frozen=True)
class MegatronOptions:
    """Hugging Face folder → megatron-core torch_dist (`to-megatron`)."""

    spec: str = "te"
    test: bool = False
    trust_remote_code: bool = False
    dtype: str | None = None  # what FP8 block-quantized weights are dequantized into (default bf16)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype {self.dtype!r} is not a dtype", hint=f"use one of {', '.join(DTYPE_NAMES)}")


@dataclass(frozen=True)
class CardOptions:
    """What the user can say about the card (the `card`/`push` options), minus the model folder itself."""

    base_model: str | None = None
    license: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    card_data: Path | None = None
    template: str | Path = "default"
    training_config: Path | None = None


@dataclass(frozen=True)
class GateOptions:
    """The publish gate: what the candidate is compared with, and what it may be despite that."""

    diff_base: str | None = None  # a folder or a Hub id (downloaded: the user asked for it)
    allow_unchanged: bool = False
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class PushOptions:
    """Where and how to publish (`push`, `merge --hf-upload-path`)."""

    repo_id: str
    private: bool | None = None  # None: the Hub's default for a new repo (public); an existing repo keeps its own
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    dry_run: bool = False
    endpoint: str | None = None  # default HF_ENDPOINT, else huggingface.co
    token: str | None = field(default=None, repr=False)  # default HF_TOKEN or the saved login; never printed
    card: CardOptions = field(default_factory=CardOptions)
    offline: bool = False  # with dry_run: no request at all (no preflight), list every file that would be sent
    gate: GateOptions = field(default_factory=GateOptions)
    metrics: Path | None = None  # verl's file-logger JSONL (default: found next to the run)
    select: str = "latest"  # which step of a run root: latest | best:<metric>

    def __post_init__(self) -> None:
        if self.offline and not self.dry_run:
            raise ConfigError("--offline only applies to --dry-run", hint="add --dry-run, or drop --offline to push")

