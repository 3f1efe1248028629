"""One module per architecture; this index finds the table for a config's `model_type`."""

from __future__ import annotations

from hubexport.errors import ConfigError
from hubexport.mapping.archs import (
    deepseek_v3,
    llama,
    mixtral,
    qwen2,
    qwen2_5_vl,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    qwen3_vl,
    qwen3_vl_moe,
)
from hubexport.mapping.registry import Arch

MODULES = (llama, qwen2, qwen3, qwen2_moe, qwen3_moe, mixtral, deepseek_v3, qwen2_5_vl, qwen3_vl, qwen3_vl_moe)
ARCHS: dict[str, Arch] = {t: m.ARCH for m in MODULES for t in m.ARCH.model_types}


def arch_for(config) -> Arch:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ConfigError(
            f"no Megatron mapping for model_type {model_type!r}",
            hint=f"supported: {', '.join(sorted(ARCHS))}; add a table in hubexport/mapping/archs/",
        )
    return ARCHS[model_type]
