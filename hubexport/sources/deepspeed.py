"""DeepSpeed ZeRO 1/2/3 checkpoints (`global_stepN/[bf16_]zero_pp_rank_R_mp_rank_00_{optim,model}_states.pt`,
`mp_rank_00_model_states.pt`) as a Source of the fp32 state dict DeepSpeed's own `zero_to_fp32.py` rebuilds:
trained parameters from the flat fp32 optimizer partitions (zero_geometry), frozen parameters and buffers from the
model states, tied aliases from `shared_params`. Files are memory-mapped with weights_only=True (the few DeepSpeed
classes the pickles name are stood in for by plain records, never imported), and a tensor's bytes are read only
when it is. Floating tensors come out in the master weights' dtype (fp32): lossless, and one dtype for the folder.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch

from hubexport.core import TensorSpec
from hubexport.detect_deepspeed import RECOPY
from hubexport.errors import CheckpointError
from hubexport.sources.pages import MappedFiles
from hubexport.sources.zero_geometry import Piece, zero3_partition_numel, zero3_pieces, zero12_pieces

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # a DDP-style wrapper, torch.compile


class _Record:
    """Stands in for a pickled DeepSpeed object (loss scaler, fragment address): its attributes, nothing run."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


_STAND_INS = [
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # an IntEnum: ZeroStageEnum(3) → 3
    (str, "deepspeed.runtime.fp16.loss_scaler.LossScaleProfile"),  # a str Enum
    *((_Record, f"deepspeed.runtime.fp16.loss_scaler.{n}") for n in ("LossScaler", "DynamicLossScaler",
                                                                         "LossScalerBase")),
    (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def load_ds_file(path: Path) -> dict[str, Any]:
    """One DeepSpeed state file without running code: weights_only, tensors memory-mapped and not read."""
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global; torch's text names it after "error:"
        why = " ".join(str(e).split("WeightsUnpickler error:")[-1].split())[:160]
        raise CheckpointError(f"{path} contains objects other than DeepSpeed's state ({why})",
                              hint="it was refused unread (weights_only loading): not a DeepSpeed checkpoint, or "
                                   "from a DeepSpeed version hubexport does not know") from None
    except Exception as e:  # a damaged zip or pickle fails in many ways (RuntimeError, EOFError, ...)
        text = " ".join(str(e).split())
        raise CheckpointError(f"{path} is truncated or corrupt ({text[:120] or type(e).__name__})",
                              hint=f"the copy is incomplete; {RECOPY}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a DeepSpeed state dict", hint=RECOPY)
    return obj


def optim_state(path: Path, sd: dict[str, Any]) -> dict[str, Any]:
    osd = sd.get("optimizer_state_dict")
    if not isinstance(osd, dict):
        raise CheckpointError(f"{path} has no optimizer_state_dict", hint="pass a DeepSpeed ZeRO checkpoint")
    return osd


def zero_stage(path: Path, osd: dict[str, Any]) -> int:
    stage = osd.get("zero_stage")
    if stage not in (1, 2, 3):
        raise CheckpointError(
            f"{path} records ZeRO stage {stage!r}" if stage is not None else f"{path} records no ZeRO stage",
            hint="hubexport reads ZeRO 1, 2 and 3 optimizer partitions; a DeepSpeed run without ZeRO (bf16 "
                 "optimizer, stage 0) keeps its weights in mp_rank_00_model_states.pt: export them with "
                 "save_pretrained")
    return int(stage)


def _partition_counts(osd: dict[str, Any]) -> set[int]:
    counts = osd.get("partition_count")
    return set(counts) if isinstance(counts, list) else {counts}


def _shapes(path: Path, model: dict[str, Any]) -> list[dict[str, tuple[int, ...]]]:
    groups = model.get("param_shapes")
    if not isinstance(groups, list):
        raise CheckpointError(f"{path} has no param_shapes: it is not the model state of a ZeRO checkpoint",
                              hint="pass the folder DeepSpeed's save_checkpoint wrote (with its global_stepN/)")
    return [{str(k): tuple(v) for k, v in g.items()} for g in groups]


def common_prefix(names: list[str]) -> str:
    """A wrapper's prefix every name carries (`module.` of a DDP-style wrapper, torch.compile's `_orig_mod.`)."""
    return next((p for p in WRAPPER_PREFIXES if names and all(n.startswith(p) for n in names)), "")


def open_deepspeed_source(layout) -> DeepSpeedSource:
    """The Source for a detected Layout: its files are the model states, then one optimizer file per rank."""
    world_size = layout.parallel["world_size"]
    return DeepSpeedSource(layout.root, layout.files[:-world_size], layout.files[-world_size:])


class DeepSpeedSource:
    def __init__(self, tag_dir: Path, model_files: list[Path], optim_files: list[Path]) -> None:
        self.dir = Path(tag_dir)
        self.notes: list[str] = []
        self.world_size = len(optim_files)
        self.optim_files = optim_files
        self._optim = [optim_state(p, load_ds_file(p)) for p in optim_files]
        self.stage = zero_stage(optim_files[0], self._optim[0])
        self._check_consistent()
        models = [load_ds_file(p) for p in model_files]
        self._check_models(model_files, models)
        self._pages = MappedFiles(optim_files + model_files)
        key = "single_partition_of_fp32_groups" if self.stage < 3 else "fp32_flat_groups"
        self._flat = [self._flat_groups(p, o, key) for p, o in zip(optim_files, self._optim, strict=True)]
        self.master_dtype = self._flat[0][0].dtype if self._flat[0] else torch.float32
        shapes = _shapes(model_files[0], models[0])
        self._trained: dict[str, tuple[tuple[int, ...], list[Piece]]] = self._place(shapes)
        self._stored: dict[str, torch.Tensor | list[torch.Tensor]] = {}  # frozen params and buffers
        self._frozen_shapes: dict[str, tuple[int, ...]] = {}  # ZeRO 2/3's record of the frozen parameters
        self._add_frozen_and_buffers(model_files[0], models, shapes)
        self._aliases = self._shared(models[0])
        self._names = self._public_names()

    # -- checks ---------------------------------------------------------------------------------------------
    def _check_consistent(self) -> None:
        first = self._optim[0]
        counts = [_partition_counts(osd) for osd in self._optim]
        if all(c == counts[0] for c in counts) and len(counts[0]) == 1 and min(counts[0]) > self.world_size:
            missing = self.optim_files[0].name.replace("zero_pp_rank_0_", f"zero_pp_rank_{self.world_size}_")
            raise CheckpointError(f"rank file {self.dir / missing} is missing (the save had {min(counts[0])} ranks)",
                                  hint=f"the save did not finish or the copy is incomplete; {RECOPY}")
        for path, osd, count in zip(self.optim_files, self._optim, counts, strict=True):
            if count != {self.world_size}:
                raise CheckpointError(
                    f"{path} was saved by a run of {'/'.join(map(str, sorted(count)))} data-parallel ranks, but "
                    f"{self.dir} holds {self.world_size} optimizer files",
                    hint=f"two saves of different world sizes were mixed in one folder; {RECOPY} from one run")
            if zero_stage(path, osd) != self.stage or osd.get("ds_version") != first.get("ds_version"):
                raise CheckpointError(f"{path} comes from another save than {self.optim_files[0].name} (ZeRO stage "
                                      "or DeepSpeed version differ)", hint=f"{RECOPY} from one run")

    def _check_models(self, files: list[Path], models: list[dict[str, Any]]) -> None:
        for path, model in zip(files, models, strict=True):
            dp = model.get("dp_world_size")
            if isinstance(dp, int) and dp != self.world_size:
                raise CheckpointError(f"{path} was saved with dp_world_size={dp}, but {self.dir} holds "
                                      f"{self.world_size} optimizer files", hint=f"{RECOPY} from one run")
            if model.get("param_shapes") != models[0].get("param_shapes"):
                raise CheckpointError(f"{path} lists other parameters than {files[0].name}",
                                      hint=f"the model states come from different runs; {RECOPY}")

    def _flat_groups(self, path: Path, osd: dict[str, Any], key: str) -> list[torch.Tensor]:
        groups = osd.get(key)
        if not isinstance(groups, list) or not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in groups):
            raise CheckpointError(f"{path} has no {key} (the flat fp32 master weights of ZeRO {self.stage})",
                                  hint="the optimizer states are incomplete or from an unknown DeepSpeed version")
        return groups

    def _fail_geometry(self, e: ValueError) -> CheckpointError:
        return CheckpointError(f"{self.dir}: the optimizer partitions do not match the model states ({e})",
                               hint=f"the files come from different saves or were cut short; {RECOPY}")

    # -- where tensors live ---------------------------------------------------------------------------------
    def _place(self, shapes: list[dict[str, tuple[int, ...]]]) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
        sizes = [[t.numel() for t in groups] for groups in self._flat]
        if any(s != sizes[0] for s in sizes):
            raise CheckpointError(f"the optimizer files in {self.dir} hold partitions of different sizes",
                                  hint=f"they come from different saves; {RECOPY}")
        try:
            if self.stage == 3:
                merged = {n: s for group in shapes for n, s in group.items()}
                pieces = zero3_pieces([math.prod(s) for s in merged.values()], self.world_size, sizes[0])
                return {n: (s, p) for (n, s), p in zip(merged.items(), pieces, strict=True)}
            if len(shapes) != len(sizes[0]):
                raise ValueError(f"{len(shapes)} parameter groups but {len(sizes[0])} flat partitions")
            paddings = self._optim[0].get("param_alignment_paddings")
            out = {}
            for g, group in enumerate(shapes):
                pad = paddings[g] if isinstance(paddings, list) else None
                pieces = zero12_pieces([math.prod(s) for s in group.values()], pad, sizes[0][g], self.world_size, g)
                out.update((n, (s, p)) for (n, s), p in zip(group.items(), pieces, strict=True))
            return out
        except ValueError as e:
            raise self._fail_geometry(e) from None

    def _add_frozen_and_buffers(self, path: Path, models: list[dict[str, Any]], shapes: list[dict]) -> None:
        first = models[0]
        module = first.get("module") or {}
        for name in first.get("buffer_names") or []:
            if not isinstance(module.get(name), torch.Tensor):
                raise CheckpointError(f"{path} lists buffer {name} but its module holds no such tensor", hint=RECOPY)
            self._stored[name] = module[name]
        frozen = first.get("frozen_param_shapes")
        if frozen is None:  # ZeRO 1 records no frozen parameters: whole in the module copy, beside the buffers
            trained = {n for g in shapes for n in g}
            shared = set(first.get("shared_params") or {})
            frozen = {n: tuple(t.shape) for n, t in module.items()
                      if n not in trained and n not in self._stored and n not in shared and isinstance(t, torch.Tensor)}
            self._stored.update((n, module[n]) for n in frozen)
            return
        for name, shape in frozen.items():
            frags = [m.get("frozen_param_fragments", {}).get(name) for m in models]
            if any(f is None for f in frags):
                raise CheckpointError(f"{path} lists frozen parameter {name} but a model state file lacks it",
                                      hint=RECOPY)
            self._stored[name] = frags if self.stage == 3 else frags[0]
            self._frozen_shapes[name] = tuple(shape)

    def _shared(self, model: dict[str, Any]) -> dict[str, str]:
        """alias → canonical for tied parameters (the alias is not stored)."""
        return {str(a): str(c) for a, c in (model.get("shared_params") or {}).items() if c in self._trained
                or c in self._stored}

    def _public_names(self) -> dict[str, str]:
        """HF name → checkpoint name."""
        names = [*self._trained, *self._stored, *self._aliases]
        prefix = common_prefix(names)
        if prefix:
            self.notes.append(f"every parameter name starts with {prefix!r} (a wrapper module): removed")
        return {n.removeprefix(prefix): n for n in names}

    # -- Source ---------------------------------------------------------------------------------------------
    def _shape(self, key: str) -> tuple[int, ...]:
        if key in self._aliases:
            key = self._aliases[key]
        if key in self._trained:
            return self._trained[key][0]
        if key in self._frozen_shapes:
            return self._frozen_shapes[key]
        return tuple(self._stored[key].shape)  # type: ignore[union-attr]

    def _dtype(self, key: str) -> torch.dtype:
        key = self._aliases.get(key, key)
        if key in self._trained:
            return self.master_dtype
        stored = self._stored[key]
        dtype = (stored[0] if isinstance(stored, list) else stored).dtype
        return self.master_dtype if dtype.is_floating_point else dtype

    def metas(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(n, self._shape(k), self._dtype(k)) for n, k in self._names.items()}

    def read(self, name: str) -> torch.Tensor:
        key = self._aliases.get(self._names[name], self._names[name])
        if key in self._trained:
            shape, pieces = self._trained[key]
            return self._gather(key, pieces, math.prod(shape)).view(shape)
        stored = self._stored[key]
        if isinstance(stored, list):  # ZeRO 3 frozen: each rank's padded piece
            return self._unpad(key, stored).to(self._dtype(key))
        out = stored.to(self._dtype(key), copy=True)
        self._pages.release(stored)
        return out

    def _gather(self, key: str, pieces: list[Piece], numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=self.master_dtype)
        pos = 0
        for p in pieces:
            flat = self._flat[p.rank][p.group]
            if p.start + p.length > flat.numel():
                raise CheckpointError(f"{key} lies past the end of {self.optim_files[p.rank]}'s partition",
                                      hint=f"the file is cut short or from another save; {RECOPY}")
            take = min(p.length, numel - pos)
            if take > 0:
                out[pos:pos + take] = flat[p.start:p.start + take]
                pos += take
        self._release(pieces)
        return out

    def _unpad(self, key: str, frags: list[torch.Tensor]) -> torch.Tensor:
        numel = math.prod(self._frozen_shapes[key])
        per_rank = zero3_partition_numel(numel, self.world_size)
        if any(f.numel() != per_rank for f in frags):
            raise CheckpointError(f"the frozen parameter {key} has pieces of {[f.numel() for f in frags]} elements, "
                                  f"expected {per_rank} per rank", hint=f"the model states come from different saves; {RECOPY}")
        return torch.cat([f.reshape(-1) for f in frags])[:numel].view(self._frozen_shapes[key])

    def _release(self, pieces: list[Piece]) -> None:
        for rank, group in {(p.rank, p.group) for p in pieces}:
            self._pages.release(self._flat[rank][group])

    def close(self) -> None:
        self._flat.clear()
        self._optim.clear()
        self._stored.clear()
