"""DeepSeek-V3: multi-latent attention (1:1 copies, formats doc §2.7), the first `first_k_dense_replace` layers dense,
the rest MoE with a shared expert and `router.expert_bias` → `e_score_correction_bias`; MTP block m
(`mtp.layers.<m>.`, names checked against a real GPTModel in tests/fixtures_mla.py) is HF layer L+m, both ways.
"""

from hubexport.mapping.archs._parts import DENSE_MLP, EMBEDDING, EXPERTS, ROUTER, H, M, shared_experts
from hubexport.mapping.registry import Arch, R

A, SA = M + "self_attention.", H + "self_attn."
MLA = (
    R(M + "input_layernorm.weight", H + "input_layernorm.weight"),
    R(A + "linear_q_down_proj.weight", SA + "q_a_proj.weight", if_config="q_lora_rank"),
    # TE spec fuses the q/kv latent norms into the up projections; the local spec has separate q/kv_layernorm
    R(A + "linear_q_up_proj.layer_norm_weight", SA + "q_a_layernorm.weight", if_config="q_lora_rank",
      local=A + "q_layernorm.weight"),
    R(A + "linear_q_up_proj.weight", SA + "q_b_proj.weight", if_config="q_lora_rank"),
    R(A + "linear_q_proj.weight", SA + "q_proj.weight", if_config="!q_lora_rank"),
    R(A + "linear_kv_down_proj.weight", SA + "kv_a_proj_with_mqa.weight"),
    R(A + "linear_kv_up_proj.layer_norm_weight", SA + "kv_a_layernorm.weight", local=A + "kv_layernorm.weight"),
    R(A + "linear_kv_up_proj.weight", SA + "kv_b_proj.weight"),
    R(A + "linear_proj.weight", SA + "o_proj.weight"),
)

# The local MLA spec has no key map: its pre-MLP norm keeps mcore's own name in dense and MoE layers alike.
NORM = H + "post_attention_layernorm.weight"
DENSE_NORM = R(DENSE_MLP[0].mcore[0], NORM, when="dense", local=M + "pre_mlp_layernorm.weight")
MOE_NORM = R(M + "pre_mlp_layernorm.weight", NORM, when="moe")

MTP = "mtp.layers.{M}."
MTP_RULES = (
    R(MTP + "enorm.weight", H + "enorm.weight"),
    R(MTP + "hnorm.weight", H + "hnorm.weight"),
    R(MTP + "eh_proj.weight", H + "eh_proj.weight"),
    R(MTP + "final_layernorm.weight", H + "shared_head.norm.weight"),
)

ARCH = Arch(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    causal_lm="DeepseekV3ForCausalLM",
    rules=(
        *EMBEDDING, *MLA, DENSE_NORM, *DENSE_MLP[1:], MOE_NORM, ROUTER,
        R(M + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias", when="moe"),
        *EXPERTS, *shared_experts("mlp.shared_experts"),
    ),
    layer_kinds=lambda cfg: ["dense" if i < cfg.first_k_dense_replace else "moe"
                             for i in range(cfg.num_hidden_layers)],
    num_experts=lambda cfg: cfg.n_routed_experts,
    mtp_rules=MTP_RULES,
    mtp_kind="moe",
    per_layer_keys=lambda cfg: True,  # megatron configs for DeepSeek-V3 give moe_layer_freq as a list
)
