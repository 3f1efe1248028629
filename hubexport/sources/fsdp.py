"""verl FSDP rank files (`model_world_size_W_rank_R.pt`): DTensors (FSDP1 with a mesh, FSDP2, HSDP) or plain tensors.
Files are memory-mapped with weights_only=True; a tensor is assembled from its shards only when it is read."""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from hubexport.core import FileSlices, TensorSpec
from hubexport.errors import CheckpointError
from hubexport.mapping.ops import same_bytes
from hubexport.sources.pages import MappedFiles
from hubexport.sources.shards import MeshPlacement, covering_coords, local_region


def _no_pg_warning(record: logging.LogRecord) -> bool:
    return "unpickling of the DeviceMesh" not in record.getMessage()


def load_rank_file(path: Path) -> dict[str, Any]:
    """Unpickle one rank file without running code: weights_only=True, tensors memory-mapped, not read."""
    import torch.distributed.tensor  # registers DTensor & co. with the weights-only unpickler)

    # Unpickling a DeviceMesh without process groups warns about torch.compile, which does not concern us.
    logging.getLogger("torch.distributed.device_mesh").addFilter(_no_pg_warning)
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        if "ShardedTensor" in str(e):
            raise CheckpointError(
                f"{path} holds legacy FSDP1 ShardedTensors (saved without a device mesh)",
                hint="re-save the checkpoint with a device mesh (verl always passes one) or with FSDP2",
            ) from None
        raise CheckpointError(
            f"{path} contains objects other than tensors and was refused (weights_only loading)",
            hint="a model rank file holds only tensors; this file may be malicious or not a model file",
        ) from None
    except Exception as e:  # a damaged pickle or zip fails in many ways (KeyError, struct.error, ...): all corrupt
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is truncated or corrupt ({first[:120]})",
            hint="re-copy the rank file from the training run; the copy is incomplete",
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path} is not a model state dict", hint="pass the model_world_size_*_rank_*.pt files")
    return sd


def replica_mismatch(name: str, first: Path, other: Path) -> CheckpointError:
    return CheckpointError(f"{name} differs between {first.name} and {other.name}",
                           hint="an unsharded tensor must be identical on every rank; the files are from different steps")


def _placements(t: Any, path: Path, name: str) -> tuple[MeshPlacement, ...]:
    out = []
    for p in t.placements:
        if p.is_shard():
            if type(p).__name__ != "Shard":  # _StridedShard: FSDP + TP interleaving
                raise CheckpointError(f"{name} in {path} uses {type(p).__name__} placement",
                                      hint="FSDP combined with tensor parallelism is not supported yet")
            out.append(MeshPlacement("shard", p.dim % t.ndim))
        elif p.is_replicate():
            out.append(MeshPlacement("replicate"))
        else:
            raise CheckpointError(f"{name} in {path} has a {p} placement (unreduced partial values)",
                                  hint="save the checkpoint from a model whose parameters are not Partial")
    return tuple(out)


class FsdpSource:
    def __init__(self, files: list[Path]) -> None:
        from torch.distributed.tensor import DTensor

        self._dtensor = DTensor
        self.files = files
        self._sds = [load_rank_file(f) for f in files]
        self._pages = MappedFiles(files)
        self._fds: dict[int, int] = {}
        first = self._sds[0]
        for path, sd in zip(files[1:], self._sds[1:], strict=True):
            if sd.keys() != first.keys():
                diff = sorted(set(first) ^ set(sd))
                raise CheckpointError(
                    f"{path} has different tensors from {files[0].name} (e.g. {diff[0]})",
                    hint="the rank files come from different checkpoints or models; re-copy one consistent step",
                )
        for rank, (path, sd) in enumerate(zip(files, self._sds, strict=True)):
            saved_by = next((getattr(t.device_mesh, "_rank", None) for t in sd.values() if isinstance(t, DTensor)), None)
            if saved_by is not None and saved_by != rank:
                raise CheckpointError(f"{path} holds the shards of rank {saved_by}, not rank {rank}",
                                      hint="a rank file was duplicated or renamed; re-copy the checkpoint")
        self._specs: dict[str, TensorSpec] = {}
        self._geometry: dict[str, tuple[tuple[int, ...], tuple[MeshPlacement, ...], torch.Tensor]] = {}
        for name, t in first.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{files[0]} entry {name} is a {type(t).__name__}, not a tensor",
                                      hint="pass a model rank file, not an optimizer or extra-state file")
            self._specs[name] = TensorSpec(name, tuple(t.shape), t.dtype)
            if isinstance(t, DTensor):
                mesh = t.device_mesh.mesh.cpu()
                self._geometry[name] = (tuple(mesh.shape), _placements(t, files[0], name), mesh)

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        if name not in self._geometry:
            return self._read_replicated(name)
        out = torch.empty(spec.shape, dtype=spec.dtype)
        for lt, offsets, sizes in self._pieces(name):
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))].copy_(lt)
            self._pages.release(lt)
        return out

    def slices(self, name: str) -> FileSlices | None:
        """Where the global tensor's bytes already lie back to back in the rank files (pieces split along dim 0
        only, as FSDP2's Shard(0), each stored contiguously): copied file to file by the writer. None otherwise."""
        if name not in self._geometry or not self._specs[name].shape:
            return None
        parts = []
        end = 0
        for lt, offsets, sizes in sorted(self._pieces(name), key=lambda p: p[1][0]):
            if lt.numel() == 0:
                continue
            where = self._pages.file_range(lt)
            if where is None or offsets[0] != end or any(offsets[1:]) or sizes[1:] != self._specs[name].shape[1:]:
                return None
            parts.append((self._fd(where[0]), where[1], lt.numel() * lt.element_size()))
            end += sizes[0]
        return FileSlices(tuple(parts))

    def _fd(self, rank: int) -> int:
        if rank not in self._fds:
            self._fds[rank] = os.open(self.files[rank], os.O_RDONLY)
        return self._fds[rank]

    def _pieces(self, name: str) -> list[tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]]:
        """Each rank's local tensor of a DTensor with its region in the global tensor, checked to cover it once."""
        spec = self._specs[name]
        mesh_shape, placements, mesh = self._geometry[name]
        pieces = []
        covered = 0
        for coord in covering_coords(mesh_shape, placements):
            rank = int(mesh[coord])
            if rank >= len(self._sds):
                raise CheckpointError(f"{name} lives on rank {rank} but only {len(self._sds)} rank files exist",
                                      hint="the checkpoint is incomplete; re-copy all rank files")
            local = self._sds[rank][name]
            if not isinstance(local, self._dtensor) or tuple(local.shape) != spec.shape:
                raise CheckpointError(
                    f"{name} in {self.files[rank]} does not match rank 0's global shape {list(spec.shape)}",
                    hint="the rank files come from different checkpoints; re-copy one consistent step",
                )
            lt = local._local_tensor
            offsets, sizes = local_region(spec.shape, mesh_shape, coord, placements)
            if tuple(lt.shape) != sizes or lt.dtype != spec.dtype:
                raise CheckpointError(
                    f"{name} in {self.files[rank]} has local shape {list(lt.shape)} {lt.dtype}, "
                    f"expected {list(sizes)} {spec.dtype} for a {list(spec.shape)} tensor",
                    hint="the shard is padded or from another checkpoint; re-save with current torch",
                )
            pieces.append((lt, offsets, sizes))
            covered += lt.numel()
        if covered != math.prod(spec.shape):
            raise CheckpointError(f"the shards of {name} cover {covered} of its elements",
                                  hint="the checkpoint is incomplete or inconsistent")
        return pieces

    def _read_replicated(self, name: str) -> torch.Tensor:
        """A plain tensor every rank holds whole (world size 1, or a buffer FSDP never shards): never concatenated;
        all copies must agree."""
        t = self._sds[0][name]
        for path, sd in zip(self.files[1:], self._sds[1:], strict=True):
            other = sd[name]
            if isinstance(other, self._dtensor) or not same_bytes(other, t):
                raise replica_mismatch(name, self.files[0], path)
            self._pages.release(other)
        out = t.clone()
        self._pages.release(t)
        return out

    def close(self) -> None:
        self._sds.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
