"""Transformers in-memory names → what `save_pretrained` writes, using transformers' own conversion mapping (e.g.
fused `mlp.experts.gate_up_proj` [E, 2I, H] → per-expert `mlp.experts.e.{gate,up}_proj.weight`) on a meta-device
model, so no hand-written table can drift from the library."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import transformers

from hubexport.core import Group, Tensors, TensorSpec
from hubexport.errors import ConfigError, MappingError
from hubexport.mapping import native_cache
from hubexport.mapping.archnames import model_class
from hubexport.mapping.ops import same_bytes

if TYPE_CHECKING:  # importing them loads transformers' modeling code: only done when a model is built
    from transformers import PretrainedConfig, PreTrainedModel

def architecture_for(config: PretrainedConfig, *, value_model: bool) -> tuple[str, list[str]]:
    """The class the weights really are, and notes on how it was found (see archnames.model_class): a critic is
    `<Family>ForTokenClassification` whatever the config says."""
    return model_class(config, value_model=value_model)


def meta_model(config: PretrainedConfig, architecture: str, *, trust_remote_code: bool) -> PreTrainedModel:
    """The model skeleton on the meta device: its names and shapes, no memory."""
    cls = getattr(transformers, architecture, None)
    with torch.device("meta"):
        if cls is not None:
            return cls._from_config(config)
        auto_map = getattr(config, "auto_map", None) or {}
        if not trust_remote_code or not auto_map:
            raise ConfigError(
                f"architecture {architecture!r} is unknown to transformers {transformers.__version__}",
                hint="upgrade transformers, or pass --trust-remote-code if the config ships custom modeling code",
            )
        auto = transformers.AutoModelForTokenClassification if "ForTokenClassification" in architecture else (
            transformers.AutoModelForCausalLM)
        return auto.from_config(config, trust_remote_code=True)


def _meta(spec: TensorSpec) -> torch.Tensor:
    return torch.empty(spec.shape, dtype=spec.dtype, device="meta")


def _revert(model: PreTrainedModel, tensors: Tensors) -> Tensors:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


@dataclass(frozen=True)
class TiedCheck:
    """A group with no outputs: a tied alias save_pretrained drops must hold its canonical weight's bytes."""

    alias: str
    canonical: str

    def __call__(self, tensors: Tensors) -> Tensors:
        if not same_bytes(tensors[self.alias], tensors[self.canonical]):
            raise ConfigError(
                f"config.json says tie_word_embeddings=true, but {self.alias} differs from {self.canonical} in the "
                "checkpoint",
                hint="the model was trained untied: set tie_word_embeddings=false in the checkpoint's config.json",
            )
        return {}


def check_keys(
    expected: dict[str, tuple[int, ...]], found: dict[str, TensorSpec], architecture: str, optional: Iterable[str] = ()
) -> None:
    """Strict: every expected tensor present with its shape (tied aliases may be absent), nothing left over."""
    missing = sorted(set(expected) - set(found) - set(optional))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"unexpected {len(extra)} (e.g. {', '.join(extra[:3])})")
        raise MappingError(
            f"checkpoint tensors do not match {architecture}: {'; '.join(parts)}",
            hint="check config.json's architectures and the transformers version the run trained with",
        )
    for name, shape in expected.items():
        if name in found and found[name].shape != shape:
            raise MappingError(
                f"{name} has shape {list(found[name].shape)} in the checkpoint but {architecture} expects {list(shape)}",
                hint="config.json does not describe these weights; use the config saved with the checkpoint",
            )


@dataclass(frozen=True)
class SavedNames:
    """What save_pretrained writes for a model, as plain data (a meta model's, or the cache's)."""

    model_class: str
    shapes: dict[str, tuple[int, ...]]  # state_dict() names, tied aliases included → shapes
    tied: dict[str, str | None]  # alias → canonical, for the aliases save_pretrained drops
    converts: bool  # transformers converts some weights on saving: the groups need the model itself


def saved_names(model: PreTrainedModel) -> SavedNames:
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(sd), model)
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    probe: Tensors = {}  # revert_weight_conversion hands back the very dict it got when it has nothing to do
    converts = revert_weight_conversion(model, probe) is not probe
    return SavedNames(type(model).__name__, {k: tuple(v.shape) for k, v in sd.items()},
                      {a: tied.get(a) for a in sd if a not in kept}, converts)


def _cached(entry: dict | None) -> SavedNames | None:
    try:
        return SavedNames(str(entry["model_class"]), {str(k): tuple(int(d) for d in v) for k, v in entry["shapes"].items()},
                          {str(k): v if v is None else str(v) for k, v in entry["tied"].items()}, False)
    except (KeyError, TypeError, ValueError, AttributeError):  # no entry, or one this version cannot read
        return None


def native_groups(config: PretrainedConfig, architecture: str, specs: dict[str, TensorSpec], *,
                  trust_remote_code: bool) -> list[Group]:
    """saved_groups for the config's model, without building it when the cache says transformers saves its weights
    unconverted (models that ship their own code are always built)."""
    key = None if getattr(config, "auto_map", None) else native_cache.entry_key(config.to_json_string(), architecture)
    names = _cached(native_cache.load(key)) if key else None
    if names is not None:
        return groups_for(names, specs, None)
    model = meta_model(config, architecture, trust_remote_code=trust_remote_code)
    names = saved_names(model)
    if key and not names.converts:
        native_cache.store(key, {"model_class": names.model_class, "shapes": names.shapes, "tied": names.tied})
    return groups_for(names, specs, model)


def saved_groups(model: PreTrainedModel, specs: dict[str, TensorSpec]) -> list[Group]:
    return groups_for(saved_names(model), specs, model)


def groups_for(names: SavedNames, specs: dict[str, TensorSpec], model: PreTrainedModel | None) -> list[Group]:
    """One group per owning module (conversions never cross a module), outputs computed on meta tensors and checked
    against a whole-model revert so grouping can never change the result. Without conversions, one passthrough group
    per tensor (the model is not needed)."""
    check_keys(names.shapes, specs, names.model_class, optional=names.tied)
    groups: list[Group] = [
        Group((alias, canonical), (), TiedCheck(alias, canonical))
        for alias, canonical in names.tied.items() if alias in specs and canonical is not None
    ]
    kept = [n for n in names.shapes if n not in names.tied]
    if not names.converts:
        return groups + [Group((n,), (specs[n],), dict, passthrough=True) for n in kept]
    assert model is not None
    by_module: dict[str, list[str]] = {}
    for name in kept:
        by_module.setdefault(name.rsplit(".", 1)[0], []).append(name)
    produced: dict[str, TensorSpec] = {}
    for group_names in by_module.values():
        out = _revert(model, {n: _meta(specs[n]) for n in group_names})
        outs = tuple(TensorSpec(k, tuple(v.shape), v.dtype) for k, v in out.items())
        produced.update((o.name, o) for o in outs)
        groups.append(Group(tuple(group_names), outs, partial(_revert, model)))
    whole = _revert(model, {n: _meta(specs[n]) for n in kept})
    if set(whole) != set(produced) or any(tuple(whole[k].shape) != produced[k].shape for k in whole):
        raise MappingError(
            f"transformers' conversion for {names.model_class} mixes tensors of different modules",
            hint="this architecture needs a dedicated table in hubexport/mapping/archs; please report it",
        )
    return groups
