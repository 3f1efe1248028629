"""PEFT LoRA in training checkpoints: split the keys of a PEFT-wrapped model into base weights and LoRA tensors, fuse
`W + (alpha/r)·B·A` (per-module r and alpha, as PEFT resolves rank_pattern/alpha_pattern), and build the adapter folder
(`adapter_config.json` + `adapter_model.safetensors` with PEFT's saved key names). Pure: names, shapes and tensors in,
names, specs and tensors out; convert.py does the I/O."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hubexport.core import Group, Tensors, TensorSpec
from hubexport.errors import CheckpointError, ConfigError, MappingError
from hubexport.jsonfile import read_json_object

if TYPE_CHECKING:
    from hubexport.detect import Layout

PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "lora_adapter"
ADAPTER = "default"  # verl trains one adapter, PEFT's default name
MODES = ("adapter", "fuse", "both")

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
    else a training `adapter_config.json` (legacy verl's `lora_adapter/`), which also carries the patterns."""
    s = LoraSettings()
    origins = []
    for path in (root / ADAPTER_DIR / "adapter_config.json", root / "adapter_config.json"):
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
            f"{root} holds LoRA tensors but neither lora_train_meta.json nor lora_adapter/adapter_config.json says "
            "their lora_alpha",
            hint="pass --lora-alpha and --lora-rank with the values the run trained with "
                 "(verl: actor_rollout_ref.model.lora_alpha and lora_rank)",
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


# --------------------------------------------------------------------------------------------------- base / fused views
@dataclass(frozen=True)
class Recipe:
    """How one base-model tensor is made from source tensors: taken as is, or fused with its LoRA."""

    inputs: tuple[str, ...]
    make: Callable[[Tensors], torch.Tensor]


def _take(key: str, t: Tensors) -> torch.Tensor:
    return t[key]


def _fused(fn: Callable[..., torch.Tensor], keys: tuple[str, ...], scale: float, t: Tensors) -> torch.Tensor:
    return fn(*(t[k] for k in keys), scale)


def take(key: str) -> Recipe:
    return Recipe((key,), partial(_take, key))


def base_recipes(keys: LoraKeys, base: dict[str, str], specs: dict[str, TensorSpec], s: LoraSettings, *,
                 fuse: bool) -> dict[str, Recipe]:
    """Every base tensor by its transformers name. With `fuse`, LoRA deltas are folded in and modules_to_save
    hold their trained copies; otherwise the base model is exactly what training started from."""
    recipes = {name: take(key) for name, key in base.items()}
    if not fuse:
        return recipes
    for name, key in keys.trained.items():
        if name not in recipes:
            raise MappingError(f"{key} has no base weight {name} to replace", hint="the checkpoint is incomplete")
        recipes[name] = take(key)
    for mod in keys.modules.values():
        if mod.magnitude is not None:
            raise ConfigError(f"{mod.name} was trained with DoRA, which hubexport cannot fuse yet",
                              hint="export it with --lora adapter and merge it with PEFT's merge_and_unload")
        weight = f"{mod.name}.weight"
        if weight not in recipes:
            raise MappingError(f"LoRA module {mod.name} has no base weight {weight}",
                               hint="the base model does not match the LoRA tensors; check --base-model")
        scale = module_scale(mod.name, module_rank(mod, specs), s)
        assert mod.a is not None and mod.b is not None
        _check_shapes(mod, specs, specs[base[weight]].shape)
        fn = fuse_embedding if mod.embedding else fuse_linear
        recipes[weight] = Recipe((base[weight], mod.a, mod.b), partial(_fused, fn, (base[weight], mod.a, mod.b), scale))
        if mod.b_bias is not None:
            bias = f"{mod.name}.bias"
            if bias not in base:
                raise MappingError(f"{mod.b_bias} has no base bias {bias} to fold into",
                                   hint="PEFT's lora_bias needs a base layer with a bias")
            recipes[bias] = Recipe((base[bias], mod.b_bias), partial(_fused, fuse_bias, (base[bias], mod.b_bias), scale))
    return recipes


def _check_shapes(mod: LoraModule, specs: dict[str, TensorSpec], w: tuple[int, ...]) -> None:
    assert mod.a is not None and mod.b is not None
    a, b = specs[mod.a].shape, specs[mod.b].shape
    want = (a[1], b[0]) if mod.embedding else (b[0], a[1])
    if len(a) != 2 or len(b) != 2 or tuple(w) != want or a[0] != b[1]:
        raise MappingError(
            f"{mod.name}.weight has shape {list(w)} but its LoRA A {list(a)} and B {list(b)} make a {list(want)} "
            "delta",
            hint="only LoRA on Linear and Embedding layers can be fused; use --lora adapter",
        )


def rebind(group: Group, recipes: dict[str, Recipe]) -> Group:
    """A mapping group over base names, re-pointed at source keys: its inputs become the recipes' inputs (base, A, B)."""
    inputs = tuple(dict.fromkeys(k for n in group.inputs for k in recipes[n].inputs))
    return Group(inputs, group.outputs, partial(_through, group, recipes))


def _through(group: Group, recipes: dict[str, Recipe], tensors: Tensors) -> Tensors:
    return group.convert({n: recipes[n].make(tensors) for n in group.inputs})


# ------------------------------------------------------------------------------------------------------------- adapter
def adapter_names(keys: LoraKeys, all_keys: Iterable[str], bias: str) -> dict[str, str]:
    """PEFT's saved name for each source key that goes into adapter_model.safetensors (adapter name removed; DoRA's
    `.weight` dropped; modules_to_save under the module's own name; biases as PEFT's `bias` setting selects)."""
    out: dict[str, str] = {}
    for mod in keys.modules.values():
        assert mod.a is not None and mod.b is not None
        p = PEFT_PREFIX + mod.name
        suffix = ("_embedding_A", "_embedding_B") if mod.embedding else ("_A.weight", "_B.weight")
        out[mod.a], out[mod.b] = f"{p}.lora{suffix[0]}", f"{p}.lora{suffix[1]}"
        if mod.b_bias:
            out[mod.b_bias] = f"{p}.lora_B.bias"
        if mod.magnitude:
            out[mod.magnitude] = f"{p}.lora_magnitude_vector"
    for name, key in keys.trained.items():
        out[key] = PEFT_PREFIX + name
    if bias == "all":
        out.update({k: k for k in all_keys if k.endswith(".bias") and k not in out})
    elif bias.endswith("_only"):
        out.update({k: k for k in all_keys for m in keys.modules
                    if k in (f"{PEFT_PREFIX}{m}.base_layer.bias", f"{PEFT_PREFIX}{m}.bias")})
    return out


def target_modules(modules: Iterable[str], linear_like: Iterable[str]) -> list[str]:
    """Module-name suffixes (e.g. q_proj) when they select exactly the adapted modules of the base model, else the
    full module names, so PEFT never attaches an untrained LoRA to a module the run did not adapt."""
    adapted = set(modules)
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    selected = {n for n in linear_like if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == adapted else sorted(adapted)


def adapter_config(keys: LoraKeys, s: LoraSettings, *, targets: list[str], task_type: str,
                   base_model: str | None) -> dict[str, Any]:
    """adapter_config.json as PEFT's LoraConfig writes it (fields PEFT leaves out fall back to its defaults)."""
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": s.task_type or task_type,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "r": s.r,
        "lora_alpha": _number(s.lora_alpha),
        "lora_dropout": 0.0,
        "target_modules": targets,
        "modules_to_save": sorted({m.rsplit(".", 1)[-1] for m in keys.trained_modules}) or None,
        "rank_pattern": s.rank_pattern,
        "alpha_pattern": {k: _number(v) for k, v in s.alpha_pattern.items()},
        "use_rslora": s.use_rslora,
        "bias": s.bias,
        "lora_bias": any(m.b_bias for m in keys.modules.values()),
        "use_dora": any(m.magnitude for m in keys.modules.values()),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    # The run's own config knows what shapes cannot tell (exclude_modules, layers_to_transform, ...): keep it, with
    # the checked values on top.
    keep = {k: v for k, v in s.training_config.items() if k not in cfg or k in ("target_modules", "modules_to_save")}
    return cfg | keep | {"inference_mode": True, "base_model_name_or_path": base_model}


def _number(x: float | None) -> float | int | None:
    return int(x) if isinstance(x, float) and x.is_integer() else x


# ------------------------------------------------------------------------------------------------------------ megatron
def check_megatron_adapter(layout: Layout) -> None:
    """Refuse a Megatron PEFT checkpoint (detect reports it in `layout.adapter`): its base weights alone would drop
    the training."""
    if layout.adapter is not None:
        raise CheckpointError(
            f"{layout.root} is a Megatron checkpoint with LoRA adapters (adapter_checkpoint/ or backend.peft), which "
            "hubexport cannot export yet",
            hint="exporting only its base weights would drop the training; merge the adapter with Megatron-Bridge "
                 "for now (Megatron LoRA support is a planned follow-up)",
        )


def _pick(name: str, t: Tensors) -> Tensors:
    return {name: t[name]}


def _renamed(src: str, dst: str, t: Tensors) -> Tensors:
    return {dst: t[src]}


def copy_group(spec: TensorSpec) -> Group:
    """A tensor written under its own name (a --base-model folder is already in save_pretrained's names)."""
    return Group((spec.name,), (spec,), partial(_pick, spec.name))


def adapter_groups(keys: LoraKeys, specs: dict[str, TensorSpec], bias: str) -> list[Group]:
    return [Group((src,), (TensorSpec(dst, specs[src].shape, specs[src].dtype),), partial(_renamed, src, dst))
            for src, dst in adapter_names(keys, specs, bias).items()]
