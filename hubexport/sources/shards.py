"""Pure shard geometry: where a rank's local piece of a DTensor sits in the global tensor (torch.chunk semantics,
as DTensor's Shard placement uses), and which ranks are needed to cover it once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MeshPlacement:
    """How a DTensor is laid along one device-mesh dimension (torch's Shard/Replicate, as plain data)."""

    kind: str  # "shard" | "replicate" | "partial"
    dim: int = -1


def local_region(
    global_shape: tuple[int, ...], mesh_shape: tuple[int, ...], coord: tuple[int, ...], placements: tuple[MeshPlacement, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Offsets and sizes of the local tensor at mesh coordinate `coord`. Shards nest left to right over mesh dims,
    each chunking what the previous mesh dims left: chunk = ceil(size / n), trailing chunks smaller or empty."""
    offsets = [0] * len(global_shape)
    sizes = list(global_shape)
    for mesh_dim, p in enumerate(placements):
        if p.kind != "shard":
            continue
        n, c = mesh_shape[mesh_dim], coord[mesh_dim]
        size = sizes[p.dim]
        chunk = -(-size // n) if size else 0
        start = min(c * chunk, size)
        sizes[p.dim] = min(chunk, size - start)
        offsets[p.dim] += start
    return tuple(offsets), tuple(sizes)


def covering_coords(mesh_shape: tuple[int, ...], placements: tuple[MeshPlacement, ...]) -> list[tuple[int, ...]]:
    """Mesh coordinates that hold each element exactly once: index 0 along replicated mesh dims (one replica group,
    as in HSDP), every index along sharded ones."""
    coords: list[tuple[int, ...]] = [()]
    for n, p in zip(mesh_shape, placements, strict=True):
        span = range(n) if p.kind == "shard" else range(1)
        coords = [(*c, i) for c in coords for i in span]
    return coords


def one_run(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    """A region is one run of the global tensor's row-major bytes when it spans every dimension but one, and the
    dimensions before that one have size 1 (Shard(0), or Shard(1) of a [1, H] value head)."""
    cut = [i for i, (o, n, full) in enumerate(zip(offsets, sizes, shape, strict=True)) if o or n != full]
    return len(cut) <= 1 and all(shape[i] == 1 for i in range(cut[0] if cut else 0))



def row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Each dimension's stride, in elements, in a contiguous row-major tensor of `shape`."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return tuple(strides)


def box_runs(shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[int, list[int]]:
    """A box (offsets, sizes) of a row-major tensor of `shape` as runs of elements contiguous in both the box's own
    row-major order and the tensor's: (elements per run, each run's first element in the tensor), in box order.
    The dimensions from the last one the box cuts on are one run (a column block of a matrix: one run per row)."""
    cut = max((i for i, (o, n, full) in enumerate(zip(offsets, sizes, shape, strict=True)) if o or n != full),
              default=0)
    strides = row_major_strides(shape)
    run = 1
    for n in sizes[cut:]:
        run *= n
    starts = [sum(o * s for o, s in zip(offsets, strides, strict=True))]
    for n, stride in zip(sizes[:cut], strides[:cut], strict=True):
        starts = [base + i * stride for base in starts for i in range(n)]
    return run, starts
