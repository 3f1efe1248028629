"""Qwen2-MoE (qkv biases, routed experts, one shared expert behind a sigmoid gate)."""

from hubexport.mapping.archs._parts import (
    DENSE_MLP,
    EMBEDDING,
    EXPERTS,
    GQA_ATTENTION,
    MOE_NORM,
    QKV_BIAS,
    ROUTER,
    H,
    M,
    qwen_moe_layers,
    qwen_num_experts,
    shared_experts,
)
from hubexport.mapping.registry import Arch, R

ARCH = Arch(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    causal_lm="Qwen2MoeForCausalLM",
    rules=(
        *EMBEDDING, *GQA_ATTENTION, QKV_BIAS, *DENSE_MLP, MOE_NORM, ROUTER, *EXPERTS,
        *shared_experts("mlp.shared_expert"),
        R(M + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight", when="moe"),
    ),
    layer_kinds=qwen_moe_layers,
    num_experts=qwen_num_experts,
)
