"""Qwen2 / Qwen2.5 (dense, GQA, q/k/v biases)."""

from hubexport.mapping.archs._parts import DENSE_MLP, EMBEDDING, GQA_ATTENTION, QKV_BIAS, all_dense
from hubexport.mapping.registry import Arch

ARCH = Arch(
    name="qwen2",
    model_types=("qwen2",),
    causal_lm="Qwen2ForCausalLM",
    rules=(*EMBEDDING, *GQA_ATTENTION, QKV_BIAS, *DENSE_MLP),
    layer_kinds=all_dense,
)
