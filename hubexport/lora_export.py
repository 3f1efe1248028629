"""The LoRA side of a merge: which base weights to write (with the adapter fused in for fuse/both, or from
--base-model for a LoRA-only checkpoint), and the PEFT adapter folder to write next to them. Pure planning: the
executor writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hubexport import lora, lora_views
from hubexport.core import Group, TensorSpec, natural_key
from hubexport.detect import Layout
from hubexport.errors import ConfigError, MappingError
from hubexport.mapping.hf_native import check_keys, saved_groups
from hubexport.plan import Plan, make_plan
from hubexport.sources import CombinedSource, Source
from hubexport.sources.quantized import open_hf_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class LoraExport:
    """The LoRA side of a PEFT checkpoint: how the base folder was made and the adapter to write next to it."""

    mode: str  # "adapter" | "fuse" | "both"
    settings: lora.LoraSettings
    keys: lora.LoraKeys
    plan: Plan  # lora_adapter/adapter_model.safetensors
    config: dict
    writes_base: bool  # False for a LoRA-only checkpoint without --base-model: the adapter alone
    base_model: Path | None = None  # the folder the base weights of a LoRA-only checkpoint come from
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"mode": self.mode, "r": self.settings.r, "lora_alpha": self.config["lora_alpha"],
                "modules": len(self.keys.modules), "lora_only": self.keys.lora_only, "settings_from": self.settings.origin,
                "adapter_dir": lora.ADAPTER_DIR if self.mode != "fuse" else None}


def prepare_lora(
    layout: Layout, model: PreTrainedModel, source: Source, keys: lora.LoraKeys, *, mode: str, alpha: float | None,
    rank: int | None, base_model: Path | None, cast: torch.dtype | None, value_model: bool,
) -> tuple[list[Group], Source, LoraExport]:
    """Base-model groups (LoRA fused in for fuse/both) over the checkpoint, or over --base-model for a LoRA-only
    checkpoint; plus the adapter's plan and config."""
    settings = lora.find_settings(layout.root, alpha=alpha, rank=rank)
    lora.check_settings(settings, layout.root)
    specs = source.metas()
    notes = lora.resolve_ranks(keys, specs, settings)
    fuse = mode in ("fuse", "both")
    writes_base = True
    if not keys.lora_only:
        if base_model is not None:
            notes.append(f"--base-model {base_model} ignored: the checkpoint holds the base weights")
        base_specs = {n: TensorSpec(n, specs[k].shape, specs[k].dtype) for n, k in keys.base.items()}
        recipes = lora_views.base_recipes(keys, keys.base, specs, settings, fuse=fuse)
        groups = [lora_views.rebind(g, recipes) for g in saved_groups(model, base_specs)]
    elif base_model is None:
        if fuse:
            raise ConfigError(
                f"{layout.root} holds only LoRA tensors (save_lora_only), so --lora {mode} has no base weights to "
                "fuse into", hint="pass --base-model PATH (the Hugging Face folder the run started from), or use "
                                   "--lora adapter")
        groups, writes_base = [], False
        notes.append("LoRA-only checkpoint: writing the adapter alone (pass --base-model to write the model too)")
    else:
        base = open_hf_weights(Path(base_model))
        base_names = check_base_folder(model, base, Path(base_model))
        source = CombinedSource(base, source)
        specs = source.metas()
        recipes = lora_views.base_recipes(keys, {n: n for n in base_names}, specs, settings, fuse=fuse)
        groups = [lora_views.rebind(lora_views.copy_group(specs[n]), recipes) for n in base_names]
    if fuse:
        check_fusable_ties(model, keys)
    adapter = make_plan(lora_views.adapter_groups(keys, specs, settings.bias), max_shard_size=2**62, cast=cast,
                        prefix="adapter_model")
    modules = [n for n, _ in model.named_modules()]
    config = lora_views.adapter_config(
        keys, settings, targets=lora_views.target_modules(keys.modules, modules),
        task_type="TOKEN_CLS" if value_model else "CAUSAL_LM", base_model=str(base_model) if base_model else None)
    used = base_model if keys.lora_only else None
    return groups, source, LoraExport(mode, settings, keys, adapter, config, writes_base, used, notes)


def check_base_folder(model: PreTrainedModel, base: Source, folder: Path) -> list[str]:
    """--base-model must hold exactly what save_pretrained writes for the checkpoint's architecture."""
    meta = {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    expected = {o.name: o.shape for g in saved_groups(model, meta) for o in g.outputs}
    found = base.metas()
    try:
        check_keys(expected, found, type(model).__name__)
    except MappingError as e:
        raise MappingError(f"--base-model {folder}: {e.message}",
                           hint="pass the base model the LoRA run started from (same architecture and sizes)") from None
    return sorted(found, key=natural_key)


def check_fusable_ties(model: PreTrainedModel, keys: lora.LoraKeys) -> None:
    """A tied pair shares one tensor: folding a delta into one side would silently change the other."""
    changed = {f"{m}.weight" for m in keys.modules} | set(keys.trained)
    for alias, canonical in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        hit = sorted(changed & {alias, canonical})
        if hit and getattr(model.config, "tie_word_embeddings", False):
            other = canonical if hit[0] == alias else alias
            raise ConfigError(f"fusing the LoRA of {hit[0]} would also change {other}, which is tied to it",
                              hint="export with --lora adapter, or untie the embeddings before training")


def describe(exp: LoraExport) -> str:
    s = exp.settings
    what = {"adapter": f"base model + {lora.ADAPTER_DIR}/", "fuse": "fused into the weights",
            "both": f"fused into the weights + {lora.ADAPTER_DIR}/"}[exp.mode]
    if not exp.writes_base:
        what = f"{lora.ADAPTER_DIR}/ only"
    return (f"LoRA: {len(exp.keys.modules)} module(s), r={s.r}, lora_alpha={exp.config['lora_alpha']} "
            f"(from {s.origin}) → {what}")
