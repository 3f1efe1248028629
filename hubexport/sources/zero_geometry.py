"""Where each parameter lies in DeepSpeed ZeRO's flat fp32 partitions: pure arithmetic on element counts, no I/O.

ZeRO 1/2: a parameter group is one flat vector (each parameter back to back, followed by its alignment padding, the
group padded at the end), cut into `world_size` equal partitions; rank r saves [r·P, (r+1)·P) of it.
ZeRO 3: every parameter is cut on its own into ceil(n / W) elements per rank (the last rank's tail is padding), and
each rank saves its pieces back to back, possibly split over several sub-group tensors.
A parameter is then the concatenation of its `Piece`s, in order, cut to its numel (ZeRO 3 drops the padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    rank: int
    group: int  # index into that rank's list of flat tensors
    start: int  # element offset inside that tensor
    length: int


def _align(n: int, to: int) -> int:
    return to * math.ceil(n / to)


def zero12_offsets(numels: Sequence[int], paddings: Sequence[int] | None) -> tuple[list[int], int]:
    """(start of each parameter in its group's flat vector, end of the last one). `paddings` (saved since DeepSpeed
    0.19 as `param_alignment_paddings`) follow each parameter; older saves pack parameters without gaps."""
    if paddings is not None and len(paddings) != len(numels):
        raise ValueError(f"{len(paddings)} alignment paddings for {len(numels)} parameters")
    starts, offset = [], 0
    for i, n in enumerate(numels):
        starts.append(offset)
        offset += n + (paddings[i] if paddings is not None else 0)
    return starts, offset


def zero12_pieces(numels: Sequence[int], paddings: Sequence[int] | None, partition: int, world_size: int,
                  group: int) -> list[list[Piece]]:
    """The pieces of each parameter of one ZeRO 1/2 group whose ranks each saved `partition` elements. The filled
    length must equal the saved length up to DeepSpeed's 2·world_size alignment (zero_to_fp32's own check)."""
    starts, end = zero12_offsets(numels, paddings)
    saved = partition * world_size
    if _align(end, 2 * world_size) != _align(saved, 2 * world_size):
        raise ValueError(f"param group {group}: the parameters fill {end} elements but the partitions hold {saved}")
    return [_split(start, n, partition, group) for start, n in zip(starts, numels, strict=True)]


def _split(start: int, length: int, partition: int, group: int) -> list[Piece]:
    """A range of a flat vector cut into equal partitions, one per rank."""
    pieces, pos, end = [], start, start + length
    while pos < end:
        rank, offset = divmod(pos, partition)
        take = min(end - pos, partition - offset)
        pieces.append(Piece(rank, group, offset, take))
        pos += take
    return pieces


def zero3_partition_numel(numel: int, world_size: int) -> int:
    """Elements of one parameter on each rank (the last rank's tail is padding)."""
    return math.ceil(numel / world_size)


def zero3_pieces(numels: Sequence[int], world_size: int, group_sizes: Sequence[int]) -> list[list[Piece]]:
    """The pieces of each ZeRO 3 parameter, in the order the checkpoint lists them (all groups' param_shapes merged),
    given the element count of each of a rank's flat sub-group tensors (the same on every rank)."""
    per_rank = [zero3_partition_numel(n, world_size) for n in numels]
    if sum(per_rank) != sum(group_sizes):
        raise ValueError(f"the parameters need {sum(per_rank)} elements per rank but each rank saved {sum(group_sizes)}")
    bounds = [0]
    for size in group_sizes:
        bounds.append(bounds[-1] + size)
    out, offset = [], 0
    for pn in per_rank:
        out.append([p for rank in range(world_size) for p in _in_groups(rank, offset, pn, bounds)])
        offset += pn
    return out


def _in_groups(rank: int, start: int, length: int, bounds: list[int]) -> list[Piece]:
    """A range of one rank's concatenated sub-group tensors, as pieces of the tensors that hold it."""
    pieces = []
    for group in range(len(bounds) - 1):
        lo, hi = max(start, bounds[group]), min(start + length, bounds[group + 1])
        if lo < hi:
            pieces.append(Piece(rank, group, lo - bounds[group], hi - lo))
    return pieces
