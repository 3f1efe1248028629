"""Qwen3 (dense, GQA, per-head q/k RMSNorm, no biases)."""

from hubexport.mapping.archs._parts import DENSE_MLP, EMBEDDING, GQA_ATTENTION, QK_NORM, all_dense
from hubexport.mapping.registry import Arch

ARCH = Arch(
    name="qwen3",
    model_types=("qwen3",),
    causal_lm="Qwen3ForCausalLM",
    rules=(*EMBEDDING, *GQA_ATTENTION, *QK_NORM, *DENSE_MLP),
    layer_kinds=all_dense,
)
