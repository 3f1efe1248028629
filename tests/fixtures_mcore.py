"""Real megatron-core torch_dist checkpoints, made at test time on CPU by megatron-core itself.

Two halves:
- a torchrun script (`python -m torch.distributed.run --nproc_per_node N tests/fixtures_mcore.py --job JSON`): builds a
  tiny `GPTModel` (local spec) with the asked TP/PP/EP, fills it from a tiny HF model with this file's own HF → mcore
  formulas (written from the formats doc, independent of hubexport), runs its forward where that works on CPU, and
  saves `dist_checkpointing.save(...)` in a verl layout (v1, v2, and v0 `mp_rank_*` files);
- session-scoped pytest fixtures that build each checkpoint once per test session.

Nothing runs at import: megatron's async writer re-imports `__main__` in a spawned process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["McoreCase", "mcore_hf_models", "mcore_moe_ep2", "mcore_pp2", "mcore_root", "mcore_synthetic",
           "mcore_tp1", "mcore_tp2", "mcore_tp2pp2", "tiny_hf"]

HERE = Path(__file__).resolve()
VOCAB = 100  # padded to 128 by megatron (make_vocab_size_divisible_by), trimmed back on export


# --------------------------------------------------------------------------------------------------------------------
# HF → mcore formulas (formats doc §2.3, §2.4, §2.6); test-side code, independent of hubexport.mapping
# --------------------------------------------------------------------------------------------------------------------


def hf_to_mcore_global(sd: dict, cfg, padded_vocab: int, value: bool) -> dict:
    """Global (unsharded) mcore in-memory state dict, local-spec names, global layer and expert numbers."""
    import torch

    nq, ng = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // nq
    p = nq // ng
    hidden = cfg.hidden_size

    def pad(w):
        out = torch.zeros(padded_vocab, w.shape[1], dtype=w.dtype)
        out[: w.shape[0]] = w
        return out

    out = {"embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"])}
    for i in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = sd[h + "input_layernorm.weight"]
        q = sd[h + "self_attn.q_proj.weight"].view(ng, p * d, hidden)
        k = sd[h + "self_attn.k_proj.weight"].view(ng, d, hidden)
        v = sd[h + "self_attn.v_proj.weight"].view(ng, d, hidden)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        if h + "self_attn.q_proj.bias" in sd:
            qb = sd[h + "self_attn.q_proj.bias"].view(ng, p * d)
            kb = sd[h + "self_attn.k_proj.bias"].view(ng, d)
            vb = sd[h + "self_attn.v_proj.bias"].view(ng, d)
            out[m + "self_attention.linear_qkv.bias"] = torch.cat([qb, kb, vb], dim=1).reshape(-1)
        if h + "self_attn.q_norm.weight" in sd:
            out[m + "self_attention.q_layernorm.weight"] = sd[h + "self_attn.q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = sd[h + "self_attn.k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[h + "post_attention_layernorm.weight"]
        if h + "mlp.gate.weight" in sd:  # MoE (HF save_pretrained per-expert names)
            out[m + "mlp.router.weight"] = sd[h + "mlp.gate.weight"]
            e = 0
            while f"{h}mlp.experts.{e}.gate_proj.weight" in sd:
                x = f"{h}mlp.experts.{e}."
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.cat(
                    [sd[x + "gate_proj.weight"], sd[x + "up_proj.weight"]]
                )
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = sd[x + "down_proj.weight"]
                e += 1
            if h + "mlp.shared_expert.gate_proj.weight" in sd:
                x = h + "mlp.shared_expert."
                out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                    [sd[x + "gate_proj.weight"], sd[x + "up_proj.weight"]]
                )
                out[m + "mlp.shared_experts.linear_fc2.weight"] = sd[x + "down_proj.weight"]
                out[m + "mlp.shared_experts.gate_weight"] = sd[h + "mlp.shared_expert_gate.weight"]
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
            out[m + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if value:
        out["output_layer.weight"] = sd["score.weight"]
    elif not cfg.tie_word_embeddings:
        out["output_layer.weight"] = pad(sd["lm_head.weight"])
    else:  # tied with PP > 1: the last stage holds a copy of the embedding
        out["output_layer.weight"] = out["embedding.word_embeddings.weight"]
    return out


def synthetic_mcore(sd: dict, cfg, padded_vocab: int) -> dict:
    """DCP key → global tensor for checkpoints the CPU model cannot write, by the formats doc's formulas:
    DeepSeek-V3 (TE-spec MLA names, per-layer keys, grouped experts with an expert axis) and Mixtral (stacked keys,
    local-spec norm names, stacked experts)."""
    import torch

    def pad(w):
        out = torch.zeros(padded_vocab, w.shape[1], dtype=w.dtype)
        out[: w.shape[0]] = w
        return out

    out = {"embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": sd["model.norm.weight"],
           "output_layer.weight": pad(sd["lm_head.weight"])}
    n = cfg.num_hidden_layers
    if cfg.model_type == "deepseek_v3":
        for i in range(n):
            h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            a = h + "self_attn."
            out.update({
                m + "input_layernorm.weight": sd[h + "input_layernorm.weight"],
                m + "self_attention.linear_q_down_proj.weight": sd[a + "q_a_proj.weight"],
                m + "self_attention.linear_q_up_proj.layer_norm_weight": sd[a + "q_a_layernorm.weight"],
                m + "self_attention.linear_q_up_proj.weight": sd[a + "q_b_proj.weight"],
                m + "self_attention.linear_kv_down_proj.weight": sd[a + "kv_a_proj_with_mqa.weight"],
                m + "self_attention.linear_kv_up_proj.layer_norm_weight": sd[a + "kv_a_layernorm.weight"],
                m + "self_attention.linear_kv_up_proj.weight": sd[a + "kv_b_proj.weight"],
                m + "self_attention.linear_proj.weight": sd[a + "o_proj.weight"],
            })
            if i < cfg.first_k_dense_replace:
                out[m + "mlp.linear_fc1.layer_norm_weight"] = sd[h + "post_attention_layernorm.weight"]
                out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[h + "mlp.gate_proj.weight"],
                                                             sd[h + "mlp.up_proj.weight"]])
                out[m + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"]
                continue
            e = cfg.n_routed_experts
            x = h + "mlp.experts."
            out.update({
                m + "pre_mlp_layernorm.weight": sd[h + "post_attention_layernorm.weight"],
                m + "mlp.router.weight": sd[h + "mlp.gate.weight"],
                m + "mlp.router.expert_bias": sd[h + "mlp.gate.e_score_correction_bias"],
                m + "mlp.experts.experts.linear_fc1.weight": torch.stack(
                    [torch.cat([sd[f"{x}{j}.gate_proj.weight"], sd[f"{x}{j}.up_proj.weight"]]) for j in range(e)]),
                m + "mlp.experts.experts.linear_fc2.weight": torch.stack(
                    [sd[f"{x}{j}.down_proj.weight"] for j in range(e)]),
                m + "mlp.shared_experts.linear_fc1.weight": torch.cat(
                    [sd[h + "mlp.shared_experts.gate_proj.weight"], sd[h + "mlp.shared_experts.up_proj.weight"]]),
                m + "mlp.shared_experts.linear_fc2.weight": sd[h + "mlp.shared_experts.down_proj.weight"],
            })
        return out
    if cfg.model_type == "mixtral":
        nq, ng, hid = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
        d = getattr(cfg, "head_dim", None) or hid // nq
        L = [f"model.layers.{i}." for i in range(n)]
        b = [f"model.layers.{i}.block_sparse_moe." for i in range(n)]
        e = cfg.num_local_experts
        qkv = [torch.cat([sd[h + "self_attn.q_proj.weight"].view(ng, -1, hid),
                          sd[h + "self_attn.k_proj.weight"].view(ng, d, hid),
                          sd[h + "self_attn.v_proj.weight"].view(ng, d, hid)], dim=1).reshape(-1, hid) for h in L]
        out.update({
            "decoder.layers.input_layernorm.weight": torch.stack([sd[h + "input_layernorm.weight"] for h in L]),
            "decoder.layers.self_attention.linear_qkv.weight": torch.stack(qkv),
            "decoder.layers.self_attention.linear_proj.weight": torch.stack([sd[h + "self_attn.o_proj.weight"]
                                                                            for h in L]),
            "decoder.layers.pre_mlp_layernorm.weight": torch.stack([sd[h + "post_attention_layernorm.weight"]
                                                                   for h in L]),
            "decoder.layers.mlp.router.weight": torch.stack([sd[x + "gate.weight"] for x in b]),
            "decoder.layers.mlp.experts.experts.linear_fc1.weight": torch.stack([torch.stack(
                [torch.cat([sd[f"{x}experts.{j}.w1.weight"], sd[f"{x}experts.{j}.w3.weight"]]) for j in range(e)])
                for x in b]),
            "decoder.layers.mlp.experts.experts.linear_fc2.weight": torch.stack([torch.stack(
                [sd[f"{x}experts.{j}.w2.weight"] for j in range(e)]) for x in b]),
        })
        return out
    raise ValueError(cfg.model_type)


def _sharded(key: str, full, n_prepend: int, split_axis: int | None):
    """ShardedTensors for one key: one per index of the prepended (layer/expert) axes, and the data split in two
    along `split_axis` like a TP=2 save would, all held by this one rank."""
    import itertools

    from megatron.core.dist_checkpointing import ShardedTensor

    out = []
    lead = full.shape[:n_prepend]
    for idx in itertools.product(*(range(s) for s in lead)):
        data = full[idx] if idx else full
        parts = data.chunk(2, dim=split_axis) if split_axis is not None and data.shape[split_axis] % 2 == 0 \
            else [data]
        for r, part in enumerate(parts):
            offs = [(a, i, lead[a]) for a, i in enumerate(idx)]
            if len(parts) > 1:
                offs.append((n_prepend + split_axis, r, len(parts)))
            out.append(ShardedTensor.from_rank_offsets(key, part.contiguous().clone(), *offs,
                                                       prepend_axis_num=n_prepend))
    return out


def _run_synthetic(job: dict) -> None:
    import safetensors.torch
    import torch
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(job["hf"])
    sd = safetensors.torch.load_file(str(Path(job["hf"]) / "model.safetensors"))
    tensors = synthetic_mcore(sd, cfg, 128)
    root = Path(job["out"])
    expected_mtp = {}
    if job.get("mtp"):  # an MTP block: its transformer layer is a copy of the last layer, its norms/proj random
        last, n = cfg.num_hidden_layers - 1, cfg.num_hidden_layers
        g = torch.Generator().manual_seed(7)
        for k in [k for k in tensors if k.startswith(f"decoder.layers.{last}.")]:
            tensors[k.replace(f"decoder.layers.{last}.", "mtp.layers.0.transformer_layer.")] = tensors[k].clone()
        for hf_name, v in sd.items():
            if hf_name.startswith(f"model.layers.{last}."):
                expected_mtp[hf_name.replace(f"layers.{last}.", f"layers.{n}.")] = v
        hid = cfg.hidden_size
        for mname, hname, shape in (("enorm.weight", "enorm.weight", (hid,)), ("hnorm.weight", "hnorm.weight", (hid,)),
                                    ("eh_proj.weight", "eh_proj.weight", (hid, 2 * hid)),
                                    ("final_layernorm.weight", "shared_head.norm.weight", (hid,))):
            t = torch.randn(shape, generator=g)
            tensors["mtp.layers.0." + mname] = t
            expected_mtp[f"model.layers.{n}.{hname}"] = t
        expected_mtp[f"model.layers.{n}.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
        expected_mtp[f"model.layers.{n}.shared_head.head.weight"] = sd["lm_head.weight"]
    state = []
    for key, full in tensors.items():
        n_prepend = (1 if ".layers." in key and key.split(".layers.")[1].split(".")[0].isdigit() is False else 0)
        if ".experts.experts." in key:
            n_prepend += 1
        split = 0 if full.dim() - n_prepend == 2 else None  # emulate TP=2 row shards for matrices
        state.extend(_sharded(key, full, n_prepend, split))
    dist_dir = root / "dist_ckpt"
    dist_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"model": state}, str(dist_dir))
    (root / "huggingface").mkdir(exist_ok=True)
    (root / "huggingface" / "config.json").write_text((Path(job["hf"]) / "config.json").read_text())
    if expected_mtp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in expected_mtp.items()},
                                    str(root / "expected_mtp.safetensors"))


# --------------------------------------------------------------------------------------------------------------------
# torchrun side
# --------------------------------------------------------------------------------------------------------------------


def _patch_cpu() -> None:
    """cpu-lab.md: megatron calls these unconditionally."""
    import torch

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self  # tied embeddings with PP > 1 sync the copies "on cuda"
    try:
        from megatron.core.transformer.moe import moe_utils

        moe_utils.te_general_gemm = None
    except ImportError:
        pass


def moe_fields(cfg) -> dict:
    """TransformerConfig fields of an HF MoE text config (none for a dense one): CPU experts (SequentialMLP)."""
    e = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if not e:
        return {}
    moe = dict(
        num_moe_experts=e,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="allgather",
        moe_router_pre_softmax=not getattr(cfg, "norm_topk_prob", True),
        moe_grouped_gemm=False,
        moe_aux_loss_coeff=0.0,
    )
    if getattr(cfg, "shared_expert_intermediate_size", 0):
        moe.update(moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                   moe_shared_expert_gate=True)
    return moe


def _transformer_config(cfg, job: dict):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    moe = moe_fields(cfg)
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(cfg, "attention_bias", False)) or cfg.model_type in ("qwen2", "qwen2_moe"),
        qk_layernorm=cfg.model_type in ("qwen3", "qwen3_moe"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=job["tp"],
        pipeline_model_parallel_size=job["pp"],
        expert_model_parallel_size=job["ep"],
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **moe,
    )


def _fill(model, global_sd: dict, job: dict) -> None:
    """Copy each rank's slice of the global state dict into the local parameters."""
    import torch
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    layer_map = {}
    for k, layer in enumerate(model.decoder.layers):
        layer_map[f"decoder.layers.{k}."] = f"decoder.layers.{layer.layer_number - 1}."
    sd = model.state_dict()
    missing = []
    for name, local in sd.items():
        if "_extra_state" in name or local is None:
            continue
        gname = name
        for lp, gp in layer_map.items():
            if name.startswith(lp):
                gname = gp + name[len(lp):]
                break
        if ".local_experts." in gname:  # local expert j on EP rank e is global e * E_local + j (formats doc §2.5)
            pre, rest = gname.split(".local_experts.")
            j, tail = rest.split(".", 1)
            e_local = model.config.num_moe_experts // ep
            gname = f"{pre}.local_experts.{ep_rank * e_local + int(j)}.{tail}"
        if gname not in global_sd:
            missing.append(gname)
            continue
        full = global_sd[gname]
        param = dict(model.named_parameters()).get(name)
        if param is not None and getattr(param, "tensor_model_parallel", False) and tp > 1:
            dim = param.partition_dim
            if gname.endswith("linear_fc1.weight"):
                gate, up = full.chunk(2)
                piece = torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
            else:
                piece = full.chunk(tp, dim=dim)[tp_rank]
        else:
            piece = full
        assert piece.shape == local.shape, (name, gname, piece.shape, local.shape)
        with torch.no_grad():
            local.copy_(piece)
    assert not missing, f"fixture has no value for {missing[:5]}"


def transformer_config_json(tcfg) -> str:
    """What verl writes next to a Megatron checkpoint: asdict(TransformerConfig), JSON-able fields only."""
    return json.dumps({k: v for k, v in vars(tcfg).items() if isinstance(v, (int, float, str, bool, type(None)))},
                      indent=1)


def _save_layouts(model, job: dict, tcfg) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    root = Path(job["out"])
    layout = job["layout"]
    rank = dist.get_rank()
    if layout == "v0":
        if ps.get_data_parallel_rank() == 0:
            tp_r, pp_r = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
            name = f"mp_rank_{tp_r:02d}" + (f"_{pp_r:03d}" if job["pp"] > 1 else "")
            if job["ep"] > 1:
                name += f"_{ps.get_expert_model_parallel_rank():03d}"
            d = root / "model" / name
            d.mkdir(parents=True, exist_ok=True)
            torch.save([model.state_dict()], d / "model.pt")
        dist.barrier()
        return
    dist_dir = root / ("model/dist_ckpt" if layout == "v2" else "dist_ckpt")
    if rank == 0:
        dist_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    pp_r, tp_r = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    state = {
        "model": model.sharded_state_dict(),
        "lr_scheduler": {"num_steps": 3},
        # verl saves RNG states like this; the reader must skip them
        "rng_state": ShardedObject("rng_state", [torch.get_rng_state()], (pp, tp), (pp_r, tp_r),
                                   replica_id=ps.get_data_parallel_rank()),
    }
    dist_checkpointing.save(state, str(dist_dir))
    if rank == 0:
        (root / "transformer_config.json").write_text(transformer_config_json(tcfg))
        if layout == "v2":
            (root / "ckpt_contents.json").write_text(json.dumps({
                "schema_version": 2, "framework": "megatron", "world_size": dist.get_world_size(),
                "contents": {"model": {"path": "model/dist_ckpt", "format": "megatron_dist_checkpoint"}},
            }))
    dist.barrier()


def _build_model(cfg, job: dict):
    """A local-spec GPTModel for this rank (TP/PP/EP from parallel_state), verl's value head when asked."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tcfg = _transformer_config(cfg, job)
    tp = job["tp"]
    padded = -(-cfg.vocab_size // (128 * tp)) * 128 * tp
    spec = get_gpt_layer_local_spec(num_experts=tcfg.num_moe_experts, qk_layernorm=tcfg.qk_layernorm,
                                    normalization="RMSNorm")
    model = GPTModel(
        tcfg, spec, vocab_size=padded, max_sequence_length=cfg.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        parallel_output=False, share_embeddings_and_output_weights=cfg.tie_word_embeddings and not job["value"],
        position_embedding_type="rope", rotary_base=int(cfg.rope_parameters["rope_theta"]),
    )
    if job["value"] and model.post_process:
        # verl's critic: output_layer replaced by a plain [1, H] linear (formats doc §2.9, LinearForLastLayer)
        class ValueHead(torch.nn.Linear):
            def forward(self, x, weight=None, runtime_gather_output=None):
                return super().forward(x), None

        model.output_layer = ValueHead(cfg.hidden_size, 1, bias=False)
    return model, tcfg


def _forward(model, cfg, job: dict, out: Path) -> None:
    """Rank 0 saves the logits of the model's own forward (PP=1 only), trimmed to the real vocabulary."""
    import torch
    import torch.distributed as dist

    ids = torch.tensor(json.loads(job["ids"]))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        # megatron's default causal mask is built on "cuda": pass one (True = masked out)
        mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1]), diagonal=1).bool()[None, None]
        logits = model(ids, pos, attention_mask=mask)
    if dist.get_rank() == 0:
        torch.save(logits[..., : (1 if job["value"] else cfg.vocab_size)].clone(), out)


def _run_job(job: dict) -> None:
    import safetensors.torch
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(job["hf"])
    model, tcfg = _build_model(cfg, job)
    padded = model.vocab_size
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    sd = safetensors.torch.load_file(str(Path(job["hf"]) / "model.safetensors"))
    _fill(model, hf_to_mcore_global(sd, cfg, padded, job["value"]), job)
    model.eval()
    if job.get("forward") and ps.get_pipeline_model_parallel_world_size() == 1:
        _forward(model, cfg, job, Path(job["out"]) / "mcore_logits.pt")
    _save_layouts(model, job, tcfg)


def _run_model_less(job: dict) -> None:
    """A torch_dist archive as verl writes it under mbridge's default: optimizer state (model-space keys), an lr
    scheduler and RNG state, no model tensor."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    state = {
        "optimizer": {"exp_avg": ShardedTensor.from_rank_offsets(
            "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight", torch.zeros(4, 192, 64), replica_id=0)},
        "lr_scheduler": {"num_steps": 3},
        "rng_state": ShardedObject("rng_state", [torch.get_rng_state()], (1, 1), (0, 0), replica_id=0),
    }
    dist_checkpointing.save(state, job["out"])


def _run_load(job: dict) -> None:
    """Load a torch_dist checkpoint the way Megatron-LM and verl do (`dist_checkpointing.load(model.sharded_state_dict(),
    path)`, default strictness), run the forward, and record what a `return_all` load reports as mismatched."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(job["hf"])
    model, _ = _build_model(cfg, job)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), job["ckpt"])
    model.load_state_dict(loaded)
    model.eval()
    out = Path(job["out"])
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        _forward(model, cfg, job, out / "logits.pt")
    else:  # no pipeline schedule here: each stage saves what it loaded, under global layer numbers
        glob = {f"decoder.layers.{k}.": f"decoder.layers.{layer.layer_number - 1}."
                for k, layer in enumerate(model.decoder.layers)}
        state = {}
        for name, t in model.state_dict().items():
            if "_extra_state" in name or t is None:
                continue
            local = next((lp for lp in glob if name.startswith(lp)), None)
            state[glob[local] + name[len(local):] if local else name] = t.clone()
        torch.save(state, out / f"state_pp{ps.get_pipeline_model_parallel_rank()}.pt")
    _, ckpt_only, model_only = dist_checkpointing.load(model.sharded_state_dict(), job["ckpt"], strict="return_all")
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, (sorted(ckpt_only), sorted(model_only)))
    if dist.get_rank() == 0:
        (out / "mismatch.json").write_text(json.dumps({
            "checkpoint_only": sorted({k for c, _ in keys for k in c}),
            "model_only": sorted({k for _, m in keys for k in m}),
        }))


def _main() -> None:
    import torch.distributed as dist

    jobs = json.loads(sys.argv[sys.argv.index("--jobs") + 1])
    _patch_cpu()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    j0 = jobs[0]
    if j0.get("synthetic") or j0.get("model_less"):
        for job in jobs:
            if job.get("synthetic"):
                _run_synthetic(job)
            else:
                _run_model_less(job)
        dist.barrier()
        dist.destroy_process_group()
        return
    ps.initialize_model_parallel(tensor_model_parallel_size=j0["tp"], pipeline_model_parallel_size=j0["pp"],
                                 expert_model_parallel_size=j0["ep"])
    tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    for job in jobs:
        if job.get("ckpt"):
            _run_load(job)
        else:
            _run_job(job)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------------------------------

IDS = [[3, 17, 42, 99, 7, 64, 23, 5], [1, 2, 3, 4, 5, 6, 7, 8]]


def tiny_hf(kind: str, out: Path, *, tie: bool = False, value: bool = False, dtype=None, **overrides) -> Path:
    """A random tiny HF model saved with save_pretrained (the ground truth for every comparison); `overrides` go to
    the config, `dtype` casts the saved weights."""
    import torch
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, num_hidden_layers=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie)
    common.update(overrides)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common)
    elif kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**{"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                   "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1,
                                   "mlp_only_layers": [], **common})
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(head_dim=16, **common)
    elif kind == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=1,
                                mlp_only_layers=[], **common)
    elif kind == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    elif kind == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": 24,
                                     "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8,
                                     "n_group": 2, "topk_group": 1, **common, "num_key_value_heads": 4})
    else:
        raise ValueError(kind)
    torch.manual_seed(1234)
    if value:
        cfg.num_labels = 1
        model = getattr(tf, cfg.architectures[0].replace("ForCausalLM", "ForTokenClassification")
                        if cfg.architectures else type(cfg).__name__.replace("Config", "ForTokenClassification"))(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms away from 1 so a swapped norm shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            if "score" in n or "lm_head" in n:
                p.normal_(0, 0.5)
            if n == "score.bias":  # verl's value head has no bias: its HF equivalent has a zero one
                p.zero_()
            if "e_score_correction_bias" in n:
                p.uniform_(-0.1, 0.1)
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.uniform_(-0.1, 0.1)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, jobs: list[dict], timeout: int = 420, script: Path = HERE) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), str(script), "--jobs", json.dumps(jobs)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM torchrun itself; it stops its workers (cpu-lab.md)
        out, _ = proc.communicate(timeout=30)
        raise RuntimeError(f"torchrun timed out after {timeout}s:\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{out[-6000:]}")
    return time.monotonic() - t0


@dataclass(frozen=True)
class McoreCase:
    name: str
    actor: Path  # the global_step_N/actor directory
    hf_ref: Path  # the HF model the mcore model was initialised from
    tp: int
    pp: int
    ep: int
    layout: str
    value: bool
    tied: bool
    mcore_logits: Path | None  # the mcore model's own forward, where it ran


def _job(root: Path, hf: Path, *, tp=1, pp=1, ep=1, layout="v1", value=False, forward=True) -> dict:
    return dict(hf=str(hf), out=str(root), tp=tp, pp=pp, ep=ep, layout=layout, value=value, forward=forward,
                ids=json.dumps(IDS))


def _case(name, job: dict, tied: bool) -> McoreCase:
    root = Path(job["out"])
    hf_dir = root / ("model/huggingface" if job["layout"] == "v2" else "huggingface")
    if job["layout"] == "v0":
        hf_dir = root / "hf_config_and_tokenizer"
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text((Path(job["hf"]) / "config.json").read_text())
    logits = root / "mcore_logits.pt"
    return McoreCase(name, root, Path(job["hf"]), job["tp"], job["pp"], job["ep"], job["layout"], job["value"], tied,
                     logits if logits.exists() else None)


@pytest.fixture(scope="session")
def mcore_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mcore")


@pytest.fixture(scope="session")
def mcore_hf_models(mcore_root) -> dict[str, Path]:
    return {
        "qwen2": tiny_hf("qwen2", mcore_root / "hf_qwen2"),
        "qwen2_tied": tiny_hf("qwen2", mcore_root / "hf_qwen2_tied", tie=True),
        "qwen3": tiny_hf("qwen3", mcore_root / "hf_qwen3"),
        "qwen2_critic": tiny_hf("qwen2", mcore_root / "hf_qwen2_critic", value=True),
        "qwen2_moe": tiny_hf("qwen2_moe", mcore_root / "hf_qwen2_moe"),
    }


def _steps(root: Path, name: str) -> Path:
    return root / name / "global_step_3" / "actor"


@pytest.fixture(scope="session")
def mcore_tp1(mcore_root, mcore_hf_models) -> dict[str, McoreCase]:
    """TP=1 (1 process): an untied Qwen3 (q/k norm), a tied Qwen2 and a Qwen2 critic."""
    jobs = {
        "untied": (_job(_steps(mcore_root, "tp1_untied"), mcore_hf_models["qwen3"]), False),
        "tied": (_job(_steps(mcore_root, "tp1_tied"), mcore_hf_models["qwen2_tied"]), True),
        "critic": (_job(_steps(mcore_root, "tp1_critic"), mcore_hf_models["qwen2_critic"], value=True), False),
    }
    run_torchrun(1, [j for j, _ in jobs.values()])
    return {k: _case(k, j, t) for k, (j, t) in jobs.items()}


@pytest.fixture(scope="session")
def mcore_tp2(mcore_root, mcore_hf_models) -> dict[str, McoreCase]:
    """TP=2: an untied Qwen2 (qkv bias) and a tied one."""
    jobs = {
        "untied": (_job(_steps(mcore_root, "tp2_untied"), mcore_hf_models["qwen2"], tp=2), False),
        "tied": (_job(_steps(mcore_root, "tp2_tied"), mcore_hf_models["qwen2_tied"], tp=2), True),
    }
    run_torchrun(2, [j for j, _ in jobs.values()])
    return {k: _case(k, j, t) for k, (j, t) in jobs.items()}


@pytest.fixture(scope="session")
def mcore_pp2(mcore_root, mcore_hf_models) -> dict[str, McoreCase]:
    """PP=2 written in the v2 layout (model/dist_ckpt), tied (the last stage's copy is deduplicated on disk)."""
    jobs = {"tied_v2": (_job(_steps(mcore_root, "pp2_tied"), mcore_hf_models["qwen2_tied"], pp=2, layout="v2"),
                        True)}
    run_torchrun(2, [j for j, _ in jobs.values()])
    return {k: _case(k, j, t) for k, (j, t) in jobs.items()}


@pytest.fixture(scope="session")
def mcore_tp2pp2(mcore_root, mcore_hf_models) -> dict[str, McoreCase]:
    """TP=2 × PP=2 (4 processes), untied Qwen3; the same model also saved as v0 `mp_rank_TT_PPP/model.pt`."""
    jobs = {
        "v1": (_job(_steps(mcore_root, "tp2pp2"), mcore_hf_models["qwen3"], tp=2, pp=2), False),
        "v0": (_job(_steps(mcore_root, "tp2pp2_v0"), mcore_hf_models["qwen3"], tp=2, pp=2, layout="v0"), False),
    }
    run_torchrun(4, [j for j, _ in jobs.values()])
    return {k: _case(k, j, t) for k, (j, t) in jobs.items()}


@pytest.fixture(scope="session")
def mcore_moe_ep2(mcore_root, mcore_hf_models) -> dict[str, McoreCase]:
    """Qwen2-MoE (shared expert + its gate) with EP=2."""
    jobs = {"ep2": (_job(_steps(mcore_root, "moe_ep2"), mcore_hf_models["qwen2_moe"], ep=2), False)}
    run_torchrun(2, [j for j, _ in jobs.values()])
    return {k: _case(k, j, t) for k, (j, t) in jobs.items()}


@pytest.fixture(scope="session")
def mcore_synthetic(mcore_root) -> dict[str, McoreCase]:
    """ShardedTensor checkpoints written with dist_checkpointing.save from the formats-doc formulas: DeepSeek-V3
    (MLA, TE names, per-layer keys, MTP block) and Mixtral (stacked, local-spec norm names)."""
    cases = {}
    jobs = []
    for kind, mtp in (("deepseek_v3", True), ("mixtral", False)):
        hf = tiny_hf(kind, mcore_root / f"hf_{kind}")
        root = _steps(mcore_root, f"synthetic_{kind}")
        jobs.append(dict(hf=str(hf), out=str(root), synthetic=True, mtp=mtp))
        cases[kind] = McoreCase(kind, root, hf, 2, 1, 1, "v1", False, False, None)
    run_torchrun(1, jobs)
    return cases


if __name__ == "__main__":
    _main()
