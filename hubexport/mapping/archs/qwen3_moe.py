"""Qwen3-MoE (q/k norm, routed experts, no shared expert)."""

from hubexport.mapping.archs._parts import (
    DENSE_MLP,
    EMBEDDING,
    EXPERTS,
    GQA_ATTENTION,
    MOE_NORM,
    QK_NORM,
    ROUTER,
    qwen_moe_layers,
    qwen_num_experts,
)
from hubexport.mapping.registry import Arch

BUT_EXPERTS = (*EMBEDDING, *GQA_ATTENTION, *QK_NORM, *DENSE_MLP, MOE_NORM, ROUTER)  # Qwen3-VL-MoE fuses the experts

ARCH = Arch(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    causal_lm="Qwen3MoeForCausalLM",
    rules=(*BUT_EXPERTS, *EXPERTS),
    layer_kinds=qwen_moe_layers,
    num_experts=qwen_num_experts,
)
