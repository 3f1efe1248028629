"""verl FSDP rank files as byte ranges, without torch: for each tensor, the runs of rank-file bytes that are its
global bytes back to back (FSDP2's and FSDP1-with-a-mesh's Shard(0) DTensors on flat and HSDP meshes, and plain
tensors every rank holds whole). Anything else (Shard(d) of a tensor whose leading dims are not 1, _StridedShard,
Partial, padding, nested mesh layouts, a file torch's loader would refuse) is `None`: the torch source
(`sources/fsdp.py`) handles it, and raises its errors."""

from __future__ import annotations

import functools
import itertools
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from hubexport.sources.shards import MeshPlacement, covering_coords, local_region, one_run
from hubexport.sources.torchsave import ITEMSIZE, Archive, Stub, Tensor, Unreadable, Wrapper, read_archive

Run = tuple[int, int, int]  # (index of the rank file, file offset, length)


@dataclass(frozen=True)
class Located:
    shape: tuple[int, ...]
    dtype: str  # torch's dtype name
    runs: tuple[Run, ...]  # the tensor's bytes, in order
    replicas: tuple[Run, ...] = ()  # other ranks' copies of a plain tensor: must equal `runs` byte for byte

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def locate(files: list[Path]) -> dict[str, Located] | None:
    """Every tensor of the rank files, located; None when the files are not all of the simple kinds above. The fast
    path and then the full path ask for the same files: they are read once while unchanged (path, inode, size,
    mtime). Callers must not change what it returns."""
    try:
        stamps = tuple((str(f), st.st_ino, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)])
    except OSError:
        return None
    return _locate(stamps)


@functools.lru_cache(maxsize=1)
def _locate(stamps: tuple[tuple[str, int, int, int], ...]) -> dict[str, Located] | None:
    try:
        archives = [read_archive(Path(f)) for f, *_ in stamps]
    except (Unreadable, OSError):
        return None
    first = archives[0].obj
    if not isinstance(first, dict) or any(not isinstance(a.obj, dict) or a.obj.keys() != first.keys() for a in archives):
        return None
    out = {}
    for name, entry in first.items():
        found = _dtensor(archives, name, entry) if isinstance(entry, Wrapper) else _plain(archives, name, entry)
        if found is None:
            return None
        out[name] = found
    return out


def _plain(archives: list[Archive], name: str, t: object) -> Located | None:
    if not isinstance(t, Tensor):
        return None
    runs = []
    for i, a in enumerate(archives):
        other = a.obj[name]
        where = a.byte_range(other) if isinstance(other, Tensor) else None
        if where is None or (other.shape, other.dtype) != (t.shape, t.dtype):
            return None
        runs.append((i, *where))
    return Located(t.shape, t.dtype, tuple(runs[:1]), tuple(runs[1:]))


def _dtensor(archives: list[Archive], name: str, t: Wrapper) -> Located | None:
    spec = t.state.get("_spec")
    geometry = _mesh(archives[0], spec, len(t.shape)) if isinstance(spec, Stub) else None
    if t.cls.kind != "DTensor" or geometry is None or t.dtype not in ITEMSIZE:
        return None
    mesh, mesh_shape, placements = geometry
    pieces = []
    for coord in covering_coords(mesh_shape, placements):
        rank = mesh[coord]
        if rank >= len(archives):
            return None
        local = archives[rank].obj[name]
        if not isinstance(local, Wrapper) or local.shape != t.shape or not _saved_by(local, rank):
            return None
        lt = local.state.get("_local_tensor")
        offsets, sizes = local_region(t.shape, mesh_shape, coord, placements)
        if not isinstance(lt, Tensor) or lt.shape != sizes or lt.dtype != t.dtype:
            return None
        if not one_run(t.shape, offsets, sizes):
            return None  # not a run of the global tensor's bytes: assembled in memory by the torch source
        if lt.numel:
            where = archives[rank].byte_range(lt)
            if where is None:
                return None
            pieces.append((offsets, (rank, *where), lt.numel))
    pieces.sort()
    if sum(n for *_, n in pieces) != math.prod(t.shape):
        return None
    return Located(t.shape, t.dtype, tuple(run for _, run, _ in pieces))


def _saved_by(local: Wrapper, rank: int) -> bool:
    spec = local.state.get("_spec")
    mesh = spec.get("mesh") if isinstance(spec, Stub) else None
    saved = mesh.get("_rank") if isinstance(mesh, Stub) else None
    return saved is None or saved == rank


Mesh = tuple[dict[tuple[int, ...], int], tuple[int, ...], tuple[MeshPlacement, ...]]  # coord → rank, shape, placements


def _mesh(archive: Archive, spec: Stub, ndim: int) -> Mesh | None:
    """The device mesh (flat FSDP or HSDP's replicate × shard) and the placements along it; None for any other."""
    mesh, placements = spec.get("mesh"), spec.get("placements")
    if not isinstance(mesh, Stub) or not isinstance(placements, tuple) or not placements:
        return None
    out = []
    for p in placements:
        if not isinstance(p, Stub) or p.kind not in ("Shard", "Replicate"):
            return None
        if p.kind == "Shard" and not (isinstance(p.get("dim"), int) and ndim and -ndim <= p.get("dim") < ndim):
            return None
        out.append(MeshPlacement("shard", p.get("dim") % ndim) if p.kind == "Shard" else MeshPlacement("replicate"))
    grid = _mesh_ranks(archive, mesh)
    if grid is None or len(grid[1]) != len(out):
        return None
    return grid[0], grid[1], tuple(out)


def _mesh_ranks(archive: Archive, mesh: Stub) -> tuple[dict[tuple[int, ...], int], tuple[int, ...]] | None:
    """Each mesh coordinate's rank. torch < 2.9 pickles the mesh tensor itself; later releases a flat rank map and
    one (size, stride) layout per mesh dimension over it."""
    if isinstance(mesh.get("mesh"), Tensor):  # contiguous (else _ints refuses it): its elements in row-major order
        t = mesh.get("mesh")
        values, shape = _ints(archive, t), t.shape
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    else:
        rank_map, layout = mesh.get("_rank_map"), mesh.get("_layout")
        axes = layout.get("axes") if isinstance(layout, Stub) else None
        if not isinstance(rank_map, Tensor) or not isinstance(axes, tuple) or not all(isinstance(a, Stub) for a in axes):
            return None
        sizes, strides = [a.get("shape") for a in axes], [a.get("stride") for a in axes]
        if not all(isinstance(x, tuple) and len(x) == 1 and isinstance(x[0], int) for x in (*sizes, *strides)):
            return None  # a nested (hierarchical) layout
        values, shape, stride = _ints(archive, rank_map), tuple(x[0] for x in sizes), tuple(x[0] for x in strides)
    if values is None or not shape:
        return None
    grid = {}
    for coord in itertools.product(*(range(n) for n in shape)):
        at = sum(c * s for c, s in zip(coord, stride, strict=True))
        if not 0 <= at < len(values):
            return None
        grid[coord] = values[at]
    return grid, shape


def _ints(archive: Archive, t: Tensor) -> list[int] | None:
    where = archive.byte_range(t)
    code = {"int64": "q", "int32": "i"}.get(t.dtype)
    if where is None or code is None:
        return None
    with open(archive.path, "rb") as f:
        raw = os.pread(f.fileno(), where[1], where[0])
    return list(struct.unpack(f"<{t.numel}{code}", raw)) if len(raw) == where[1] else None
