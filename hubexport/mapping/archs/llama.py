"""Llama (dense, GQA, optional attention/MLP biases)."""

from hubexport.mapping.archs._parts import DENSE_MLP, EMBEDDING, GQA_ATTENTION, QKV_BIAS, H, M, all_dense
from hubexport.mapping.registry import Arch, R

ARCH = Arch(
    name="llama",
    model_types=("llama",),
    causal_lm="LlamaForCausalLM",
    rules=(
        *EMBEDDING,
        *GQA_ATTENTION,
        R(*QKV_BIAS.mcore, QKV_BIAS.hf, "qkv", if_config="attention_bias"),
        R(M + "self_attention.linear_proj.bias", H + "self_attn.o_proj.bias", if_config="attention_bias"),
        *DENSE_MLP,
        R(M + "mlp.linear_fc1.bias", (H + "mlp.gate_proj.bias", H + "mlp.up_proj.bias"), "gate_up",
          if_config="mlp_bias"),
        R(M + "mlp.linear_fc2.bias", H + "mlp.down_proj.bias", if_config="mlp_bias"),
    ),
    layer_kinds=all_dense,
)
