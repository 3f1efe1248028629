"""PEFT LoRA in training checkpoints: split the keys of a PEFT-wrapped model into base weights and LoRA tensors, find
the run's r and alpha (per module, as PEFT resolves rank_pattern/alpha_pattern), and the maths of fusing
`W + (alpha/r)·B·A`. Pure: names, shapes and tensors in, numbers and tensors out; lora_views.py builds the exported
tensors from them, lora_export.py plans the export."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError, ConfigError, MappingError
from hubexport.jsonfile import read_json_object

if TYPE_CHECKING:
    from hubexport.detect import Layout

PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "lora_adapter"
ADAPTER = "default"  # verl trains one adapter, PEFT's default name
MODES = ("adapter", "fuse", "both")
MCORE_ADAPTER_CONFIG = "model/huggingface/adapter/adapter_config.json"  # verl >= 0.9 Megatron LoRA (Megatron-Bridge)

# <module>.<part>.<adapter>[.weight|.bias]: lora_A/B are Linear submodules, lora_embedding_A/B bare Parameters,
# lora_magnitude_vector (DoRA) a module holding `.weight`.
LORA_RE = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"\.(?P<adapter>[^.]+)(?:\.(?P<param>weight|bias))?$"
)
SAVED_RE = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>.+)$")


# ---------------------------------------------------------------------------------------------------------------- maths
def scaling(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """PEFT's `LoraLayer.scaling`: alpha/r, or alpha/√r with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def fuse_linear(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """nn.Linear: W [out, in] + scale·B [out, r]·A [r, in], computed in fp32, returned in W's dtype."""
    return (w.float() + scale * (b.float() @ a.float())).to(w.dtype)


def fuse_embedding(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """nn.Embedding: W [vocab, dim] + scale·(B [dim, r]·A [r, vocab])ᵀ (PEFT keeps A over the vocabulary)."""
    return (w.float() + scale * (b.float() @ a.float()).T).to(w.dtype)


def fuse_bias(bias: torch.Tensor, b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """lora_bias=True: lora_B has a bias, folded into the base bias with the same scale."""
    return (bias.float() + scale * b_bias.float()).to(bias.dtype)


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The rank_pattern/alpha_pattern key PEFT applies to `module` (first regex matching a dotted suffix), if any."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


# --------------------------------------------------------------------------------------------------------------- keys
@dataclass
class LoraModule:
    """One LoRA-adapted module, by its path in the base model (e.g. `model.layers.0.self_attn.q_proj`)."""

    name: str
    embedding: bool = False
    a: str | None = None  # source keys
    b: str | None = None
    b_bias: str | None = None
    magnitude: str | None = None  # DoRA


@dataclass
class LoraKeys:
    """A PEFT-wrapped checkpoint's keys, sorted into what the base model is and what training added."""

    base: dict[str, str] = field(default_factory=dict)  # base model name → source key (frozen/original weights)
    trained: dict[str, str] = field(default_factory=dict)  # modules_to_save: base name → source key of the trained copy
    trained_modules: set[str] = field(default_factory=set)
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def lora_only(self) -> bool:
        """verl's `save_lora_only`: no base weight at all in the checkpoint."""
        return not self.base


def is_peft_checkpoint(names: Iterable[str]) -> bool:
    return any(LORA_RE.match(n) for n in names)


def _strip(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def split_keys(names: Iterable[str]) -> LoraKeys:
    """Sort source keys: LoRA tensors per module; modules_to_save copies; base weights under their transformers name
    (`base_model.model.` dropped, `.base_layer.`/`.original_module.` removed)."""
    out = LoraKeys()
    for key in names:
        name = _strip(key)
        m = LORA_RE.match(name)
        if m:
            _check_adapter(key, m.group("adapter"))
            _add_lora(out.modules.setdefault(m.group("module"), LoraModule(m.group("module"))), m, key)
            continue
        m = SAVED_RE.match(name)
        if m:
            _check_adapter(key, m.group("adapter"))
            out.trained[f"{m.group('module')}.{m.group('param')}"] = key
            out.trained_modules.add(m.group("module"))
            continue
        if any(part.startswith("lora_") for part in name.split(".")):
            raise MappingError(f"{key} is a PEFT tensor hubexport does not know",
                               hint="only LoRA (lora_A/B, lora_embedding_A/B, DoRA magnitudes) can be exported")
        out.base[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = key
    for mod in out.modules.values():
        if mod.a is None or mod.b is None:
            raise MappingError(f"LoRA module {mod.name} has only one of its A/B matrices in the checkpoint",
                               hint="the checkpoint is incomplete; re-copy all rank files")
    return out


def _check_adapter(key: str, adapter: str) -> None:
    if adapter != ADAPTER:
        raise MappingError(f"{key} belongs to adapter {adapter!r}; hubexport exports PEFT's single 'default' adapter",
                           hint="verl trains one adapter named 'default'; export other adapters with PEFT itself")


def _add_lora(mod: LoraModule, m: re.Match[str], key: str) -> None:
    part, param = m.group("part"), m.group("param")
    if part == "lora_magnitude_vector":
        mod.magnitude = key
    elif part.startswith("lora_embedding_"):
        mod.embedding = True
        setattr(mod, part[-1].lower(), key)
    elif param == "bias":
        mod.b_bias = key
    else:
        setattr(mod, part[-1].lower(), key)


# ------------------------------------------------------------------------------------------------------ hyperparameters
@dataclass
class LoraSettings:
    """What the run trained with: default r/alpha plus per-module patterns and switches, and where they came from."""

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    task_type: str | None = None
    bias: str = "none"
    training_config: dict[str, Any] = field(default_factory=dict)  # a training adapter_config.json, verbatim
    origin: str = ""


def find_settings(root: Path, *, alpha: float | None, rank: int | None) -> LoraSettings:
    """r/alpha from the flags, else verl's `lora_train_meta.json` (actor dir; the SFT trainer writes it one level up),
    else a training `adapter_config.json` (legacy verl's `lora_adapter/`, or the one Megatron-Bridge exports for
    verl's Megatron LoRA), which also carries the patterns."""
    s = LoraSettings()
    origins = []
    for path in (root / ADAPTER_DIR / "adapter_config.json", root / "adapter_config.json", root / MCORE_ADAPTER_CONFIG):
        if path.is_file():
            cfg = read_json_object(path)
            s.training_config = cfg
            s.r, s.lora_alpha = cfg.get("r"), cfg.get("lora_alpha")
            s.rank_pattern = dict(cfg.get("rank_pattern") or {})
            s.alpha_pattern = dict(cfg.get("alpha_pattern") or {})
            s.use_rslora = bool(cfg.get("use_rslora", False))
            s.task_type = cfg.get("task_type")
            s.bias = cfg.get("bias") or "none"
            origins.append(str(path))
            break
    for path in (root / "lora_train_meta.json", root.parent / "lora_train_meta.json"):
        if path.is_file():
            meta = read_json_object(path)
            s.r = meta.get("r", s.r)
            s.lora_alpha = meta.get("lora_alpha", s.lora_alpha)
            s.task_type = meta.get("task_type") or s.task_type
            origins.append(str(path))
            break
    if alpha is not None:
        s.lora_alpha = alpha
        origins.append("--lora-alpha")
    if rank is not None:
        s.r = rank
        origins.append("--lora-rank")
    s.origin = " + ".join(origins)
    return s


def check_settings(s: LoraSettings, root: Path) -> None:
    """Refuse to write an adapter whose alpha is unknown or zero (verl's merger wrote lora_alpha 0 for a year)."""
    if s.lora_alpha is None:
        raise ConfigError(
            f"{root} holds LoRA tensors but neither lora_train_meta.json nor an adapter_config.json says their "
            "lora_alpha",
            hint="pass --lora-alpha and --lora-rank with the values the run trained with "
                 "(verl: actor_rollout_ref.model.lora_alpha and lora_rank; Megatron: model.lora.alpha and rank)",
        )
    if not isinstance(s.lora_alpha, (int, float)) or s.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha {s.lora_alpha!r} (from {s.origin}) would make an adapter with no effect",
                          hint="pass --lora-alpha with the value the run trained with")
    if s.r is not None and (not isinstance(s.r, int) or s.r <= 0):
        raise ConfigError(f"LoRA rank {s.r!r} (from {s.origin}) is not a positive integer",
                          hint="pass --lora-rank with the value the run trained with")


def module_rank(mod: LoraModule, specs: dict[str, TensorSpec]) -> int:
    assert mod.a is not None  # split_keys guarantees both matrices
    return specs[mod.a].shape[0]


def resolve_ranks(keys: LoraKeys, specs: dict[str, TensorSpec], s: LoraSettings) -> list[str]:
    """Make r and rank_pattern agree with the tensors (their shapes are the truth); returns notes for the user."""
    ranks = {name: module_rank(mod, specs) for name, mod in keys.modules.items()}
    notes: list[str] = []
    if s.r is None:
        s.r = Counter(ranks.values()).most_common(1)[0][0]
        notes.append(f"LoRA rank {s.r} read from the tensor shapes")

    def expected(name: str) -> int:
        key = pattern_key(s.rank_pattern, name)
        return s.rank_pattern[key] if key is not None else s.r

    wrong = sorted(n for n, r in ranks.items() if r != expected(n))
    if not wrong:
        return notes
    if len(wrong) == len(ranks) or s.rank_pattern:
        name = wrong[0]
        raise ConfigError(
            f"{s.origin or 'the LoRA settings'} give rank {expected(name)} for {name}, but its lora_A has "
            f"{ranks[name]} rows",
            hint="pass --lora-rank with the rank the run trained with (and check --lora-alpha)",
        )
    # rank_pattern is not recorded in lora_train_meta.json: rebuild it, exact module names, from the shapes.
    s.rank_pattern = {re.escape(n): ranks[n] for n in wrong}
    notes.append(f"{len(wrong)} LoRA module(s) have a rank other than r={s.r}: rank_pattern rebuilt from the shapes; "
                 "their lora_alpha is taken as the default (lora_train_meta.json does not record alpha_pattern)")
    return notes


def module_scale(name: str, r: int, s: LoraSettings) -> float:
    key = pattern_key(s.alpha_pattern, name)
    alpha = s.alpha_pattern[key] if key is not None else s.lora_alpha
    assert alpha is not None
    return scaling(alpha, r, use_rslora=s.use_rslora)


def check_megatron_adapter(layout: Layout, *, has_lora: bool) -> None:
    """Refuse a Megatron PEFT checkpoint (detect reports it in `layout.adapter`) whose weights hubexport reads hold no
    LoRA tensor: its base weights alone would drop the training."""
    if layout.adapter is not None and not has_lora:
        raise CheckpointError(
            f"{layout.root} is a Megatron LoRA checkpoint ({layout.adapter.name}) but {layout.files[0]} holds no "
            "adapter tensors",
            hint="exporting only its base weights would drop the training; point --local-dir at a checkpoint whose "
                 "dist_ckpt holds the adapters (verl >= 0.9 saves them in model/dist_ckpt/)",
        )
