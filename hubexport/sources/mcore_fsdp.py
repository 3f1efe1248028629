"""Megatron-FSDP `fsdp_dtensor` checkpoints (verl's Megatron engine with `use_megatron_fsdp`, which saves through
Megatron-Bridge's `save_fsdp_dtensor_checkpoint`; Megatron-LM's `--ckpt-format fsdp_dtensor` writes the same) as a Source
of megatron-core's in-memory names: the names TorchDistSource presents, so the same arch tables map them.

On disk it is a plain torch DCP save (`.metadata` + `__R_S.distcp`, none of torch_dist's `common.pt` and
`metadata.json`) of `{"model": <Megatron-FSDP state_dict>, "optimizer": …, "rng_state": …}`, each parameter a DTensor
whose rows are split unevenly across ranks. The producers' own preprocessing
(`megatron.core.transformer.fsdp_dtensor_checkpoint`, run by Megatron-LM's and Megatron-Bridge's save) renames
tensors; this source undoes it:
- wrapper levels: MegatronFSDP's own `module.` (megatron-core >= 0.17 strips any run of `module.`/`model.` itself);
- SwiGLU: `…linear_fc1.weight` (and experts' and shared experts' fc1, biases too) split into `weight_w` (every gate
  row) and `weight_v` (every up row): joined back into megatron's `[gate; up]`;
- experts: one tensor per expert, renumbered globally across EP ranks; SequentialMLP's
  `local_experts.<j>.linear_fc1.weight` kept, TEGroupedMLP's `experts.linear_fc1.weight<j>` renamed to it;
- layers: one key per layer (`decoder.layers.<i>.`), never stacked; local-spec norms keep megatron's own names
  (`input_layernorm`, `pre_mlp_layernorm`), which the arch tables accept.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError
from hubexport.sources.dcp import DcpTensor, open_checked, read_region
from hubexport.sources.torch_dcp import state_dict_groups

RECOPY = "model/dist_ckpt/"
MODEL = "model"
WRAPPERS = re.compile(r"^(?:(?:module|model)\.)+")
SWIGLU_HALF = re.compile(r"^(.*\.linear_fc1\.(?:weight|bias)\d*)(_w|_v)$")
GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.(weight|bias)(\d+)$")
HALVES = ("_w", "_v")


def logical_name(saved: str) -> tuple[str, str | None]:
    """(megatron's in-memory name, "_w" | "_v" | None) of a name inside the checkpoint's `model` entry."""
    name = WRAPPERS.sub("", saved)
    half = None
    if m := SWIGLU_HALF.match(name):
        name, half = m.group(1), m.group(2)
    if m := GROUPED_EXPERT.match(name):
        name = f"{m.group(1)}.local_experts.{m.group(4)}.{m.group(2)}.{m.group(3)}"
    return name, half


def model_entry(dist_dir: Path, md, index: dict[str, DcpTensor]) -> dict[str, str]:
    """{name inside the `model` entry: DCP key}; the optimizer, scheduler and RNG entries are left out."""
    groups = state_dict_groups(md, list(index))
    if MODEL in groups:
        return groups[MODEL]
    chunks = sorted(g for g in groups if re.fullmatch(r"model\d+", g))
    if chunks:
        raise CheckpointError(f"{dist_dir} holds {len(chunks)} model chunks ({', '.join(chunks)}): virtual pipeline "
                              "stages number their layers locally", hint="re-save without virtual pipeline parallelism")
    raise CheckpointError(
        f"{dist_dir} holds no model weights: its tensors are in {', '.join(sorted(groups)) or 'no entry'}",
        hint="the run saved optimizer/RNG state only; add 'model' to checkpoint.save_contents, or use another step",
    )


def _join(dist_dir: Path, name: str, parts: dict[str | None, DcpTensor]) -> tuple[DcpTensor, ...]:
    """The DCP tensors one logical tensor is made of, in order: itself, or its gate and up halves."""
    if set(parts) == {None}:
        return (parts[None],)
    if set(parts) != set(HALVES):
        have = ", ".join(sorted(p.key for p in parts.values()))
        raise CheckpointError(f"{dist_dir} holds {have} but not both SwiGLU halves {name}_w and {name}_v",
                              hint=f"the checkpoint is incomplete or mixes two saves; re-copy {RECOPY}")
    w, v = parts["_w"], parts["_v"]
    if w.shape[1:] != v.shape[1:] or w.dtype != v.dtype:
        raise CheckpointError(f"the SwiGLU halves of {name} disagree: {w.key} {list(w.shape)} {w.dtype}, "
                              f"{v.key} {list(v.shape)} {v.dtype}", hint=f"the checkpoint is corrupt; re-copy {RECOPY}")
    return w, v


class FsdpDtensorSource:
    def __init__(self, dist_dir: Path) -> None:
        self.dir = Path(dist_dir)
        md, index = open_checked(self.dir, RECOPY)
        halves: dict[str, dict[str | None, DcpTensor]] = {}
        for saved, key in model_entry(self.dir, md, index).items():
            name, half = logical_name(saved)
            if half in halves.setdefault(name, {}):
                raise CheckpointError(f"{self.dir} holds {name}{half or ''} twice ({halves[name][half].key}, {key})",
                                      hint="the model is wrapped in a way hubexport does not know; please report it")
            halves[name][half] = index[key]
        self._parts = {name: _join(self.dir, name, parts) for name, parts in halves.items()}

    def metas(self) -> dict[str, TensorSpec]:
        out = {}
        for name, parts in self._parts.items():
            shape = parts[0].shape if len(parts) == 1 else (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            out[name] = TensorSpec(name, tuple(shape), parts[0].dtype)
        return out

    def read(self, name: str) -> torch.Tensor:
        parts = [read_region(self.dir, p) for p in self._parts[name]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def close(self) -> None:
        pass
