"""megatron-core `torch_dist` writer: ShardedTensors with the global shapes, offsets and replica ids that megatron-core's
own `sharded_state_dict()` gives (formats doc §3.2, §3.3), written with `dist_checkpointing.save`.

Every logical tensor (one layer, one expert) is one chunk of its stored key, so `dist_checkpointing.load` reshards it
to whatever TP/PP/EP the loading model uses. The ShardedTensors hold meta tensors; a chunk's bytes are produced
only when torch's file writer asks for that chunk, so memory holds one tensor group at a time, never a rank's share.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

from hubexport.core import TensorSpec
from hubexport.errors import HubexportError, TargetError

LAYER = re.compile(r"^(.*decoder\.layers)\.(\d+)\.(.+)$")  # also `language_model.` / `vision_model.decoder.layers`
EXPERT = ".mlp.experts.local_experts."
GROUPED = ".mlp.experts.experts."
# TE normalisation modules (TE ≥ 2 builds RMSNorm from fusible ops, which carry `_extra_state`); the local spec's
# torch norms have none. Loading ignores unexpected keys by default, so writing them for TE 1.x models is harmless,
# while a missing one fails the load.
TE_NORMS = ("q_layernorm", "k_layernorm", "pre_mlp_layernorm", "input_layernorm", "final_layernorm", "patch_norm",
            "enorm", "hnorm")
# linears not named `linear_*`: the MTP block's projection of [embedding; hidden]
LINEARS = ("eh_proj",)


@dataclass(frozen=True)
class Placement:
    """Where one logical tensor lives in the archive: its key and its indices on the prepended (layer, expert) axes."""

    key: str
    lead: tuple[int, ...]
    lead_sizes: tuple[int, ...]


def placement(name: str, *, num_layers: int | Mapping[str, int], num_experts: int, stacked: bool) -> Placement:
    """Inverse of `sources.mcore._logical_names`: `decoder.layers.<i>.<s>` → `decoder.layers.<s>` [i] when stacked,
    `…mlp.experts.local_experts.<j>.<w>` → `…mlp.experts.experts.<w>` [j] (TEGroupedMLP and SequentialMLP agree).
    `num_layers`: the decoder's layer count, or each stacked block's (`McorePlan.stacks`: a VLM's vision tower too)."""
    stacks = num_layers if isinstance(num_layers, Mapping) else {"decoder.layers": num_layers}
    key, lead, sizes = name, [], []
    m = LAYER.match(name)
    if m and stacked and m.group(1) in stacks:
        key = f"{m.group(1)}.{m.group(3)}"
        lead.append(int(m.group(2)))
        sizes.append(stacks[m.group(1)])
    if EXPERT in key:
        pre, rest = key.split(EXPERT)
        j, w = rest.split(".", 1)
        key = f"{pre}{GROUPED}{w}"
        lead.append(int(j))
        sizes.append(num_experts)
    return Placement(key, tuple(lead), tuple(sizes))


def extra_state_modules(names: list[str], spec: str) -> list[str]:
    """The decoder modules whose `_extra_state` megatron saves (as a ShardedObject): every linear (TE or local), and
    with the TE spec its norms too. Found from the tensor names, so they follow the architecture table."""
    modules = []
    for name in names:  # embedding and output layer (neither `linear_*` nor a norm) save none
        module, param = name.rsplit(".", 1)
        last = module.rsplit(".", 1)[-1]
        # a module's own weight, not a norm folded into its name (local MoE: `mlp.linear_fc1.layer_norm_weight`)
        linear = last.startswith("linear_") or last in LINEARS
        if param in ("weight", "bias") and (linear or (spec == "te" and last in TE_NORMS)):
            modules.append(module)
    return list(dict.fromkeys(modules))


def _lazy_planner(produce: Callable[[WriteItem], torch.Tensor]):
    """megatron-core's save planner, except that tensor data comes from `produce` when the writer needs it."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return produce(write_item)

    return LazyPlanner(flatten_state_dict=False)


class _Writer(FileSystemWriter):
    """torch's file writer, minus the run-specific record in `.metadata` (the staging folder's path and a random
    save id): the same input then gives the same bytes, and no temporary path outlives the run."""

    def storage_meta(self) -> None:
        return None


def _lazy_strategy(produce: Callable[[WriteItem], torch.Tensor]):
    from megatron.core.dist_checkpointing.strategies.torch import (
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class LazyTorchDistSave(TorchDistSaveShardedStrategy):
        """The torch_dist backend (same files, metadata and version tag). megatron's own writer copies every tensor
        before writing; torch's synchronous FileSystemWriter resolves one item at a time."""

        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
            dcp_save(mcore_to_pyt_state_dict(flat, False), storage_writer=_Writer(str(checkpoint_dir)),
                     planner=_lazy_planner(produce))

    return LazyTorchDistSave("torch_dist", 1)


@contextmanager
def process_group() -> Iterator[None]:
    """dist_checkpointing needs torch.distributed: under torchrun it is already up (hubexport.dist), a single process
    gets a private one-rank gloo group."""
    if tdist.is_initialized():
        yield
        return
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


@dataclass(frozen=True)
class Chunk:
    """One logical tensor as a chunk of its stored key."""

    spec: TensorSpec
    where: Placement

    @property
    def offsets(self) -> tuple[int, ...]:
        return (*self.where.lead, *(0 for _ in self.spec.shape))


def assign_ranks(sizes: list[int], world_size: int) -> list[int]:
    """Biggest first to the least-loaded rank (ties by position): deterministic, so every rank computes it alone."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _unwrap_failure(e: BaseException) -> BaseException:
    """torch wraps each rank's exception; find a HubexportError to report as itself."""
    failures = [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
    return next((f for f in failures if isinstance(f, HubexportError)), failures[0] if failures else e)


def save_torch_dist(out_dir: Path, chunks: list[Chunk], mine: list[bool], produce: Callable[[str], torch.Tensor],
                    *, extra_states: list[Placement], spec: str) -> None:
    """Collective: every rank passes the same chunk list and its own `mine` mask. `produce(name)` returns the logical
    tensor `name` (shape and dtype as planned)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    rank = tdist.get_rank()
    state: dict[str, Any] = {}
    by_offset: dict[tuple[str, tuple[int, ...]], Chunk] = {}
    for c, own in zip(chunks, mine, strict=True):
        if not own:
            continue
        axes = [(a, i, n) for a, (i, n) in enumerate(zip(c.where.lead, c.where.lead_sizes, strict=True))]
        state[c.spec.name] = ShardedTensor.from_rank_offsets(
            c.where.key, torch.empty(c.spec.shape, dtype=c.spec.dtype, device="meta"), *axes,
            replica_id=0, prepend_axis_num=len(c.where.lead))
        by_offset[(c.where.key, c.offsets)] = c
    if rank == 0:  # TE writes an empty byte tensor when it has no FP8 state; megatron's local linears write None
        value = torch.empty(0, dtype=torch.uint8) if spec == "te" else None
        for p in extra_states:
            state[f"{p.key}@{p.lead}"] = ShardedObject(p.key, value, p.lead_sizes or (1,), p.lead or (0,),
                                                       replica_id=0)

    def resolve(item: WriteItem) -> torch.Tensor:
        c = by_offset[(item.index.fqn, tuple(item.index.offset))]
        t = produce(c.spec.name)
        if tuple(t.shape) != c.spec.shape or t.dtype != c.spec.dtype:
            raise AssertionError(f"{c.spec.name}: produced {tuple(t.shape)} {t.dtype}, planned {c.spec}")
        size = tuple(item.tensor_data.chunk.sizes)  # with the prepended (layer, expert) axes, or without
        assert math.prod(size) == t.numel(), (c.spec.name, size)
        return t.reshape(size)

    try:
        dist_checkpointing.save(state, str(out_dir), sharded_strategy=_lazy_strategy(resolve))
    except CheckpointException as e:  # a BaseException: `except Exception` would miss it
        inner = _unwrap_failure(e)
        if isinstance(inner, HubexportError):
            raise inner from None
        hint = ("check free disk space and write permission" if isinstance(inner, OSError)
                else "this is a bug in hubexport; run with --debug and report the traceback")
        raise TargetError(f"writing the torch_dist checkpoint in {out_dir} failed: "
                          f"{type(inner).__name__}: {str(inner)[:300]}", hint=hint + "; nothing was published") from None
