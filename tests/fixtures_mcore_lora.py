"""verl's Megatron LoRA checkpoints, made at test time on CPU by megatron-core (TP=2, then PP=2, 2 processes).

verl trains Megatron LoRA through Megatron-Bridge (`megatron.bridge.peft.lora.LoRA`), which is not installable here
(it needs Transformer Engine). So this file wraps megatron-core's own linears exactly as Megatron-Bridge's
`LoRALinear(AdapterWrapper)` + `ParallelLinearAdapter` do — the same module tree and parameter names
(`<linear>.to_wrap.weight`, `<linear>.adapter.linear_in.weight`, `<linear>.adapter.linear_out.weight`), the same
state dict (base under the linear's own name, adapter under `adapter.`), the same TP layout (linear_in
Column-parallel with gathered output for column-parallel bases, Row-parallel for row-parallel ones; linear_out
Column-parallel; SwiGLU split of fc1's linear_out in the sharded state dict) and forward `base + (alpha/dim)·out(in(x))`
— and saves them with megatron-core's `dist_checkpointing.save` in verl's layouts:

- `v1_full`: verl <= 0.8 with use_dist_checkpointing: `dist_ckpt/` holds the whole model (base + adapters),
  `adapter_checkpoint/mp_rank_XX_adapter.pt` the adapters again (`{"adapter_state_dict": named_parameters with
  ".adapter."}`), nothing records alpha;
- `v1_adapter`: verl <= 0.8 under mbridge (use_dist_checkpointing=False): `dist_ckpt/` holds no model tensor (lr
  scheduler and RNG state only), the adapters exist only in `adapter_checkpoint/`; `v1_base`: `dist_ckpt/` holds the
  base weights but not the adapters, which are in `adapter_checkpoint/`; `pp2_adapter` and `tp1_adapter`: the same LoRA
  trained with TP=1 PP=2 (each stage numbers its layers from 0) and TP=1, saved as adapter rank files only (same
  torchrun, model parallelism re-initialised);
- `v2_adapter`: verl 0.9 with Megatron-Bridge: `model/dist_ckpt/` holds only the adapter shards
  (`apply_peft_adapter_filter_to_state_dict`), `ckpt_contents.json` says `backend.peft`, and
  `model/huggingface/adapter/adapter_config.json` is Megatron-Bridge's `build_adapter_config_dict` (r, lora_alpha).

Not exercised: Megatron-Bridge itself, its HF adapter export's tensors, Transformer Engine's fused LoRA linears.
The LoRA matrices are drawn in HF space (one A per fused linear, B per HF projection) and fused into megatron's layout
with this file's own formulas; `expected_adapter.safetensors` holds them under PEFT's saved names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
R, ALPHA = 4, 12  # scale 3: the delta is far from negligible
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # Megatron-Bridge LoRA's default targets
PEFT = "base_model.model."


def hf_lora(cfg, seed: int = 7) -> dict:
    """Random LoRA matrices in HF space: {hf module: (A, B)}; q/k/v share one A (one LoRA on linear_qkv), so do
    gate/up (one LoRA on linear_fc1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    nq, ng, hidden, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or hidden // nq

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    out = {}
    for i in range(cfg.num_hidden_layers):
        h = f"model.layers.{i}."
        a_qkv, a_fc1 = rnd(R, hidden), rnd(R, hidden)
        out[h + "self_attn.q_proj"] = (a_qkv, rnd(nq * d, R))
        out[h + "self_attn.k_proj"] = (a_qkv, rnd(ng * d, R))
        out[h + "self_attn.v_proj"] = (a_qkv, rnd(ng * d, R))
        out[h + "self_attn.o_proj"] = (rnd(R, nq * d), rnd(hidden, R))
        out[h + "mlp.gate_proj"] = (a_fc1, rnd(inter, R))
        out[h + "mlp.up_proj"] = (a_fc1, rnd(inter, R))
        out[h + "mlp.down_proj"] = (rnd(R, inter), rnd(hidden, R))
    return out


def to_mcore_lora(lora: dict, cfg) -> dict:
    """HF-space LoRA → megatron's global (A, B) per adapted linear: B of linear_qkv interleaved per query group,
    B of linear_fc1 = [gate; up] (formats doc §2.3)."""
    import torch

    nq, ng = cfg.num_attention_heads, cfg.num_key_value_heads
    p = nq // ng
    out = {}
    for i in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a, bq = lora[h + "self_attn.q_proj"]
        bk, bv = lora[h + "self_attn.k_proj"][1], lora[h + "self_attn.v_proj"][1]
        d = bk.shape[0] // ng
        b = torch.cat([bq.view(ng, p * d, R), bk.view(ng, d, R), bv.view(ng, d, R)], dim=1).reshape(-1, R)
        out[m + "self_attention.linear_qkv"] = (a, b)
        out[m + "self_attention.linear_proj"] = lora[h + "self_attn.o_proj"]
        a, bg = lora[h + "mlp.gate_proj"]
        out[m + "mlp.linear_fc1"] = (a, torch.cat([bg, lora[h + "mlp.up_proj"][1]]))
        out[m + "mlp.linear_fc2"] = lora[h + "mlp.down_proj"]
    return out


def peft_state(lora: dict) -> dict:
    """What PEFT's save_pretrained writes for these matrices."""
    out = {}
    for module, (a, b) in lora.items():
        out[f"{PEFT}{module}.lora_A.weight"] = a.clone()
        out[f"{PEFT}{module}.lora_B.weight"] = b.clone()
    return out


# --------------------------------------------------------------------------------------------------------------------
# torchrun side
# --------------------------------------------------------------------------------------------------------------------


def _lora_classes():
    """Megatron-Bridge's LoRALinear and ParallelLinearAdapter (non-expert, identity activation, no dropout), on
    megatron-core's parallel linears."""
    import torch
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    class ParallelLinearAdapter(torch.nn.Module):
        def __init__(self, in_features, out_features, dim, *, base_linear_name, input_is_parallel, alpha, config):
            super().__init__()
            self.base_linear_name, self.dim, self.alpha, self.config = base_linear_name, dim, alpha, config
            init = torch.nn.init.zeros_
            if input_is_parallel:
                self.linear_in = RowParallelLinear(in_features, dim, config=config, input_is_parallel=True,
                                                   skip_bias_add=True, bias=False, init_method=init)
            else:
                self.linear_in = ColumnParallelLinear(in_features, dim, config=config, bias=False, gather_output=True,
                                                      init_method=init)
            self.linear_out = ColumnParallelLinear(dim, out_features, config=config, bias=False,
                                                   gather_output=input_is_parallel, init_method=init)

        def forward(self, x):
            x, _ = self.linear_in(x)
            x, _ = self.linear_out(x)
            return x * (self.alpha / self.dim)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = self.linear_in.sharded_state_dict(f"{prefix}linear_in.", sharded_offsets, metadata)
            out = self.linear_out.sharded_state_dict(f"{prefix}linear_out.", sharded_offsets, metadata)
            if "linear_fc1" in self.base_linear_name and self.config.gated_linear_unit:
                key = f"{prefix}linear_out.weight"
                out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets)
            return {**sd, **out}

    class LoRALinear(torch.nn.Module):
        def __init__(self, to_wrap, adapter):
            super().__init__()
            self.to_wrap, self.adapter = to_wrap, adapter

        def forward(self, x, *args, **kwargs):
            out, bias = self.to_wrap(x, *args, **kwargs)
            return out + self.adapter(x), bias

        def state_dict(self, destination=None, prefix="", keep_vars=False):
            destination = {} if destination is None else destination
            self.to_wrap.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
            self.adapter.state_dict(destination=destination, prefix=f"{prefix}adapter.", keep_vars=keep_vars)
            return destination

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            sd = dict(self.to_wrap.sharded_state_dict(prefix, sharded_offsets, metadata))
            sd.update(self.adapter.sharded_state_dict(f"{prefix}adapter.", sharded_offsets, metadata))
            return sd

    return ParallelLinearAdapter, LoRALinear


def _wrap(model, cfg, lora: dict) -> None:
    """Megatron-Bridge's LoRA.transform on every target linear, then this rank's slice of the global matrices."""
    import torch
    from megatron.core import parallel_state as ps

    Adapter, LoRALinear = _lora_classes()
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for layer in model.decoder.layers:
        i = layer.layer_number - 1
        for parent, name in ((layer.self_attention, "linear_qkv"), (layer.self_attention, "linear_proj"),
                             (layer.mlp, "linear_fc1"), (layer.mlp, "linear_fc2")):
            base = getattr(parent, name)
            row = name in ("linear_proj", "linear_fc2")  # row-parallel bases: the adapter's input is parallel
            full = f"decoder.layers.{i}.{'self_attention' if parent is layer.self_attention else 'mlp'}.{name}"
            a, b = lora[full]
            adapter = Adapter(a.shape[1], b.shape[0], R, base_linear_name=full, input_is_parallel=row, alpha=ALPHA,
                              config=model.config)
            if name == "linear_fc1":
                gate, up = b.chunk(2)
                b_local = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
            else:
                b_local = b.chunk(tp)[rank]
            a_local = a.chunk(tp, dim=1 if row else 0)[rank]
            with torch.no_grad():
                adapter.linear_in.weight.copy_(a_local)
                adapter.linear_out.weight.copy_(b_local)
            setattr(parent, name, LoRALinear(base, adapter))


def _save_rank_adapters(model, actors: list[Path]) -> None:
    """verl <= 0.8's save_adapter_checkpoint: named_parameters() containing ".adapter.", one file per TP/PP rank."""
    import torch
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0:
        return
    name = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{ps.get_pipeline_model_parallel_rank():03d}"
    state = {n: p.data.clone() for n, p in model.named_parameters() if ".adapter." in n.lower()}
    for actor in actors:
        torch.save({"adapter_state_dict": state}, actor / "adapter_checkpoint" / f"{name}_adapter.pt")


def _save(model, job: dict, cfg, tcfg) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from tests.fixtures_mcore import transformer_config_json

    root = Path(job["out"])
    rank = dist.get_rank()
    full, v2 = root / "v1_full", root / "v2_adapter"
    v1_adapter, v1_base = root / "v1_adapter", root / "v1_base"
    v1s = (full, v1_adapter, v1_base)
    adapter_only = {k: v for k, v in model.sharded_state_dict().items() if ".adapter." in k and "_extra_state" not in k}
    if rank == 0:
        for d in (v2 / "model" / "dist_ckpt", v2 / "model" / "huggingface" / "adapter",
                  *(a / sub for a in v1s for sub in ("dist_ckpt", "adapter_checkpoint", "huggingface"))):
            d.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(full / "dist_ckpt"))
    dist_checkpointing.save({"model": adapter_only}, str(v2 / "model" / "dist_ckpt"))
    # verl <= 0.8 under mbridge (use_dist_checkpointing=False): dist_ckpt holds no model tensor, the adapters live
    # only in adapter_checkpoint/
    dist_checkpointing.save({"lr_scheduler": {"num_steps": 3}, "rng_state": ShardedObject(
        "rng_state", [torch.get_rng_state()], (1, ps.get_tensor_model_parallel_world_size()),
        (0, ps.get_tensor_model_parallel_rank()), replica_id=ps.get_data_parallel_rank())}, str(v1_adapter / "dist_ckpt"))
    base_only = {k: v for k, v in model.sharded_state_dict().items() if ".adapter." not in k}
    dist_checkpointing.save({"model": base_only}, str(v1_base / "dist_ckpt"))  # the base in torch_dist, LoRA aside
    _save_rank_adapters(model, list(v1s))
    if rank == 0:
        for actor in v1s:
            cfg.save_pretrained(actor / "huggingface")
            (actor / "transformer_config.json").write_text(transformer_config_json(tcfg))
        cfg.save_pretrained(v2 / "model" / "huggingface")
        (v2 / "ckpt_contents.json").write_text(json.dumps({
            "schema_version": 2, "framework": "megatron", "role": "actor", "global_step": 3,
            "world_size": dist.get_world_size(),
            "backend": {"has_bridge": True, "use_dist_checkpointing": False, "peft": True},
            "contents": {"model": {"path": "model/huggingface", "format": "huggingface", "backend": "mbridge",
                                   "peft_adapter_path": "model/huggingface/adapter"},
                         "peft_adapters": {"path": "model/dist_ckpt", "format": "megatron_dist_checkpoint"}},
        }))
        (v2 / "model" / "huggingface" / "adapter" / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "auto_mapping": None, "base_model_name_or_path": "", "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "lora_alpha": ALPHA,
            "lora_dropout": 0.0, "modules_to_save": None, "r": R, "rank_pattern": {}, "alpha_pattern": {},
            "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
            "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}, indent=2))
    dist.barrier()


def _lora_model(job: dict):
    """This rank's LoRA-wrapped megatron model: the HF base's weights, the LoRA matrices drawn in HF space."""
    import safetensors.torch
    from transformers import AutoConfig

    from tests.fixtures_mcore import _build_model, _fill, hf_to_mcore_global

    cfg = AutoConfig.from_pretrained(job["hf"])
    model, tcfg = _build_model(cfg, job)
    sd = safetensors.torch.load_file(str(Path(job["hf"]) / "model.safetensors"))
    _fill(model, hf_to_mcore_global(sd, cfg, model.vocab_size, False), job)
    lora = hf_lora(cfg)
    _wrap(model, cfg, to_mcore_lora(lora, cfg))
    return model.eval(), cfg, tcfg, lora


def _run(job: dict) -> None:
    import safetensors.torch
    import torch.distributed as dist

    from tests.fixtures_mcore import _forward

    model, cfg, tcfg, lora = _lora_model(job)
    root = Path(job["out"])
    root.mkdir(parents=True, exist_ok=True)
    _forward(model, cfg, job, root / "mcore_logits.pt")
    _save(model, job, cfg, tcfg)
    if dist.get_rank() == 0:
        state = peft_state(lora)
        safetensors.torch.save_file(state, str(root / "expected_adapter.safetensors"))
        # what Megatron-Bridge's save_hf_adapter writes next to its adapter_config.json
        safetensors.torch.save_file(state, str(root / "v2_adapter/model/huggingface/adapter/adapter_model.safetensors"))


def _run_rank_adapters(job: dict, actor: Path) -> None:
    """The same LoRA trained under another TP/PP layout, saved as verl <= 0.8's adapter rank files only."""
    import torch.distributed as dist

    from tests.fixtures_mcore import transformer_config_json

    model, cfg, tcfg, _ = _lora_model(job)
    if dist.get_rank() == 0:
        (actor / "adapter_checkpoint").mkdir(parents=True)
        cfg.save_pretrained(actor / "huggingface")
        (actor / "transformer_config.json").write_text(transformer_config_json(tcfg))
    dist.barrier()
    _save_rank_adapters(model, [actor])
    dist.barrier()


def _main() -> None:
    import sys

    import torch.distributed as dist

    sys.path.insert(0, str(HERE.parents[1]))
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from tests.fixtures_mcore import _patch_cpu

    job = json.loads(sys.argv[sys.argv.index("--jobs") + 1])[0]
    _patch_cpu()
    dist.init_process_group("gloo")
    for tp, pp, actor in ((job["tp"], 1, None), (1, 2, "pp2_adapter"), (1, 1, "tp1_adapter")):
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
        if actor is None:
            _run(job)
        else:
            _run_rank_adapters({**job, "tp": tp, "pp": pp}, Path(job["out"]) / actor)
        dist.barrier()
        ps.destroy_model_parallel()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class McoreLoraCase:
    root: Path
    hf_ref: Path  # the base model training started from
    v1_full: Path  # actor dir: dist_ckpt/ (base + adapters) + adapter_checkpoint/
    v2_adapter: Path  # actor dir: model/dist_ckpt/ (adapters only) + model/huggingface/adapter/adapter_config.json
    v1_adapter: Path  # actor dir: dist_ckpt/ without model tensors + adapter_checkpoint/ (TP=2)
    v1_base: Path  # actor dir: dist_ckpt/ with the base only + adapter_checkpoint/ (TP=2)
    pp2_adapter: Path  # actor dir: adapter_checkpoint/ of TP=1 PP=2 (local layer numbers per stage)
    tp1_adapter: Path  # actor dir: adapter_checkpoint/ of TP=1 PP=1
    logits: Path  # the LoRA-wrapped mcore model's own forward
    expected_adapter: Path


@pytest.fixture(scope="session")
def mcore_lora(tmp_path_factory) -> McoreLoraCase:
    from tests.fixtures_mcore import IDS, run_torchrun, tiny_hf

    root = tmp_path_factory.mktemp("mcore_lora")
    hf = tiny_hf("qwen2", root / "hf_qwen2", num_hidden_layers=2)
    job = dict(hf=str(hf), out=str(root), tp=2, pp=1, ep=1, layout="v1", value=False, forward=True,
               ids=json.dumps(IDS))
    run_torchrun(2, [job], script=HERE)
    return McoreLoraCase(root, hf, root / "v1_full", root / "v2_adapter", root / "v1_adapter", root / "v1_base",
                         root / "pp2_adapter", root / "tp1_adapter", root / "mcore_logits.pt",
                         root / "expected_adapter.safetensors")


if __name__ == "__main__":
    _main()
