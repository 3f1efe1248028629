"""Megatron-FSDP `fsdp_dtensor` checkpoints, made at test time on CPU by megatron-core 0.16.1's Megatron-FSDP itself.

A torchrun script (2 processes, gloo; EP=2 for the MoE model, TP=2 for one dense model): builds the tiny local-spec
`GPTModel` of tests/fixtures_mcore.py from a tiny HF model, runs megatron's forward, saves the same weights as torch_dist (the
existing path, to compare with), then wraps the model in megatron-core's `FullyShardedDataParallel` (Megatron-FSDP,
`optim_grads_params`: every parameter a DTensor of unevenly split rows) and saves it the way verl's
`_save_megatron_fsdp_checkpoint` does through Megatron-Bridge's `save_fsdp_dtensor_checkpoint`:
`{"model": model.state_dict_for_save_checkpoint(), "lr_scheduler": …, "rng_state": {"(pp, tp)": [...]}}` through
megatron-core's own `handle_fp8_extra_state_case`, `handle_swiglu_in_state_dict`, `handle_experts_in_state_dict` and
`preprocess_state_dict_for_uneven_dtensor`, then `torch.distributed.checkpoint.save` into `model/dist_ckpt/`.

CPU patches (Megatron-FSDP assumes CUDA and, at TP > 1, Transformer Engine): no-op streams and events, meshes built on
"cpu" instead of "cuda", `Tensor.cuda` the identity, the CUDA RNG state mapped onto the CPU one, a stand-in class for
the absent `TELinear`, and `torch.cuda.current_device()` 0 while the wrapper is built ("cpu" elsewhere, for megatron's
rotary embedding). Not exercised: Megatron-Bridge itself (not installable here; its
`preprocess_fsdp_dtensor_state_dict` is repeated step by step below), the optimizer entry (megatron's
DistributedOptimizer allocates on "cuda"), Transformer Engine (so no TEGroupedMLP `weight<j>` experts and no fused
`layer_norm_weight` names), a training step, TP and DP > 1 at once (4 processes), MoE with TP > 1.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
MODELS = {  # name: (tiny_hf kind, overrides, Float16Module + verl's way of passing the model, TP)
    "qwen3": ("qwen3", {}, False, 1),
    "qwen2_tied_bf16": ("qwen2", {"tie": True, "dtype": "bfloat16"}, True, 1),
    "qwen2_moe_ep2": ("qwen2_moe", {}, False, 1),
    "qwen2_tp2": ("qwen2", {}, False, 2),
}


class _NoStream:
    def __init__(self, *a, **k) -> None:
        pass

    def wait_stream(self, *a) -> None:
        pass

    def record(self, *a, **k) -> None:
        pass

    def wait(self, *a, **k) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _patch_fsdp_cpu() -> None:
    import torch
    from torch.distributed import DeviceMesh

    torch.cuda.Stream = torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    torch.cuda.empty_cache = lambda: None
    torch.cuda.get_rng_state, torch.cuda.set_rng_state = torch.get_rng_state, torch.set_rng_state  # TP > 1's RNG sync
    from megatron.core.distributed.fsdp import mcore_fsdp_adapter

    mcore_fsdp_adapter.TELinear = type("NoTELinear", (), {})  # None without Transformer Engine; isinstance'd at TP > 1
    from_group = DeviceMesh.from_group
    DeviceMesh.from_group = staticmethod(lambda group, device_type, *a, **k: from_group(group, "cpu", *a, **k))


@contextlib.contextmanager
def _cuda_index():
    """Megatron-FSDP compares its device with `cuda:{current_device()}`: an index while it is built."""
    import torch

    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = saved


def _preprocess(model, tcfg, state: dict) -> dict:
    """Megatron-Bridge's `preprocess_fsdp_dtensor_state_dict`, step by step, with megatron-core's own handlers."""
    import torch.nn.functional as F
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import (
        preprocess_state_dict_for_uneven_dtensor,
    )
    from megatron.core.transformer.fsdp_dtensor_checkpoint import (
        handle_experts_in_state_dict,
        handle_fp8_extra_state_case,
        handle_swiglu_in_state_dict,
    )

    state = dict(state)
    handle_fp8_extra_state_case(state["model"])
    if tcfg.gated_linear_unit and tcfg.activation_func is F.silu:
        state["model"], _ = handle_swiglu_in_state_dict(model, state["model"], None)
    if tcfg.num_moe_experts:
        state["model"] = handle_experts_in_state_dict(state["model"], tcfg.num_moe_experts)
    preprocess_state_dict_for_uneven_dtensor(state)
    return state


def _save_fsdp_dtensor(model, tcfg, job: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel
    from megatron.core.transformer.module import Float16Module

    from tests.fixtures_mcore import transformer_config_json

    if job["bf16"]:
        tcfg.bf16 = True
        model = Float16Module(tcfg, model)
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, use_megatron_fsdp=True,
                                        data_parallel_sharding_strategy="optim_grads_params")
    with _cuda_index():
        fsdp = FullyShardedDataParallel(tcfg, ddp, model, device=torch.device("cpu"))
    pp_tp = f"({ps.get_pipeline_model_parallel_rank()}, {ps.get_tensor_model_parallel_rank()})"
    state = {"model": fsdp.state_dict_for_save_checkpoint(), "lr_scheduler": {"num_steps": 3},
             "rng_state": {pp_tp: [{"torch_rng_state": torch.get_rng_state()}]}}
    # Megatron-LM passes its DDP-level wrapper, verl (through Megatron-Bridge) the MegatronFSDP module inside it
    state = _preprocess(fsdp.module if job["bf16"] else fsdp, tcfg, state)
    actor = Path(job["out"])
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(actor / "model" / "dist_ckpt")))
    if dist.get_rank() == 0:
        (actor / "transformer_config.json").write_text(transformer_config_json(tcfg))
        (actor / "ckpt_contents.json").write_text(json.dumps({
            "schema_version": 2, "framework": "megatron", "world_size": dist.get_world_size(),
            "backend": {"has_bridge": True, "use_dist_checkpointing": False, "peft": False},
            "saved_any_dist_ckpt": True}))
    dist.barrier()


def _run(job: dict) -> None:
    import safetensors.torch
    from transformers import AutoConfig

    from tests.fixtures_mcore import _build_model, _fill, _forward, _save_layouts, hf_to_mcore_global

    cfg = AutoConfig.from_pretrained(job["hf"])
    model, tcfg = _build_model(cfg, job)
    sd = safetensors.torch.load_file(str(Path(job["hf"]) / "model.safetensors"))
    _fill(model, hf_to_mcore_global(sd, cfg, model.vocab_size, False), job)
    model.eval()
    Path(job["out"]).mkdir(parents=True, exist_ok=True)
    if not job["bf16"]:  # bf16 logits on CPU differ from transformers' by rounding; the export's are compared exactly
        _forward(model, cfg, job, Path(job["out"]) / "mcore_logits.pt")
    _save_layouts(model, {**job, "out": job["twin"], "layout": "v1"}, tcfg)  # the same weights as torch_dist
    _save_fsdp_dtensor(model, tcfg, job)


def _main() -> None:
    import sys

    import torch.distributed as dist

    sys.path.insert(0, str(HERE.parents[1]))
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from tests.fixtures_mcore import _patch_cpu

    jobs = json.loads(sys.argv[sys.argv.index("--jobs") + 1])
    _patch_cpu()
    _patch_fsdp_cpu()
    dist.init_process_group("gloo")
    for tp in sorted({job["tp"] for job in jobs}):  # TP=1 jobs with EP=2; TP=2 (DP=1) for dense models
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=2 // tp)
        tensor_parallel.model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
        for job in jobs:
            if job["tp"] == tp:
                _run(job)
        dist.barrier()
        ps.destroy_model_parallel()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MfsdpCase:
    name: str
    actor: Path  # global_step_N/actor with model/dist_ckpt/ (fsdp_dtensor) and model/huggingface/
    twin: Path  # the same weights saved as torch_dist (v1 dist_ckpt/), as the existing path reads them
    hf_ref: Path  # the HF model the mcore model was filled from (save_pretrained's output)
    mcore_logits: Path | None  # megatron's own forward (fp32 models)


@pytest.fixture(scope="session")
def mfsdp_cases(tmp_path_factory) -> dict[str, MfsdpCase]:
    import torch

    from tests.fixtures_mcore import IDS, run_torchrun, tiny_hf

    root = tmp_path_factory.mktemp("mfsdp")
    jobs, cases = [], {}
    for name, (kind, extra, bf16, tp) in MODELS.items():
        dtype = getattr(torch, extra["dtype"]) if "dtype" in extra else None
        hf = tiny_hf(kind, root / f"hf_{name}", tie=extra.get("tie", False), dtype=dtype, num_hidden_layers=2)
        actor, twin = (root / sub / name / "global_step_3" / "actor" for sub in ("fsdp", "torch_dist"))
        for d in (actor / "model" / "huggingface", twin / "huggingface"):
            d.mkdir(parents=True)
            (d / "config.json").write_text((hf / "config.json").read_text())
        jobs.append(dict(hf=str(hf), out=str(actor), twin=str(twin), tp=tp, pp=1, ep=2 if "moe" in kind else 1,
                         value=False, bf16=bf16, ids=json.dumps(IDS)))
        logits = actor / "mcore_logits.pt"
        cases[name] = MfsdpCase(name, actor, twin, hf, None if bf16 else logits)
    run_torchrun(2, jobs, script=HERE)
    return cases


if __name__ == "__main__":
    _main()
