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
from dataclasses import dataclass, field
from pathlib import Path

from hubexport.sources.shards import MeshPlacement, covering_coords, local_region, one_run, row_major_strides
from hubexport.sources.torchsave import ITEMSIZE, Archive, Stub, Tensor, Unreadable, Wrapper, read_archive

Run = tuple[int, int, int]  # (index of the rank file, file offset, length)


@dataclass(frozen=True, slots=True)
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


@dataclass(eq=False, frozen=True)
class _Geometry:
    """A DTensor's mesh and placements, shared by the tensors laid alike: which rank holds which piece."""

    mesh_shape: tuple[int, ...]
    placements: tuple[MeshPlacement, ...]
    covering: dict[int, tuple[int, ...]]  # rank → its mesh coordinate, for the ranks holding each element once


@dataclass(slots=True)
class _Found:
    """A tensor as rank 0 describes it, and its runs as each rank file is read."""

    shape: tuple[int, ...]
    dtype: str
    geometry: _Geometry | None  # None: a plain tensor every rank holds whole
    # plain: each rank's run; DTensor: (its first element in the tensor, *its run), flat (~150 bytes a piece)
    pieces: list = field(default_factory=list)

    def located(self) -> Located | None:
        if self.geometry is None:
            return Located(self.shape, self.dtype, tuple(self.pieces[:1]), tuple(self.pieces[1:]))
        self.pieces.sort()
        if sum(n for *_, n in self.pieces) != math.prod(self.shape) * ITEMSIZE[self.dtype]:
            return None
        return Located(self.shape, self.dtype, tuple(piece[1:] for piece in self.pieces))


@functools.lru_cache(maxsize=1)
def _locate(stamps: tuple[tuple[str, int, int, int], ...]) -> dict[str, Located] | None:
    """One rank file at a time, each let go once its runs are taken: at most one file's unpickled stand-ins are held,
    whatever the world size."""
    found: dict[str, _Found] | None = None  # rank 0's file fills it
    for rank, (path, *_) in enumerate(stamps):
        found = _take_file(Path(path), rank, len(stamps), found)
        if found is None:
            return None
    out = {}
    for name in list(found):  # each tensor's pieces let go as its runs are made
        located = found.pop(name).located()
        if located is None:
            return None
        out[name] = located
    return out


def _take_file(path: Path, rank: int, world: int, found: dict[str, _Found] | None) -> dict[str, _Found] | None:
    """Rank file `rank`'s runs added to `found` (made from rank 0's file, which says what each tensor is); None when
    the file is not as simple."""
    try:
        archive = read_archive(path, slim=_local)
    except (Unreadable, OSError):
        return None
    if not isinstance(archive.obj, dict):
        return None
    if rank == 0:
        found = _described(archive, world)
    if found is None or archive.obj.keys() != found.keys():
        return None
    return found if all(_take(archive, rank, archive.obj[name], t) for name, t in found.items()) else None


@dataclass(frozen=True, slots=True)
class _Local:
    """A rank file's DTensor as far as locating reads it, made as soon as it is unpickled: its stand-ins (spec,
    placements, local tensor, storage: ~450 bytes) go at once, not when the file's ~2,000 tensors are all read."""

    shape: tuple[int, ...]
    dtype: str
    mesh: Stub  # shared by the file's tensors
    laid: tuple[MeshPlacement, ...] | None  # None: a placement other than Shard(dim) or Replicate
    saved_by: object  # the rank the mesh says saved it (None: not recorded)
    local_shape: tuple[int, ...] | None  # None: the local tensor is not a plain tensor of the DTensor's dtype
    where: tuple[int, int] | None  # (file offset, length) of the local tensor's bytes


def _local(t: Wrapper, archive: Archive) -> _Local | None:
    """The DTensor's mesh, placements and local piece; None for anything that is not a DTensor with a spec."""
    spec = t.spec
    mesh = spec.get("mesh") if isinstance(spec, Stub) else None
    if t.cls.kind != "DTensor" or not isinstance(mesh, Stub):
        return None
    lt = t.local
    plain = isinstance(lt, Tensor) and lt.dtype == t.dtype
    return _Local(t.shape, t.dtype, mesh, _laid(spec.get("placements"), len(t.shape)), mesh.get("_rank"),
                  lt.shape if plain else None, archive.byte_range(lt) if plain and lt.numel else None)


def _laid(placements: object, ndim: int) -> tuple[MeshPlacement, ...] | None:
    if not isinstance(placements, tuple) or not placements:
        return None
    laid = []
    for p in placements:
        if not isinstance(p, Stub) or p.kind not in ("Shard", "Replicate"):
            return None
        if p.kind == "Shard" and not (isinstance(p.get("dim"), int) and ndim and -ndim <= p.get("dim") < ndim):
            return None
        laid.append(MeshPlacement("shard", p.get("dim") % ndim) if p.kind == "Shard" else MeshPlacement("replicate"))
    return _one_laying(tuple(laid))


_one_laying = functools.lru_cache(maxsize=64)(tuple)  # one object per distinct laying, not one per tensor


def _described(archive: Archive, world: int) -> dict[str, _Found] | None:
    """Each tensor of rank 0's file: its shape, dtype and, for a DTensor, the geometry its spec gives."""
    out, geometries = {}, {}
    for name, t in archive.obj.items():
        if isinstance(t, Tensor):
            out[name] = _Found(t.shape, t.dtype, None)
            continue
        if not isinstance(t, _Local) or t.dtype not in ITEMSIZE or t.laid is None:
            return None
        key = (id(t.mesh), t.laid)
        if key not in geometries:  # the file's tensors share one mesh object, whose ranks are read once
            geometries[key] = _new_geometry(archive, t.mesh, t.laid, world)
        if geometries[key] is None:
            return None
        out[name] = _Found(t.shape, t.dtype, geometries[key])
    return out


def _take(archive: Archive, rank: int, local: object, t: _Found) -> bool:
    """Add this rank's run of the tensor, if it holds one; False when its piece is not what rank 0 describes."""
    if t.geometry is None:
        where = archive.byte_range(local) if isinstance(local, Tensor) else None
        if where is None or (local.shape, local.dtype) != (t.shape, t.dtype):
            return False
        t.pieces.append((rank, *where))
        return True
    coord = t.geometry.covering.get(rank)
    if coord is None:
        return True  # a replica of pieces other ranks hold (HSDP)
    if not isinstance(local, _Local) or (local.shape, local.dtype) != (t.shape, t.dtype):
        return False
    if local.saved_by not in (None, rank):
        return False
    offsets, sizes = local_region(t.shape, t.geometry.mesh_shape, coord, t.geometry.placements)
    if local.local_shape != sizes:
        return False
    if not one_run(t.shape, offsets, sizes):
        return False  # not a run of the global tensor's bytes: assembled in memory by the torch source
    if math.prod(sizes):
        if local.where is None:
            return False
        first = sum(o * s for o, s in zip(offsets, row_major_strides(t.shape), strict=True))
        t.pieces.append((first, rank, *local.where))
    return True


def _new_geometry(archive: Archive, mesh: Stub, placements: tuple[MeshPlacement, ...], world: int) -> _Geometry | None:
    grid = _mesh_ranks(archive, mesh)
    if grid is None or len(grid[1]) != len(placements):
        return None
    coords = covering_coords(grid[1], placements)
    covering = {grid[0][c]: c for c in coords}
    if len(covering) != len(coords) or any(not 0 <= r < world for r in covering):
        return None
    return _Geometry(grid[1], placements, covering)


def _mesh_ranks(archive: Archive, mesh: Stub) -> tuple[dict[tuple[int, ...], int], tuple[int, ...]] | None:
    """Each mesh coordinate's rank. torch < 2.9 pickles the mesh tensor itself; later releases a flat rank map and
    one (size, stride) layout per mesh dimension over it."""
    if isinstance(mesh.get("mesh"), Tensor):  # contiguous (else _ints refuses it): its elements in row-major order
        t = mesh.get("mesh")
        values, shape = _ints(archive, t), t.shape
        stride = row_major_strides(shape)
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
