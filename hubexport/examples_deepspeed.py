"""Real DeepSpeed ZeRO 1/2/3 checkpoints, made on CPU (`DS_ACCELERATOR=cpu`, gloo, 2 processes) by
`engine.save_checkpoint`, in the layouts their users leave: the transformers/TRL Trainer's `checkpoint-N/`
(`global_stepN/`, `latest`, config and tokenizer beside them, and `model.safetensors` for ZeRO 1/2) and OpenRLHF's
`ckpt/_actor/` (`latest`, `global_stepN/`; the HF config in `ckpt/global_stepN_hf/` that `--ckpt.save_hf` writes).
The reference is what the live engine holds just before saving: each parameter's fp32 master (DeepSpeed's own
`safe_get_full_fp32_param`), frozen parameters, and the module's own (bf16) weights. Used by the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hubexport.examples import PROMPT, FsdpCase, _save_hf_dir, _save_reference, build_model, spawn_ranks

PRODUCERS = ("trainer", "openrlhf")


@dataclass(frozen=True)
class DeepSpeedCase:
    name: str
    stage: int  # ZeRO stage 1, 2 or 3
    producer: str  # one of PRODUCERS
    model: FsdpCase  # family, tying, hidden size...; dtype "bfloat16" turns on DeepSpeed's bf16 mode
    frozen: tuple[str, ...] = ()  # parameters with requires_grad=False (kept out of the optimizer)
    mlp_bias: bool = False  # Llama's MLP biases: with an odd intermediate size, odd numels that ZeRO pads
    parameter_alignment: bool = False  # ZeRO 1/2's per-parameter alignment padding (param_alignment_paddings)

    @property
    def save_dir(self) -> Path:
        """What engine.save_checkpoint was given, relative to the case folder (it holds `latest`)."""
        return Path("checkpoint-1") if self.producer == "trainer" else Path("ckpt/_actor")

    @property
    def config_dir(self) -> Path:
        return self.save_dir if self.producer == "trainer" else Path("ckpt/global_step1_hf")


def _ds_config(case: DeepSpeedCase) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": case.stage, "parameter_alignment": case.parameter_alignment},
            "bf16": {"enabled": case.model.dtype == "bfloat16"}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def _build(case: DeepSpeedCase):
    cfg, model = build_model(case.model, **({"mlp_bias": True} if case.mlp_bias else {}))
    for name, p in model.named_parameters():
        p.requires_grad_(name not in case.frozen)
    return cfg, model


def _gathered(engine, stage: int):
    """Every parameter whole for the duration (ZeRO-3 partitions them; a collective, so on every rank)."""
    import contextlib

    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters())) if stage == 3 else (
        contextlib.nullcontext())


def _reference(engine, case: DeepSpeedCase) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fp32 state dict, the module's own weights): masters for trained parameters, the module's values for frozen
    ones and buffers; tied aliases under both names, as model.state_dict() lists them."""
    from deepspeed.utils import safe_get_full_fp32_param

    fp32 = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            fp32[name] = safe_get_full_fp32_param(p).detach().clone()
    with _gathered(engine, case.stage):
        module = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    for name, value in module.items():
        fp32.setdefault(name, value.float() if value.is_floating_point() else value)
    for name, p in engine.module.named_parameters(remove_duplicate=False):  # tied aliases: the canonical master
        canonical = next(n for n, q in engine.module.named_parameters() if q is p)
        fp32[name] = fp32[canonical]
    return fp32, module


def _logits(engine) -> torch.Tensor:
    engine.eval()
    with torch.no_grad():
        return engine(input_ids=torch.tensor(PROMPT)).logits.float()


def make_deepspeed_case(case: DeepSpeedCase, out: Path, rank: int) -> None:
    """Train one step under ZeRO and save; call on every rank inside a gloo process group."""
    import deepspeed
    from safetensors.torch import save_file

    cfg, model = _build(case)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(case))
    ids = torch.tensor(PROMPT)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    fp32, module = _reference(engine, case)
    logits = _logits(engine)
    folder = out / case.name
    engine.save_checkpoint(str(folder / case.save_dir))
    if case.stage < 3 and rank == 0:  # what the Trainer's save_model / OpenRLHF's save_hf write beside it
        engine.module.save_pretrained(folder / case.config_dir, state_dict=dict(module))  # it empties the dict
    if rank == 0:
        _save_hf_dir(folder / case.config_dir, cfg, case.model)
        _save_reference(folder / "expected", fp32, logits, case.model)
        save_file({k: v.contiguous() for k, v in module.items() if k != "lm_head.weight" or not case.model.tied},
                  folder / "expected" / "module.safetensors")
    torch.distributed.barrier()


def _worker_setup() -> None:
    """DeepSpeed's CPU accelerator, and no JIT-compiled shared-memory all-reduce: every comm backend start
    (deepspeed.comm.torch.TorchBackend, gloo too) builds the `deepspeed_shm_comm` op (minutes of C++ compilation the
    first time) when `deepspeed.ops.__compatible_ops__` lists it, and probing that list runs compilers; set empty,
    DeepSpeed probes nothing and uses gloo's own collectives. (torch's AdamW, not DeepSpeedCPUAdam: no cpu_adam op.)"""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def _make(case: DeepSpeedCase, out: Path, rank: int) -> None:
    _worker_setup()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(torch.distributed.get_world_size()))
    make_deepspeed_case(case, out, rank)


def make_deepspeed_checkpoints(cases: list[DeepSpeedCase], out: Path, world_size: int = 2) -> None:
    """Every case in one spawn of `world_size` real processes."""
    out.mkdir(parents=True, exist_ok=True)
    spawn_ranks(_make, cases, world_size, out)
