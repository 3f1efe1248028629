"""Transformers in-memory names → what `save_pretrained` writes, using transformers' own conversion mapping (e.g.
fused `mlp.experts.gate_up_proj` [E, 2I, H] → per-expert `mlp.experts.e.{gate,up}_proj.weight`) on a meta-device
model, so no hand-written table can drift from the library."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from hubexport.core import Group, Tensors, TensorSpec
from hubexport.errors import ConfigError, MappingError
from hubexport.mapping.archnames import model_class

VALUE_HEAD = "score.weight"


def is_value_checkpoint(names: Iterable[str], specs: dict[str, TensorSpec]) -> bool:
    """A verl critic: a [1, H] `score` head and no language-model head."""
    return VALUE_HEAD in specs and specs[VALUE_HEAD].shape[0] == 1 and "lm_head.weight" not in names


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
    return revert_weight_conversion(model, dict(tensors))


def _assert_tied(alias: str, canonical: str, tensors: Tensors) -> Tensors:
    if not torch.equal(tensors[alias], tensors[canonical]):
        raise ConfigError(
            f"config.json says tie_word_embeddings=true, but {alias} differs from {canonical} in the checkpoint",
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


def saved_groups(model: PreTrainedModel, specs: dict[str, TensorSpec]) -> list[Group]:
    """One group per owning module (conversions never cross a module), outputs computed on meta tensors and checked
    against a whole-model revert so grouping can never change the result."""
    sd = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(sd), model)
    aliases = [name for name in sd if name not in kept]
    check_keys({k: tuple(v.shape) for k, v in sd.items()}, specs, type(model).__name__, optional=aliases)
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    groups: list[Group] = [
        Group((alias, tied[alias]), (), partial(_assert_tied, alias, tied[alias])) for alias in aliases if alias in specs
    ]
    by_module: dict[str, list[str]] = {}
    for name in kept:
        by_module.setdefault(name.rsplit(".", 1)[0], []).append(name)
    produced: dict[str, TensorSpec] = {}
    for names in by_module.values():
        out = _revert(model, {n: _meta(specs[n]) for n in names})
        outs = tuple(TensorSpec(k, tuple(v.shape), v.dtype) for k, v in out.items())
        produced.update((o.name, o) for o in outs)
        groups.append(Group(tuple(names), outs, partial(_revert, model)))
    whole = _revert(model, {n: _meta(specs[n]) for n in kept})
    if set(whole) != set(produced) or any(tuple(whole[k].shape) != produced[k].shape for k in whole):
        raise MappingError(
            f"transformers' conversion for {type(model).__name__} mixes tensors of different modules",
            hint="this architecture needs a dedicated table in hubexport/mapping/archs; please report it",
        )
    return groups
