"""Qwen3-VL-MoE as mbridge builds it (`Qwen3VLMoEBridge`): Qwen3-VL's vision tower, merger and deepstack mergers,
and the Qwen3-MoE language model under `language_model.` (HF `model.language_model.`), whose experts HF holds fused,
one tensor per layer (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, no `.weight`).

Those tensors come in two layouts. transformers 5 holds, and its save_pretrained writes, [E, 2I, H] / [E, H, I];
the published checkpoints (Qwen/Qwen3-VL-30B-A3B-Instruct: [128, 2048, 1536] / [128, 768, 2048]), and mbridge's
converter, use [E, H, 2I] / [E, I, H], which transformers transposes when it loads them. HF → Megatron reads
either, decided per layer from the pair of shapes: gate_up alone cannot tell them apart when H = 2I, nor down when
H = I, but the two cannot both hold, so the pair always can. Megatron → HF writes save_pretrained's layout."""

from dataclasses import replace

from hubexport.errors import MappingError
from hubexport.mapping.archs import qwen3_moe, qwen3_vl
from hubexport.mapping.archs._parts import FUSED_EXPERTS, prefixed, qwen_moe_layers, qwen_num_experts, text_of

LM = "model.language_model."


def experts_transposed(shapes: dict[str, tuple[int, ...]], cfg) -> bool:
    """True when the folder's fused experts are the published [E, H, 2I] / [E, I, H]; every layer must agree."""
    text = text_of(cfg)
    e, h, i = qwen_num_experts(text), text.hidden_size, text.moe_intermediate_size
    saved, published = ((e, 2 * i, h), (e, h, i)), ((e, h, 2 * i), (e, i, h))
    found: dict[bool, str] = {}
    for layer, kind in enumerate(qwen_moe_layers(text)):
        p = f"{LM}layers.{layer}.mlp.experts."
        pair = tuple(tuple(shapes[p + n]) if p + n in shapes else None for n in ("gate_up_proj", "down_proj"))
        if kind != "moe" or None in pair:
            continue  # a missing tensor is the coverage check's to name
        if pair not in (saved, published):
            raise MappingError(
                f"{p}gate_up_proj {list(pair[0])} and down_proj {list(pair[1])} are neither save_pretrained's "
                f"{list(saved[0])} / {list(saved[1])} nor the published {list(published[0])} / {list(published[1])}",
                hint="config.json (hidden_size, moe_intermediate_size, num_experts) does not match the weights")
        found.setdefault(pair == published, p)
    if len(found) > 1:
        raise MappingError(f"{found[True]}* is in the published layout but {found[False]}* in save_pretrained's",
                           hint="re-save the model with one transformers version (save_pretrained)")
    return True in found


ARCH = replace(
    qwen3_vl.ARCH,
    name="qwen3_vl_moe",
    model_types=("qwen3_vl_moe",),
    causal_lm="Qwen3VLMoeForConditionalGeneration",
    rules=(*prefixed((*qwen3_moe.BUT_EXPERTS, *FUSED_EXPERTS), "language_model.", LM), *qwen3_vl.VISION),
    layer_kinds=qwen_moe_layers,
    num_experts=qwen_num_experts,
    experts_transposed=experts_transposed,
)
