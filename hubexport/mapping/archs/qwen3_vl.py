"""Qwen3-VL as mbridge builds it (`Qwen3VLBridge`): the Qwen3 language model under `language_model.` (HF
`model.language_model.`), a ViT under `vision_model.` (LayerNorm with biases, per-head fused qkv, plain MLP, a learned
position embedding), the merger and the deepstack mergers (`{D}`, one per `deepstack_visual_indexes` entry; mbridge
keeps them in the vision decoder)."""

from hubexport.mapping.archs import qwen3
from hubexport.mapping.archs._parts import all_dense, prefixed, text_of, vision_block
from hubexport.mapping.registry import Arch, R

V, HV = "vision_model.decoder.layers.{V}.", "model.visual.blocks.{V}."
BLOCK = (  # LayerNorm biases, plain (ungated) MLP
    R(V + "self_attention.linear_qkv.layer_norm_bias", HV + "norm1.bias", local=V + "input_layernorm.bias"),
    R(V + "mlp.linear_fc1.layer_norm_bias", HV + "norm2.bias", local=V + "pre_mlp_layernorm.bias"),
    *(R(V + f"mlp.linear_fc{i}.{w}", HV + f"mlp.linear_fc{i}.{w}") for i in (1, 2) for w in ("weight", "bias")),
)


def merger(mcore: str, hf: str) -> tuple:
    return (
        R(mcore + "patch_norm.weight", hf + "norm.weight"),
        R(mcore + "patch_norm.bias", hf + "norm.bias"),
        *(R(mcore + f"linear_fc{i}.{w}", hf + f"linear_fc{i}.{w}") for i in (1, 2) for w in ("weight", "bias")),
    )


VISION = (
    R("vision_model.patch_embed.proj.weight", "model.visual.patch_embed.proj.weight"),
    R("vision_model.patch_embed.proj.bias", "model.visual.patch_embed.proj.bias"),
    R("vision_model.pos_embed.weight", "model.visual.pos_embed.weight"),
    *vision_block(V, HV, BLOCK),
    *merger("vision_model.merger.", "model.visual.merger."),
    *merger("vision_model.decoder.deepstack_merger_list.{D}.", "model.visual.deepstack_merger_list.{D}."),
)


def counts(cfg) -> dict[str, int]:
    return {"V": cfg.vision_config.depth, "D": len(cfg.vision_config.deepstack_visual_indexes)}


ARCH = Arch(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    causal_lm="Qwen3VLForConditionalGeneration",
    rules=(*prefixed(qwen3.ARCH.rules, "language_model.", "model.language_model."), *VISION),
    layer_kinds=all_dense,
    text_config=text_of,
    lm_prefix="language_model.",
    hf_embed="model.language_model.embed_tokens.weight",
    counts=counts,
    other_stacks=lambda cfg: {"vision_model.decoder.layers": cfg.vision_config.depth},
)
