"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE torch_dist checkpoints made at test time on CPU, with verl's Megatron
module tree.

- Qwen2.5-VL: mbridge's own `Qwen2_5VLModel` (PyPI mbridge 0.15.1), built the way its bridge's model provider
  builds it, with megatron-core's local specs instead of Transformer Engine's and a tiny vision config.
- Qwen3-VL: mbridge's Qwen3-VL model is not on PyPI (git only), so the same module tree is assembled from
  megatron-core's own modules under mbridge's names (`vision_model.{patch_embed,pos_embed,decoder,merger}`, the
  deepstack mergers in the vision decoder, a `language_model` GPTModel). Qwen3-VL-MoE (mbridge `Qwen3VLMoEBridge`)
  is the same tree with megatron-core's MoE layers (router + SequentialMLP experts; mbridge's TEGroupedMLP saves the
  same torch_dist keys).

Either is filled from a tiny HF model with this file's HF → mcore formulas (independent of hubexport) and saved with
`dist_checkpointing.save` in verl's v1 layout; a load job loads a checkpoint into the same model with
`dist_checkpointing.load` and reports what does not match. Nothing runs at import (see fixtures_mcore.py).
"""

from __future__ import annotations

import json
import sys
from copy import deepcopy
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
PADDED = 128  # vocabulary 100, padded by megatron (make_vocab_size_divisible_by)
IMAGE = 99  # image token id
TEXT = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, spatial_merge_size=2,
              temporal_patch_size=2)


def tiny_vl(kind: str, out: Path) -> Path:
    """A random tiny Qwen2.5-VL / Qwen3-VL saved with save_pretrained (the ground truth)."""
    import torch
    import transformers as tf

    mrope = {"mrope_section": [2, 3, 3]}
    if kind == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(text_config={**TEXT, "rope_scaling": {"type": "mrope", **mrope}},
                                  vision_config={**VISION, "patch_size": 14, "fullatt_block_indexes": [1],
                                                 "window_size": 112})
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif kind in ("qwen3_vl", "qwen3_vl_moe"):
        text = {**TEXT, "head_dim": 16, "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, **mrope}}
        vision = {**VISION, "patch_size": 16, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}
        moe = kind == "qwen3_vl_moe"
        if moe:  # I = 24 ≠ H = 64 (and 2I ≠ H): a transposed expert cannot pass for the right one
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
        cfg = (tf.Qwen3VLMoeConfig if moe else tf.Qwen3VLConfig)(text_config=text, vision_config=vision)
        cls = tf.Qwen3VLMoeForConditionalGeneration if moe else tf.Qwen3VLForConditionalGeneration
    else:
        raise ValueError(kind)
    # special tokens inside the tiny vocabulary, so an image can go through the model
    cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id = IMAGE, 98, 97, 96
    torch.manual_seed(1234)
    model = cls(cfg)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a swap shows
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------------------------
# HF → mcore formulas (mbridge's layouts); test-side code, independent of hubexport.mapping
# --------------------------------------------------------------------------------------------------------------------


def _vision_qkv(t, heads: int):
    """HF fused [q; k; v] → mcore per head [q_h; k_h; v_h] (mbridge: view(3, heads, d, ...).transpose(0, 1))."""
    return t.view(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _per_expert(sd: dict) -> dict:
    """transformers 5's fused experts (`mlp.experts.gate_up_proj` [E, 2I, H] = [gate; up] per expert, `down_proj`
    [E, H, I]) as the per-expert names fixtures_mcore's formulas read."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            for e, w in enumerate(v):
                gate, up = w.chunk(2)
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif k.endswith(".mlp.experts.down_proj"):
            out.update((k.replace("down_proj", f"{e}.down_proj.weight"), w) for e, w in enumerate(v))
        else:
            out[k] = v
    return out


def vl_to_mcore(sd: dict, cfg) -> dict:
    """mcore in-memory names (local specs) → tensors, for the whole VLM."""
    import torch

    from tests.fixtures_mcore import hf_to_mcore_global

    q3 = cfg.model_type in ("qwen3_vl", "qwen3_vl_moe")
    lm, vis = ("model.language_model.", "model.visual.") if q3 else ("model.", "visual.")
    text = _per_expert({"model." + k[len(lm):]: v for k, v in sd.items() if k.startswith(lm)})
    text["lm_head.weight"] = sd["lm_head.weight"]
    out = {"language_model." + k: v for k, v in hf_to_mcore_global(text, cfg.text_config, PADDED, False).items()}
    v, heads = cfg.vision_config, cfg.vision_config.num_heads
    for i in range(v.depth):
        h, m = f"{vis}blocks.{i}.", f"vision_model.decoder.layers.{i}."
        for w in ("weight", "bias") if q3 else ("weight",):
            out[m + f"input_layernorm.{w}"] = sd[h + f"norm1.{w}"]
            out[m + f"pre_mlp_layernorm.{w}"] = sd[h + f"norm2.{w}"]
        for w in ("weight", "bias"):
            out[m + f"self_attention.linear_qkv.{w}"] = _vision_qkv(sd[h + f"attn.qkv.{w}"], heads)
            out[m + f"self_attention.linear_proj.{w}"] = sd[h + f"attn.proj.{w}"]
            if q3:
                out[m + f"mlp.linear_fc1.{w}"] = sd[h + f"mlp.linear_fc1.{w}"]
                out[m + f"mlp.linear_fc2.{w}"] = sd[h + f"mlp.linear_fc2.{w}"]
            else:
                out[m + f"mlp.linear_fc1.{w}"] = torch.cat([sd[h + f"mlp.gate_proj.{w}"], sd[h + f"mlp.up_proj.{w}"]])
                out[m + f"mlp.linear_fc2.{w}"] = sd[h + f"mlp.down_proj.{w}"]
    if not q3:
        out["vision_model.patch_embed.proj.weight"] = sd["visual.patch_embed.proj.weight"]
        out["vision_model.decoder.final_layernorm.weight"] = sd["visual.merger.ln_q.weight"]
        for mc, hf in (("linear_fc1", "mlp.0"), ("linear_fc2", "mlp.2")):
            for w in ("weight", "bias"):
                out[f"vision_model.projection.encoder.{mc}.{w}"] = sd[f"visual.merger.{hf}.{w}"]
        return out
    for w in ("weight", "bias"):
        out[f"vision_model.patch_embed.proj.{w}"] = sd[f"{vis}patch_embed.proj.{w}"]
    out["vision_model.pos_embed.weight"] = sd[f"{vis}pos_embed.weight"]
    mergers = {"vision_model.merger.": f"{vis}merger."}
    mergers.update({f"vision_model.decoder.deepstack_merger_list.{j}.": f"{vis}deepstack_merger_list.{j}."
                    for j in range(len(v.deepstack_visual_indexes))})
    for mc, hf in mergers.items():
        for w in ("weight", "bias"):
            out[mc + f"patch_norm.{w}"] = sd[hf + f"norm.{w}"]
            out[mc + f"linear_fc1.{w}"] = sd[hf + f"linear_fc1.{w}"]
            out[mc + f"linear_fc2.{w}"] = sd[hf + f"linear_fc2.{w}"]
    return out


# --------------------------------------------------------------------------------------------------------------------
# torchrun side: the models
# --------------------------------------------------------------------------------------------------------------------


def _text_config(t, **kw):
    import torch
    import torch.nn.functional as F

    fields = dict(num_layers=t.num_hidden_layers, hidden_size=t.hidden_size, num_attention_heads=t.num_attention_heads,
                  num_query_groups=t.num_key_value_heads, ffn_hidden_size=t.intermediate_size,
                  kv_channels=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
                  layernorm_epsilon=t.rms_norm_eps)
    return dict(fields, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
                pipeline_dtype=torch.float32, bias_activation_fusion=False, masked_softmax_fusion=False,
                bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
                gradient_accumulation_fusion=False, **kw)


def _vision_sizes(vcfg, v) -> None:
    vcfg.num_layers, vcfg.hidden_size, vcfg.num_attention_heads = v.depth, v.hidden_size, v.num_heads
    vcfg.kv_channels, vcfg.num_query_groups = v.hidden_size // v.num_heads, v.num_heads
    vcfg.ffn_hidden_size, vcfg.patch_size = v.intermediate_size, v.patch_size
    vcfg.pipeline_model_parallel_size, vcfg.first_pipeline_num_layers = 1, None


def build_qwen2_5_vl(cfg):
    """mbridge's Qwen2_5VLModel as its bridge's provider builds it; local specs, tiny vision sizes."""
    from mbridge.models.qwen2_5_vl.model import Qwen2_5VLModel
    from mbridge.models.qwen2_5_vl.transformer_config import (
        Qwen2VLTransformerConfig,
        get_vision_model_config,
        get_vision_projection_config,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.moe_module_specs import MLPSubmodules
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    t, v = cfg.text_config, cfg.vision_config
    tcfg = Qwen2VLTransformerConfig(**_text_config(t, add_qkv_bias=True, transformer_impl="local",
                                                   variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
                                                   mrope_section=t.rope_parameters["mrope_section"]))
    vcfg = get_vision_model_config(deepcopy(tcfg))  # mbridge hard-codes the 7B tower's sizes: make them tiny
    _vision_sizes(vcfg, v)
    vcfg.fullatt_block_indexes, vcfg._qwen2_5_vl_window_size = v.fullatt_block_indexes, v.window_size
    pcfg = get_vision_projection_config(deepcopy(tcfg), vcfg.hidden_size, spatial_merge_size=v.spatial_merge_size)
    return Qwen2_5VLModel(
        language_transformer_config=tcfg,
        language_transformer_layer_spec=get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False,
                                                                   normalization="RMSNorm"),
        language_vocab_size=PADDED, language_max_sequence_length=t.max_position_embeddings,
        vision_transformer_config=vcfg, vision_transformer_layer_spec=get_vit_layer_with_local_spec(),
        vision_projection_config=pcfg,
        vision_projection_layer_spec=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        vision_projection_type="mlp", language_rotary_base=int(t.rope_parameters["rope_theta"]), parallel_output=False,
        language_share_embeddings_and_output_weights=False)


def build_qwen3_vl(cfg):
    """Qwen3-VL's module tree as mbridge's Qwen3VLModel has it, from megatron-core modules; MoE layers (local spec:
    router + SequentialMLP) when the text config has experts (Qwen3-VL-MoE)."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import MegatronModule, TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlock

    from tests.fixtures_mcore import moe_fields

    t, v = cfg.text_config, cfg.vision_config
    tcfg = TransformerConfig(**_text_config(t, qk_layernorm=True, **moe_fields(t)))
    vcfg = deepcopy(tcfg)  # mbridge derives the vision config from the language one
    _vision_sizes(vcfg, v)
    vcfg.num_moe_experts = None
    vcfg.normalization, vcfg.gated_linear_unit, vcfg.add_bias_linear, vcfg.add_qkv_bias = "LayerNorm", False, True, True
    vcfg.qk_layernorm = False

    class Merger(MegatronModule):  # mbridge utils.Qwen3VLVisionPatchMerger: patch_norm, linear_fc1, linear_fc2
        def __init__(self, postshuffle: bool):
            super().__init__(config=vcfg)
            merged = v.hidden_size * v.spatial_merge_size ** 2
            self.patch_norm = torch.nn.LayerNorm(merged if postshuffle else v.hidden_size)
            self.linear_fc1 = ColumnParallelLinear(merged, merged, config=vcfg, init_method=vcfg.init_method,
                                                   bias=True, gather_output=True)
            self.linear_fc2 = RowParallelLinear(merged, v.out_hidden_size, config=vcfg,
                                                init_method=vcfg.init_method, bias=True, input_is_parallel=True,
                                                skip_bias_add=False)

    class PatchEmbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            k = (v.temporal_patch_size, v.patch_size, v.patch_size)
            self.proj = torch.nn.Conv3d(v.in_channels, v.hidden_size, kernel_size=k, stride=k, bias=True)

    class VisionDecoder(TransformerBlock):  # mbridge keeps the deepstack mergers in the vision decoder
        def __init__(self):
            super().__init__(vcfg, get_vit_layer_with_local_spec(), post_layer_norm=False)
            self.deepstack_merger_list = torch.nn.ModuleList(Merger(True) for _ in v.deepstack_visual_indexes)

    class Vision(MegatronModule):
        def __init__(self):
            super().__init__(config=vcfg)
            self.patch_embed = PatchEmbed()
            self.pos_embed = torch.nn.Embedding(v.num_position_embeddings, v.hidden_size)
            self.decoder = VisionDecoder()
            self.merger = Merger(False)

    class Qwen3VL(MegatronModule):
        def __init__(self):
            super().__init__(config=tcfg)
            self.vision_model = Vision()
            spec = get_gpt_layer_local_spec(num_experts=tcfg.num_moe_experts, qk_layernorm=True,
                                            normalization="RMSNorm")
            self.language_model = GPTModel(tcfg, spec,
                                           vocab_size=PADDED, max_sequence_length=t.max_position_embeddings,
                                           position_embedding_type="rope",
                                           rotary_base=int(t.rope_parameters["rope_theta"]))

    return Qwen3VL()


def _build(cfg):
    return build_qwen2_5_vl(cfg) if cfg.model_type == "qwen2_5_vl" else build_qwen3_vl(cfg)


def _state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if "_extra_state" not in k and v is not None}


def _run_save(job: dict) -> None:
    import safetensors.torch
    import torch
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(job["hf"])
    model = _build(cfg)
    want = vl_to_mcore(safetensors.torch.load_file(str(Path(job["hf"]) / "model.safetensors")), cfg)
    state = _state(model)
    assert sorted(state) == sorted(want), (sorted(set(state) - set(want))[:5], sorted(set(want) - set(state))[:5])
    with torch.no_grad():
        for name, t in state.items():
            assert t.shape == want[name].shape, (name, t.shape, want[name].shape)
            t.copy_(want[name])
    root = Path(job["out"])
    (root / "dist_ckpt").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "lr_scheduler": {"num_steps": 3}},
                            str(root / "dist_ckpt"))
    (root / "huggingface").mkdir(exist_ok=True)
    (root / "huggingface" / "config.json").write_text((Path(job["hf"]) / "config.json").read_text())


def _run_load(job: dict) -> None:
    """Load `ckpt` into the model (default strictness, as verl does) and report mismatches against the HF formulas."""
    import safetensors.torch
    import torch
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(job["hf"])
    model = _build(cfg)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), job["ckpt"]))
    want = vl_to_mcore(safetensors.torch.load_file(str(Path(job["hf"]) / "model.safetensors")), cfg)
    differ = sorted(k for k, t in _state(model).items() if not torch.equal(t, want[k]))
    _, ckpt_only, model_only = dist_checkpointing.load(model.sharded_state_dict(), job["ckpt"], strict="return_all")
    Path(job["out"]).write_text(json.dumps({"differ": differ, "checkpoint_only": sorted(ckpt_only),
                                            "model_only": sorted(model_only), "loaded": len(_state(model))}))


def _main() -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(HERE.parents[1]))
    from tests.fixtures_mcore import _patch_cpu

    jobs = json.loads(sys.argv[sys.argv.index("--jobs") + 1])
    _patch_cpu()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    for job in jobs:
        _run_load(job) if job.get("ckpt") else _run_save(job)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------------------------------

KINDS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def run_vl_jobs(jobs: list[dict]) -> None:
    from tests.fixtures_mcore import run_torchrun

    run_torchrun(1, jobs, script=HERE)


@pytest.fixture(scope="session")
def vl_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind → (HF reference folder, verl actor directory with dist_ckpt/ and huggingface/), one torchrun for all."""
    root = tmp_path_factory.mktemp("vl")
    out = {k: (tiny_vl(k, root / f"hf_{k}"), root / k / "global_step_2" / "actor") for k in KINDS}
    run_vl_jobs([{"hf": str(hf), "out": str(actor)} for hf, actor in out.values()])
    return out


if __name__ == "__main__":
    _main()
