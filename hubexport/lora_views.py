"""The tensors a LoRA export writes, as pure recipes and groups: the base weights (as training started from them, or
with `W + (alpha/r)·B·A` folded in and modules_to_save's trained copies), and the adapter under PEFT's saved key
names with its adapter_config.json."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from hubexport.core import Group, Tensors, TensorSpec
from hubexport.errors import ConfigError, MappingError
from hubexport.lora import (
    PEFT_PREFIX,
    LoraKeys,
    LoraModule,
    LoraSettings,
    fuse_bias,
    fuse_embedding,
    fuse_linear,
    module_rank,
    module_scale,
)


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
