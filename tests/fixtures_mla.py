"""A real megatron-core GPTModel with DeepSeek-V3's multi-latent attention, MoE (sigmoid router, expert bias,
group-limited top-k, shared experts) and MTP, built on CPU, loading checkpoints written by `hubexport to-megatron`.

Torchrun side (`python -m torch.distributed.run --nproc_per_node 1 tests/fixtures_mla.py --jobs JSON`): build the
model from the HF config, `dist_checkpointing.load(model.sharded_state_dict(), ckpt)` strictly, run the forward and
save the main logits, the MTP block's logits and the loaded MTP tensors. Pytest side: tiny DeepSeek-V3 folders the
way the Hub publishes them (HF-style MTP layer `model.layers.{L}.*`, FP8 block-quantized weights).

CPU workaround (cpu-lab.md): megatron-core 0.16.1's local MLA spec puts `DotProductAttention` in the
`core_attention` slot, but MLA passes it `k_channels`/`v_channels` (q/k head dim ≠ v head dim), which only TE's
attention accepts. `MlaDotProductAttention` is megatron's own DotProductAttention taking them: a layer-spec choice like
TE vs local; megatron still builds and runs every module, and the logits comparison with transformers proves it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------------------------------------------------
# torchrun side
# --------------------------------------------------------------------------------------------------------------------


def mla_core_attention():
    """megatron's unfused DotProductAttention with MLA's head dims: scores use q/k's dim (softmax_scale comes from
    MLA), the context has v's dim. Its forward already handles k ≠ v; only its output width assumes kv_channels.
    (megatron's Attention base class first builds the slot without them; MLA then rebuilds it with them.)"""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MlaDotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return MlaDotProductAttention


def patch_mla_cpu() -> None:
    """Without Transformer Engine, megatron's TE extension imports against a MagicMock, so multi_latent_attention
    believes TE is there and its `isinstance(linear_proj, TELinear)` fails: tell it the truth."""
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False


def mla_config(cfg):
    """MLATransformerConfig of an HF DeepseekV3Config, fusions off for CPU; experts as SequentialMLP."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    rope = dict(cfg.rope_parameters)
    yarn = rope.get("rope_type") == "yarn"
    n, k = cfg.num_hidden_layers, cfg.first_k_dense_replace
    extra = dict(rotary_scaling_factor=rope["factor"], mscale=rope.get("mscale", 1.0),
                 mscale_all_dim=rope.get("mscale_all_dim", 0.0), beta_fast=rope.get("beta_fast", 32),
                 beta_slow=rope.get("beta_slow", 1),
                 original_max_position_embeddings=rope["original_max_position_embeddings"]) if yarn else \
        dict(rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    return MLATransformerConfig(
        num_layers=n, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size, normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, qk_layernorm=True,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_type="yarn" if yarn else "rope", rotary_base=rope["rope_theta"], **extra,
        num_moe_experts=cfg.n_routed_experts, moe_layer_freq=[0] * k + [1] * (n - k),
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=cfg.n_shared_experts * cfg.moe_intermediate_size,
        moe_router_topk=cfg.num_experts_per_tok, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=cfg.n_group, moe_router_group_topk=cfg.topk_group,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor, moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, moe_aux_loss_coeff=0.0,
        mtp_num_layers=getattr(cfg, "num_nextn_predict_layers", 0) or None,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
    )


def build_mla_model(cfg):
    """GPTModel: megatron's decoder block spec (dense and MoE layers from moe_layer_freq, local modules) with the MLA
    core attention above, and megatron's MTP block spec on its last layer."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    tcfg = mla_config(cfg)
    block = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False, normalization="RMSNorm")
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = mla_core_attention()
    mtp = get_gpt_mtp_block_spec(tcfg, block, use_transformer_engine=False) if tcfg.mtp_num_layers else None
    padded = -(-cfg.vocab_size // 128) * 128
    return GPTModel(tcfg, block, vocab_size=padded, max_sequence_length=cfg.max_position_embeddings,
                    parallel_output=False, share_embeddings_and_output_weights=False, position_embedding_type="none",
                    mtp_block_spec=mtp)


def _run_load(job: dict) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(job["hf"])
    model = build_mla_model(cfg)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), job["ckpt"], strict="raise_all"))
    model.eval()
    ids = torch.tensor(json.loads(job["ids"]))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1]), diagonal=1).bool()[None, None]
    calls: list[torch.Tensor] = []  # output_layer runs once per MTP layer, then for the main logits
    model.output_layer.register_forward_hook(lambda m, a, out: calls.append(out[0].transpose(0, 1).clone()))
    with torch.no_grad():
        model(ids, pos, attention_mask=mask, labels=ids)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    v = cfg.vocab_size
    torch.save({"main": calls[-1][..., :v], "mtp": [c[..., :v] for c in calls[:-1]],
                "state": {k: t.clone() for k, t in model.state_dict().items()
                          if k.startswith("mtp.") and "_extra_state" not in k and t is not None}}, out / "result.pt")
    if job.get("save"):  # the model's own torch_dist save, as a training run leaves it (verl's v1 layout)
        (out / "actor" / "dist_ckpt").mkdir(parents=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(out / "actor" / "dist_ckpt"))
        (out / "actor" / "huggingface").mkdir()
        (out / "actor" / "huggingface" / "config.json").write_text((Path(job["hf"]) / "config.json").read_text())


def _main() -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(HERE.parents[1]))
    from tests.fixtures_mcore import _patch_cpu

    jobs = json.loads(sys.argv[sys.argv.index("--jobs") + 1])
    _patch_cpu()
    patch_mla_cpu()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    for job in jobs:
        _run_load(job)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------------------------------

MAIN_LAYERS = 3  # a dense layer, two MoE layers; the MTP block is HF layer 3 (DeepSeek-V3's layer 61)


def tiny_deepseek_mtp(out: Path, **overrides) -> Path:
    """tiny_hf's DeepSeek-V3 (random, save_pretrained) with its MTP block added the way the published checkpoint
    stores it: HF layer L = a full MoE decoder layer (a model with L + 1 layers saved it) plus `enorm`, `hnorm`,
    `eh_proj`, `shared_head.norm` and copies of the embedding (`embed_tokens`) and the output head
    (`shared_head.head`); config.json says num_hidden_layers=L, num_nextn_predict_layers=1."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.fixtures_mcore import tiny_hf

    tiny_hf("deepseek_v3", out, num_hidden_layers=MAIN_LAYERS + 1, intermediate_size=200, **overrides)
    sd = load_file(out / "model.safetensors")
    hid, h = sd["model.norm.weight"].shape[0], f"model.layers.{MAIN_LAYERS}."
    g = torch.Generator().manual_seed(61)
    sd.update({h + "enorm.weight": torch.rand(hid, generator=g) + 0.5,
               h + "hnorm.weight": torch.rand(hid, generator=g) + 1.5,
               h + "eh_proj.weight": torch.randn(hid, 2 * hid, generator=g) * 0.1,
               h + "shared_head.norm.weight": torch.rand(hid, generator=g) + 0.5,
               h + "embed_tokens.weight": sd["model.embed_tokens.weight"].clone(),
               h + "shared_head.head.weight": sd["lm_head.weight"].clone()})
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.update(num_hidden_layers=MAIN_LAYERS, num_nextn_predict_layers=1)
    config.pop("num_mtp_layers", None)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def fp8_quantized(src: Path, out: Path) -> Path:
    """`src` as DeepSeek-V3 is published: the decoder's (and MTP block's) linear weights float8_e4m3fn with a
    float32 `weight_scale_inv` per 128x128 block (ragged edge blocks), quantization_config in config.json."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tests.test_quantized import FP8_CONFIG, quantize

    shutil.copytree(src, out)
    sd, q = load_file(src / "model.safetensors"), {}
    for name, t in sd.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight") and t.dim() == 2:
            q[name], q[name + "_scale_inv"] = quantize(t)
        else:
            q[name] = t
    save_file(q, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_CONFIG}, indent=1))
    return out


def dequantized_reference(fp8: Path, out: Path) -> Path:
    """What the FP8 folder means: every weight dequantized by DeepSeek's formula into float32, config unquantized."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tests.test_quantized import reference

    shutil.copytree(fp8, out)
    sd = load_file(fp8 / "model.safetensors")
    plain = {n: reference(t, sd[n + "_scale_inv"], torch.float32) if t.dtype == torch.float8_e4m3fn else t
             for n, t in sd.items() if not n.endswith("_scale_inv")}
    save_file(plain, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def load_in_gptmodel(jobs: list[dict]) -> None:
    """Each job {hf, ckpt, out}: the GPTModel built from `hf`'s config loads `ckpt`; results in `out/result.pt`."""
    from tests.fixtures_mcore import IDS, run_torchrun

    run_torchrun(1, [dict(job, ids=json.dumps(IDS)) for job in jobs], script=HERE)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # DeepSeek-V3's kind of rope


@dataclass(frozen=True)
class MlaCase:
    hf: Path  # what to-megatron read
    reference: Path  # the HF model the GPTModel's logits must equal (the dequantized one for FP8)
    ckpt: Path  # to-megatron's output (local spec)
    loaded: Path  # the GPTModel's results: result.pt (and actor/, its own save, where asked)
    notes: list[str]


@pytest.fixture(scope="session")
def mla_cases(tmp_path_factory) -> dict[str, MlaCase]:
    """DeepSeek-V3 as published (yarn rope, q_lora_rank, MTP layer), the same without q_lora_rank (default rope),
    and the first FP8 block-quantized; each converted by hubexport to-megatron and loaded in a real GPTModel (one
    torchrun). The first model also saves its own checkpoint, for the merge direction."""
    from hubexport.executor import to_megatron
    from hubexport.options import MegatronOptions, Output

    root = tmp_path_factory.mktemp("mla")
    mtp = tiny_deepseek_mtp(root / "hf_mtp", rope_parameters=YARN)
    fp8 = fp8_quantized(mtp, root / "hf_fp8")
    no_q = tiny_deepseek_mtp(root / "hf_no_q", q_lora_rank=None)
    sources = {"mtp": (mtp, mtp, None), "no_q_lora": (no_q, no_q, None),
               "fp8": (fp8, dequantized_reference(fp8, root / "hf_fp8_ref"), "fp32")}
    cases, jobs = {}, []
    for name, (hf, ref, dtype) in sources.items():
        notes: list[str] = []
        to_megatron(hf, Output(root / f"ckpt_{name}"), MegatronOptions(spec="local", test=True, dtype=dtype),
                    log=notes.append)
        cases[name] = MlaCase(hf, ref, root / f"ckpt_{name}", root / f"loaded_{name}", notes)
        jobs.append(dict(hf=str(hf), ckpt=str(cases[name].ckpt), out=str(cases[name].loaded), save=name == "mtp"))
    load_in_gptmodel(jobs)
    return cases


if __name__ == "__main__":
    _main()
