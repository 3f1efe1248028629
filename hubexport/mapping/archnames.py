"""The transformers class a config's weights are, for both directions (FSDP/mbridge merges, Megatron merges,
to-megatron): `architectures[0]` with FSDP2's class prefix stripped, or, when the config has no `architectures`,
the class transformers registers for its `model_type` and the checkpoint's head. A name that is still unknown is
returned unchanged, so the caller's "unknown architecture" error names it. transformers (~0.8 s) is imported only
where it is asked: a config that names its class plainly needs none (the first merge's guess, `first_merge`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hubexport.core import TensorSpec

FSDP_PREFIX = "FSDP"  # fully_shard makes a class `FSDP<Name>`; save_pretrained wrote that name until transformers 4.5x


VALUE_HEAD = "score.weight"


def is_value_checkpoint(names: Iterable[str], specs: dict[str, TensorSpec]) -> bool:
    """A verl critic: a [1, H] `score` head and no language-model head."""
    return VALUE_HEAD in specs and specs[VALUE_HEAD].shape[0] == 1 and "lm_head.weight" not in names


def _is_class(name: str) -> bool:
    import transformers

    return hasattr(transformers, name)


def strip_fsdp_prefix(name: str) -> str:
    """`FSDPQwen2ForCausalLM` -> `Qwen2ForCausalLM`, only when the prefixed name is not a class and the rest is."""
    rest = name.removeprefix(FSDP_PREFIX)
    return rest if rest != name and not _is_class(name) and _is_class(rest) else name


def _family(name: str) -> str:
    return name[:name.rindex("For")]


def _from_model_type(config: Any, value_model: bool) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    )

    table = MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES if value_model else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    found = table.get(getattr(config, "model_type", None))
    if found:
        return found
    family = type(config).__name__.removesuffix("Config")  # custom-code configs: <Family>Config
    return f"{family}ForTokenClassification" if value_model else f"{family}ForCausalLM"


def model_class(config: Any, *, value_model: bool) -> tuple[str, list[str]]:
    """(class name, notes). `value_model`: the checkpoint's head is a [1, hidden] `score` (a verl critic), so the
    class is `<Family>ForTokenClassification` whatever the config says; otherwise the config's class, or
    `*ForCausalLM` (an `lm_head`, or tied embeddings) when it names none."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        name = _from_model_type(config, value_model)
        head = "score value head" if value_model else "language-model head"
        return name, [f"config.json has no architectures: {name}, from model_type "
                      f"{getattr(config, 'model_type', None)!r} and the checkpoint's {head}"]
    name, notes = strip_fsdp_prefix(archs[0]), []
    if name != archs[0]:
        notes.append(f"config.json's architectures {archs[0]!r} carries FSDP2's class prefix: writing {name}")
    if value_model and not name.endswith("ForTokenClassification"):
        name = f"{_family(name)}ForTokenClassification" if "For" in name else _from_model_type(config, True)
    return name, notes
