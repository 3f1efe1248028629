"""Mixtral: every layer sparse; HF keeps the original `block_sparse_moe.experts.E.w1/w3/w2` names (w1 gate, w3 up)."""

from hubexport.mapping.archs._parts import EMBEDDING, EXPERT_FC1, EXPERT_FC2, GQA_ATTENTION, MOE_NORM, H, M
from hubexport.mapping.registry import Arch, R

MOE = H + "block_sparse_moe."

ARCH = Arch(
    name="mixtral",
    model_types=("mixtral",),
    causal_lm="MixtralForCausalLM",
    rules=(
        *EMBEDDING, *GQA_ATTENTION, MOE_NORM,
        R(M + "mlp.router.weight", MOE + "gate.weight", when="moe"),
        R(EXPERT_FC1, (MOE + "experts.{E}.w1.weight", MOE + "experts.{E}.w3.weight"), "gate_up", when="moe"),
        R(EXPERT_FC2, MOE + "experts.{E}.w2.weight", when="moe"),
    ),
    layer_kinds=lambda cfg: ["moe"] * cfg.num_hidden_layers,
    num_experts=lambda cfg: cfg.num_local_experts,
)
