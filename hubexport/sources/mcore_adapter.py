"""verl <= 0.8's Megatron LoRA rank files: `adapter_checkpoint/mp_rank_TT[_PPP][_EEE]_adapter.pt`, each
`torch.save({"adapter_state_dict": {name: tensor}})` of the `.adapter.` parameters of VPP chunk 0 (verl's
`save_adapter_checkpoint`), TP-local and with the stage's local layer numbers.

Presented like the torch_dist LoRA path sees them: global `decoder.layers.<i>.<linear>.adapter.linear_in|out.weight`.
The TP layout is Megatron-Bridge's `ParallelLinearAdapter`: linear_in (A) is a ColumnParallelLinear over r for a
column-parallel base (qkv, fc1: rows split) and a RowParallelLinear for a row-parallel one (proj, fc2: input columns
split); linear_out (B) is always a ColumnParallelLinear (rows split; fc1's keep [gate_i; up_i] per rank, like its base);
adapters of replicated bases (MLA down projections) are not split."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from hubexport.errors import CheckpointError
from hubexport.jsonfile import read_json_object
from hubexport.mcore_lora import ADAPTER_RE, is_mcore_lora
from hubexport.sources import CombinedSource, Source
from hubexport.sources.mcore_legacy import (
    LAYER_RE,
    REPLICATED,
    Coord,
    RankSource,
    gate_up_from_tp_shards,
    load_rank_file,
    rank_coord,
)

ADAPTER_FILE_RE = re.compile(r"^(mp_rank_\d{2}(?:_\d{3})?(?:_\d{3})?)_adapter\.pt$")
ROW_PARALLEL_BASES = ("linear_proj", "linear_fc2")
SIZE_KEYS = {"tp": "tensor_model_parallel_size", "pp": "pipeline_model_parallel_size",
             "ep": "expert_model_parallel_size"}


def adapter_tp_merge(name: str, shards: list[torch.Tensor], *, gated: bool = True) -> torch.Tensor:
    """One adapter matrix from its TP shards (ParallelLinearAdapter's layout, module docstring)."""
    m = ADAPTER_RE.match(name)
    if m is None or len(shards) == 1 or any(r in m.group("module") for r in REPLICATED):
        return shards[0]
    base = m.group("module").rsplit(".", 1)[-1]
    if m.group("part") == "linear_in":
        return torch.cat(shards, dim=1 if base in ROW_PARALLEL_BASES else 0)
    if base == "linear_fc1" and gated:
        return gate_up_from_tp_shards(shards)
    return torch.cat(shards, dim=0)


def adapter_files(adapter_dir: Path, parallel: dict[str, int]) -> list[Path]:
    """The rank files, one per (tp, pp, ep) rank of the run: none missing, none beyond the recorded sizes."""
    found: dict[Coord, Path] = {}
    for p in sorted(adapter_dir.iterdir()):
        m = ADAPTER_FILE_RE.match(p.name)
        if m:
            found[rank_coord(m.group(1), parallel)] = p  # type: ignore[index]  # the regex guarantees a coord
    if not found:
        raise CheckpointError(f"{adapter_dir} holds no mp_rank_*_adapter.pt file", hint="re-copy adapter_checkpoint/")
    for i, key in enumerate(("tp", "pp", "ep")):
        stray = next(((c, p) for c, p in found.items() if key in parallel and c[i] >= parallel[key]), None)
        if stray is not None:
            raise CheckpointError(f"{stray[1]} is {key} rank {stray[0][i]} but transformer_config.json says "
                                  f"{SIZE_KEYS[key]}={parallel[key]}",
                                  hint="the folder mixes rank files of runs with different parallel sizes; keep one")
    sizes = [max(parallel.get(k, 1), max(c[i] for c in found) + 1) for i, k in enumerate(("tp", "pp", "ep"))]
    for t in range(sizes[0]):
        for p in range(sizes[1]):
            for e in range(sizes[2]):
                if (t, p, e) not in found:
                    name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if sizes[1] > 1 else "") + (f"_{e:03d}" if sizes[2] > 1 else "")
                    raise CheckpointError(f"{adapter_dir / (name + '_adapter.pt')} is missing",
                                          hint="the adapter checkpoint is incomplete; re-copy adapter_checkpoint/")
    return [found[c] for c in sorted(found)]


def _adapter_state(path: Path) -> list[dict]:
    obj = load_rank_file(path)
    sd = obj.get("adapter_state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) and ".adapter." in k
                                                     for k, v in sd.items()):
        what = f"keys {sorted(map(str, obj))[:4]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        if isinstance(sd, dict) and not sd:
            what = "an empty adapter_state_dict"
        raise CheckpointError(f"{path} is not a Megatron adapter state dict ({what})",
                              hint="verl's adapter rank files hold {'adapter_state_dict': {'<linear>.adapter.…': "
                                   "tensor}}; re-copy adapter_checkpoint/ from the run")
    return [sd]


def stage_sizes(tc: dict, pp_n: int, where: Path) -> list[int]:
    """Decoder layers per pipeline stage, as megatron-core splits them (even, or uneven first/last stages)."""
    if pp_n == 1:
        return [int(tc.get("num_layers") or 0)]
    if tc.get("pipeline_model_parallel_layout") or tc.get("account_for_embedding_in_pipeline_split") \
            or tc.get("account_for_loss_in_pipeline_split"):
        raise CheckpointError(f"{where} sets a custom pipeline layout hubexport cannot place adapter layers in",
                              hint="re-save the step with checkpoint.use_dist_checkpointing=True")
    total, first, last = tc.get("num_layers"), tc.get("num_layers_in_first_pipeline_stage"), \
        tc.get("num_layers_in_last_pipeline_stage")
    if not isinstance(total, int):
        raise CheckpointError(f"{where} has no num_layers", hint="copy the run's transformer_config.json back")
    middle = pp_n - (first is not None) - (last is not None)
    rest = total - (first or 0) - (last or 0)
    if (middle and rest % middle) or (not middle and rest):
        raise CheckpointError(f"{where}: {total} layers do not split over {pp_n} pipeline stages",
                              hint="the file does not match the checkpoint; copy the run's transformer_config.json")
    each = rest // middle if middle else 0
    return [first if p == 0 and first is not None else last if p == pp_n - 1 and last is not None else each
            for p in range(pp_n)]


class AdapterSource(RankSource):
    """adapter_checkpoint/'s rank files as global adapter tensors (module docstring)."""

    def __init__(self, root: Path, files: list[Path], parallel: dict[str, int]) -> None:
        tc_path = root / "transformer_config.json"
        tc = read_json_object(tc_path) if tc_path.is_file() else {}
        if (tc.get("virtual_pipeline_model_parallel_size") or 1) > 1:
            raise CheckpointError(f"{tc_path} says virtual pipeline size {tc['virtual_pipeline_model_parallel_size']}: "
                                  f"verl saved only the first model chunk's adapters in {files[0].parent}",
                                  hint="re-save the step with checkpoint.use_dist_checkpointing=True")
        coords = [rank_coord(f.name.removesuffix("_adapter.pt"), parallel) for f in files]
        tp_n, pp_n = (max(c[i] for c in coords) + 1 for i in (0, 1))  # type: ignore[index]
        if pp_n > 1 and not tc:
            raise CheckpointError(f"{tc_path} is missing: the layer numbers of {pp_n} pipeline stages' adapters cannot "
                                  "be made global", hint="copy transformer_config.json from the run next to "
                                                         "adapter_checkpoint/")
        sizes = stage_sizes(tc, pp_n, tc_path)
        data = [_adapter_state(f) for f in files]
        AdapterSource._check_stages(files, coords, data, sizes)
        offsets = {(0, p): sum(sizes[:p]) for p in range(pp_n)}
        merge = functools.partial(adapter_tp_merge, gated=tc.get("gated_linear_unit", True) is not False)
        super().__init__(files, coords, data, offsets, tp_n, merge=merge)  # type: ignore[arg-type]

    @staticmethod
    def _check_stages(files: list[Path], coords, data: list[list[dict]], sizes: list[int]) -> None:
        for f, (_, p, _), [sd] in zip(files, coords, data, strict=True):
            local = max((int(m.group(2)) for k in sd if (m := LAYER_RE.match(k))), default=-1)
            if sizes[p] and local >= sizes[p]:
                raise CheckpointError(f"{f} has adapters on local layer {local}, but pipeline stage {p} holds "
                                      f"{sizes[p]} layers", hint="transformer_config.json does not match the checkpoint")


def with_rank_adapters(layout, source: Source) -> Source:
    """A torch_dist that holds the base model but not its adapters gets them from adapter_checkpoint/."""
    adapter = layout.adapter
    if adapter is None or not adapter.is_dir() or is_mcore_lora(source.metas()):
        return source
    files = adapter_files(adapter, layout.parallel)
    return CombinedSource(source, AdapterSource(layout.root, files, layout.parallel))
