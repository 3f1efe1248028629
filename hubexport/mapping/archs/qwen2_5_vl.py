"""Qwen2.5-VL as mbridge builds it (`Qwen2_5VLBridge`): the Qwen2 language model under `language_model.` (HF:
save_pretrained's legacy `model.` names), a ViT under `vision_model.` (RMSNorm, per-head fused qkv with biases, gated
MLP with biases; HF `visual.blocks.V`), its final norm as the merger's `ln_q` and the merger MLP as the projection."""

from hubexport.mapping.archs import qwen2
from hubexport.mapping.archs._parts import all_dense, prefixed, text_of, vision_block
from hubexport.mapping.registry import Arch, R

V, HV = "vision_model.decoder.layers.{V}.", "visual.blocks.{V}."
MLP = (
    R(V + "mlp.linear_fc1.weight", (HV + "mlp.gate_proj.weight", HV + "mlp.up_proj.weight"), "gate_up"),
    R(V + "mlp.linear_fc1.bias", (HV + "mlp.gate_proj.bias", HV + "mlp.up_proj.bias"), "gate_up"),
    R(V + "mlp.linear_fc2.weight", HV + "mlp.down_proj.weight"),
    R(V + "mlp.linear_fc2.bias", HV + "mlp.down_proj.bias"),
)
P = "vision_model.projection.encoder."
VISION = (
    R("vision_model.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
    *vision_block(V, HV, MLP),
    R("vision_model.decoder.final_layernorm.weight", "visual.merger.ln_q.weight"),
    R(P + "linear_fc1.weight", "visual.merger.mlp.0.weight"),
    R(P + "linear_fc1.bias", "visual.merger.mlp.0.bias"),
    R(P + "linear_fc2.weight", "visual.merger.mlp.2.weight"),
    R(P + "linear_fc2.bias", "visual.merger.mlp.2.bias"),
)

ARCH = Arch(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    causal_lm="Qwen2_5_VLForConditionalGeneration",
    rules=(*prefixed(qwen2.ARCH.rules, "language_model.", "model."), *VISION),
    layer_kinds=all_dense,
    text_config=text_of,
    lm_prefix="language_model.",
    counts=lambda cfg: {"V": cfg.vision_config.depth},
    other_stacks=lambda cfg: {"vision_model.decoder.layers": cfg.vision_config.depth},
)
