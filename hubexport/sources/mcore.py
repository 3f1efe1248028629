"""Megatron-core `torch_dist` checkpoints as a Source of per-layer, per-expert logical tensors.

On disk, homogeneous models stack layers into one key with a leading layer axis (`decoder.layers.<suffix>` [L, ...]) and
grouped experts add an expert axis (`...mlp.experts.experts.<w>` [L, E, ...]); non-homogeneous models (DeepSeek-V3)
write `decoder.layers.<i>.<suffix>` (formats doc §3.3). This source presents every model as megatron's own in-memory
names with global numbers: `decoder.layers.<i>.<suffix>` and `decoder.layers.<i>.mlp.experts.local_experts.<j>.<w>`,
so mappings never see the storage layout and a read costs one layer (or one expert) of bytes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubexport.core import FileSlices, TensorSpec
from hubexport.errors import CheckpointError
from hubexport.sources import Source
from hubexport.sources.dcp import (
    Blobs,
    DcpTensor,
    Piece,
    Region,
    itemsize,
    open_checked,
    read_metadata,
    read_region,
    region_bytes,
    region_pieces,
    region_runs,
    tensor_index,
)

if TYPE_CHECKING:
    import torch

NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "lr_scheduler", "common_state")
GROUPED_EXPERTS = ".mlp.experts.experts."
EXPERTS = ".mlp.experts.local_experts."


@dataclass(frozen=True)
class _Entry:
    key: str  # the on-disk DCP key
    lead: tuple[int, ...]  # indices on its leading (layer, expert) axes


def _is_model_key(key: str) -> bool:
    return not key.startswith(NON_MODEL_PREFIXES) and "_extra_state" not in key


def _stacked_axis(parts: list[str]) -> int | None:
    """Position of `layers` when the next part is not a layer number (a stacked key), else None."""
    for i, p in enumerate(parts[:-1]):
        if p == "layers":
            return None if parts[i + 1].isdigit() else i
    return None


def _logical_names(t: DcpTensor) -> dict[str, tuple[_Entry, tuple[int, ...]]]:
    """Logical name → (where it is on disk, its shape)."""
    parts = t.key.split(".")
    pos = _stacked_axis(parts)
    layers: list[tuple[str, tuple[int, ...]]]  # (name with the layer, lead so far)
    shape = t.shape
    if pos is not None:
        pre, suf = ".".join(parts[: pos + 1]), ".".join(parts[pos + 1:])
        layers = [(f"{pre}.{i}.{suf}", (i,)) for i in range(shape[0])]
        shape = shape[1:]
    else:
        layers = [(t.key, ())]
    out = {}
    for name, lead in layers:
        if GROUPED_EXPERTS in name:
            pre, w = name.split(GROUPED_EXPERTS)
            for j in range(shape[0]):
                out[f"{pre}{EXPERTS}{j}.{w}"] = (_Entry(t.key, (*lead, j)), shape[1:])
        else:
            out[name] = (_Entry(t.key, lead), shape)
    return out


def model_tensor_keys(dist_dir: Path) -> list[str]:
    """The model tensor keys of a torch_dist directory, from its metadata alone."""
    return [k for k in tensor_index(read_metadata(Path(dist_dir), dtype_names=True)) if _is_model_key(k)]


class TorchDistSource(Source):
    """`dtype_names`: specs and metadata carry dtype names, and torch is never imported (the torch-free merge reads
    byte runs only, `slices`)."""

    def __init__(self, dist_dir: Path, *, dtype_names: bool = False) -> None:
        self.dir = Path(dist_dir)
        check_complete(self.dir)
        md, index = open_checked(self.dir, "dist_ckpt/", dtype_names=dtype_names)  # a cut-short .distcp: named now
        mcore_data = getattr(md, "mcore_data", None) or {}
        self._tensors: dict[str, DcpTensor] = {}
        self._entries: dict[str, _Entry] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._fds: dict[str, int] = {}
        self._pieces: dict[str, list[Piece] | None] = {}  # the last tensor asked for
        self._blobs: Blobs = {}
        for key, t in index.items():
            if not _is_model_key(key):
                continue
            if isinstance(mcore_data.get(key), dict) and "nd_reformulated_orig_global_shape" in mcore_data[key]:
                raise CheckpointError(
                    f"{key} in {self.dir} is an N-D flattened (distributed-optimizer) tensor, not a model weight",
                    hint="point --local-dir at the checkpoint holding the model (dist_ckpt with model weights), "
                         "not an optimizer-only archive",
                )
            self._tensors[key] = t
            for name, (entry, shape) in _logical_names(t).items():
                self._entries[name] = entry
                self._specs[name] = TensorSpec(name, tuple(shape), t.dtype)
        if not self._specs:
            what = "optimizer state only" if any(k.startswith("optimizer.") for k in index) else "no tensors"
            raise CheckpointError(
                f"{self.dir} holds no model tensors ({what})",
                hint="with verl's mbridge default the weights are HF safetensors in huggingface/; if that folder has "
                     "none, the run did not save model weights (set checkpoint.save_contents to include 'model')",
            )

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(name)
        return read_region(self.dir, self._tensors[entry.key], entry.lead)

    def slices(self, name: str) -> FileSlices | None:
        """Where the tensor's bytes already lie back to back in the .distcp files (copied file to file by the
        writer); None when they do not (a row-parallel weight split along its columns by TP...)."""
        pieces = self.pieces(name)
        runs = None if pieces is None else region_runs(self._specs[name].shape, self._itemsize(name), pieces)
        return None if runs is None else FileSlices(tuple((self._fd(f), o, n) for f, o, n in runs))

    def pieces(self, name: str) -> list[Piece] | None:
        """Where each stored chunk's part of the tensor lies (their headers read, no data, each chunk's once); None
        when torch must load them (`read`)."""
        known = self._pieces  # a group's outputs ask for the same input one after another
        if name not in known:  # (each caller reads its own dict: the fast path's writers call from several threads)
            entry = self._entries[name]
            known = self._pieces = {name: region_pieces(self.dir, self._tensors[entry.key], entry.lead, self._blobs)}
        return known[name]

    def region(self, name: str) -> Region | None:
        """The tensor's bytes to paste in memory without torch (when they are not runs of file bytes: `slices`)."""
        pieces = self.pieces(name)
        if pieces is None:
            return None
        shape, size = self._specs[name].shape, self._itemsize(name)
        return Region(math.prod(shape) * size, lambda: region_bytes(self._fd, shape, size, pieces))

    def _itemsize(self, name: str) -> int:
        return itemsize(self._tensors[self._entries[name].key].dtype)

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            fd = os.open(self.dir / file, os.O_RDONLY)
            if self._fds.setdefault(file, fd) != fd:  # another thread opened it meanwhile
                os.close(fd)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def check_complete(dist_dir: Path) -> None:
    """megatron writes metadata.json after the data: without it the save did not finish."""
    if not dist_dir.is_dir():
        raise CheckpointError(f"{dist_dir} does not exist", hint="point --local-dir at global_step_N/actor")
    if not (dist_dir / "metadata.json").is_file():
        raise CheckpointError(
            f"{dist_dir / 'metadata.json'} is missing: the torch_dist save did not finish",
            hint="use an earlier global_step_N, or re-copy the directory if the copy was cut short",
        )
    try:
        cfg = json.loads((dist_dir / "metadata.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{dist_dir / 'metadata.json'} is not valid JSON: {e}", hint="re-copy dist_ckpt/") from e
    backend = cfg.get("sharded_backend")
    if backend not in (None, "torch_dist"):
        raise CheckpointError(f"{dist_dir} uses the {backend!r} backend; only torch_dist is supported",
                              hint="re-save with dist_checkpointing's torch_dist format")
    if not (dist_dir / ".metadata").is_file():
        raise CheckpointError(f"{dist_dir / '.metadata'} is missing",
                              hint="the torch_dist checkpoint is incomplete; re-copy dist_ckpt/")


def open_megatron_source(layout) -> Source:
    """The Source for a detected Megatron Layout (v1/v2 torch_dist, v0 mp_rank files, verl <= 0.8's adapter rank files,
    Megatron-FSDP's fsdp_dtensor, mbridge HF safetensors)."""
    if layout.version in ("v1", "v2"):
        from hubexport.sources.mcore_adapter import with_rank_adapters

        return with_rank_adapters(layout, TorchDistSource(layout.files[0]))
    if layout.version == "v1-adapter":
        from hubexport.sources.mcore_adapter import AdapterSource

        return AdapterSource(layout.root, layout.files, layout.parallel)
    if layout.version == "v0":
        from hubexport.sources.mcore_legacy import LegacySource

        tied = False
        if layout.hf_dir is not None and (layout.hf_dir / "config.json").is_file():
            tied = bool(json.loads((layout.hf_dir / "config.json").read_text()).get("tie_word_embeddings", False))
        return LegacySource(layout.files, layout.parallel, tied=tied)
    if layout.version == "fsdp_dtensor":
        from hubexport.sources.mcore_fsdp import FsdpDtensorSource

        return FsdpDtensorSource(layout.files[0])
    if layout.version == "mbridge":
        from hubexport.sources.hf import SafetensorsSource

        return SafetensorsSource(layout.files[0])
    raise CheckpointError(f"unknown Megatron layout {layout.version!r}", hint="this is a bug; please report it")
