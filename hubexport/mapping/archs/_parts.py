"""Table rows shared by several architectures (formats doc §2.3, §2.6). Layer rows use `{L}`, expert rows `{E}`."""

from __future__ import annotations

from dataclasses import replace

from hubexport.mapping.registry import R, Rule

M, H = "decoder.layers.{L}.", "model.layers.{L}."

EMBEDDING = (
    R("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab"),
    R("decoder.final_layernorm.weight", "model.norm.weight"),
)

# The TE spec fuses the pre-attention norm into linear_qkv; the local spec saves it under the same TE name, and
# per-layer checkpoints of unfused specs may carry `input_layernorm` (mcore's own name): accept both.
INPUT_NORM = R(M + "self_attention.linear_qkv.layer_norm_weight", H + "input_layernorm.weight",
               alt=(M + "input_layernorm.weight",))

GQA_ATTENTION = (
    INPUT_NORM,
    R(M + "self_attention.linear_qkv.weight",
      (H + "self_attn.q_proj.weight", H + "self_attn.k_proj.weight", H + "self_attn.v_proj.weight"), "qkv"),
    R(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
)
QKV_BIAS = R(M + "self_attention.linear_qkv.bias",
             (H + "self_attn.q_proj.bias", H + "self_attn.k_proj.bias", H + "self_attn.v_proj.bias"), "qkv")
QK_NORM = (
    R(M + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
    R(M + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight"),
)

DENSE_MLP = (
    R(M + "mlp.linear_fc1.layer_norm_weight", H + "post_attention_layernorm.weight", when="dense",
      alt=(M + "pre_mlp_layernorm.weight",)),
    R(M + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), "gate_up", when="dense"),
    R(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", when="dense"),
)

# MoE layers: the norm is a separate pre_mlp_layernorm in the TE spec; the local spec's key map
# (`pre_mlp_layernorm.` → `mlp.linear_fc1.layer_norm_`) renames it even in MoE layers.
MOE_NORM = R(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight", when="moe",
             local=M + "mlp.linear_fc1.layer_norm_weight")
ROUTER = R(M + "mlp.router.weight", H + "mlp.gate.weight", when="moe")
EXPERT_FC1 = M + "mlp.experts.local_experts.{E}.linear_fc1.weight"
EXPERT_FC2 = M + "mlp.experts.local_experts.{E}.linear_fc2.weight"
EXPERTS = (
    R(EXPERT_FC1, (H + "mlp.experts.{E}.gate_proj.weight", H + "mlp.experts.{E}.up_proj.weight"), "gate_up",
      when="moe"),
    R(EXPERT_FC2, H + "mlp.experts.{E}.down_proj.weight", when="moe"),
)

# transformers 5's fused expert tensors, as Qwen3-VL-MoE saves them: one HF tensor per layer holds all E experts
FUSED_EXPERTS = (
    R(EXPERT_FC1, H + "mlp.experts.gate_up_proj", "experts", when="moe"),
    R(EXPERT_FC2, H + "mlp.experts.down_proj", "experts", when="moe"),
)


def shared_experts(hf_prefix: str) -> tuple:
    """Shared-expert rows; Qwen2-MoE calls the module `shared_expert`, DeepSeek-V3 `shared_experts`."""
    return (
        R(M + "mlp.shared_experts.linear_fc1.weight",
          (H + hf_prefix + ".gate_proj.weight", H + hf_prefix + ".up_proj.weight"), "gate_up", when="moe"),
        R(M + "mlp.shared_experts.linear_fc2.weight", H + hf_prefix + ".down_proj.weight", when="moe"),
    )


def all_dense(cfg) -> list[str]:
    return ["dense"] * cfg.num_hidden_layers


def qwen_moe_layers(cfg) -> list[str]:
    """transformers' Qwen2/3-MoE rule: a layer is sparse unless in mlp_only_layers, every decoder_sparse_step-th."""
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0)
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    only = set(getattr(cfg, "mlp_only_layers", None) or [])
    return ["moe" if (i not in only and n_exp > 0 and (i + 1) % step == 0) else "dense"
            for i in range(cfg.num_hidden_layers)]


def qwen_num_experts(cfg) -> int:
    # transformers 5 writes num_local_experts for Qwen3-MoE (cpu-lab.md)
    return getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0)


def prefixed(rules: tuple[Rule, ...], mcore: str, hf: str) -> tuple[Rule, ...]:
    """A text model's rows inside a multimodal model: every mcore name (all spellings) under `mcore`, the HF `model.`
    prefix replaced by `hf` (e.g. `language_model.` / `model.language_model.`)."""
    def m(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(mcore + n for n in names)

    def h(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(hf + n.removeprefix("model.") for n in names)

    return tuple(replace(r, mcore=m(r.mcore), hf=h(r.hf), alt=tuple(m(a) for a in r.alt),
                         local=m(r.local) if r.local else None) for r in rules)


def text_of(cfg):
    """A multimodal config's language-model part (transformers keeps it in `text_config`)."""
    return getattr(cfg, "text_config", None) or cfg


def vision_block(v: str, hv: str, rest: tuple) -> tuple:
    """A ViT block of mbridge's vision models (`{V}` = block): TE names fold the norms into linear_qkv / linear_fc1;
    the local ViT spec has no key map, so its norms keep mcore's own names. Norm biases only where HF has them."""
    a = "self_attention."
    return (
        R(v + a + "linear_qkv.layer_norm_weight", hv + "norm1.weight", local=v + "input_layernorm.weight"),
        R(v + a + "linear_qkv.weight", hv + "attn.qkv.weight", "vision_qkv"),
        R(v + a + "linear_qkv.bias", hv + "attn.qkv.bias", "vision_qkv"),
        R(v + a + "linear_proj.weight", hv + "attn.proj.weight"),
        R(v + a + "linear_proj.bias", hv + "attn.proj.bias"),
        R(v + "mlp.linear_fc1.layer_norm_weight", hv + "norm2.weight", local=v + "pre_mlp_layernorm.weight"),
        *rest,
    )
