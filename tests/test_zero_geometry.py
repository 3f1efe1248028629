"""hubexport's ZeRO geometry (pure functions) against DeepSpeed's own zero_to_fp32 reconstruction, on flat
partitions laid out as DeepSpeed's optimizers lay them: odd sizes, several world sizes, per-parameter alignment
padding (ZeRO 1/2), partition padding and parameters that straddle sub-group tensors (ZeRO 3)."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import random

import pytest
import torch

from hubexport.sources.zero_geometry import zero3_partition_numel, zero3_pieces, zero12_pieces

os.environ.setdefault("DS_ACCELERATOR", "cpu")
from deepspeed.utils import zero_to_fp32  # after DS_ACCELERATOR: DeepSpeed picks its accelerator on import

SHAPES = [(7, 5), (3,), (16, 4), (1,), (5, 3, 3), (10,), (2, 9)]


def _assemble(flat: list[list[torch.Tensor]], pieces, numel: int) -> torch.Tensor:
    """What the DeepSpeed source does with the pieces: concatenate, cut to numel."""
    return torch.cat([flat[p.rank][p.group][p.start:p.start + p.length] for p in pieces])[:numel]


def _model_state(shapes: dict[str, torch.Size]):
    return zero_to_fp32.zero_model_state(buffers={}, param_shapes=[shapes], shared_params=[], ds_version="0.19.8",
                                         frozen_param_shapes=None, frozen_param_fragments=None)


def _zero12_flat(params: list[torch.Tensor], world_size: int, paddings: list[int] | None) -> list[torch.Tensor]:
    """One group as DeepSpeed's stage_1_and_2 flattens it: each parameter, its padding, the group aligned to
    2 · world_size, cut into equal partitions."""
    parts = []
    for i, p in enumerate(params):
        parts += [p.reshape(-1), torch.zeros(paddings[i] if paddings else 0)]
    flat = torch.cat(parts)
    flat = torch.cat([flat, torch.zeros(-flat.numel() % (2 * world_size))])
    return list(flat.chunk(world_size))


def _alignment_paddings(numels: list[int], align: int) -> list[int]:
    """DeepSpeed 0.19's rule (stage_1_and_2.py): pad after each parameter but the last to a multiple of `align`."""
    out, offset = [], 0
    for i, n in enumerate(numels):
        offset += n
        out.append(0 if i == len(numels) - 1 else -offset % align)
        offset += out[-1]
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("aligned", [False, True])
def test_zero12_matches_zero_to_fp32(world_size, aligned):
    rng = torch.Generator().manual_seed(world_size)
    shapes = {f"p{i}": torch.Size(s) for i, s in enumerate(SHAPES)}
    params = [torch.randn(s, generator=rng) for s in shapes.values()]
    numels = [p.numel() for p in params]
    paddings = _alignment_paddings(numels, 4) if aligned else None
    flat = _zero12_flat(params, world_size, paddings)
    theirs: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        zero_to_fp32._zero2_merge_trainable_params(theirs, world_size, [[f] for f in flat], [_model_state(shapes)],
                                                   [paddings] if paddings else None)
    pieces = zero12_pieces(numels, paddings, flat[0].numel(), world_size, group=0)
    per_rank = [[f] for f in flat]
    for (name, shape), p, n in zip(shapes.items(), pieces, numels, strict=True):
        ours = _assemble(per_rank, p, n).view(shape)
        assert torch.equal(ours, theirs[name]), name
        assert sum(q.length for q in p) == n


def test_zero12_refuses_what_zero_to_fp32_refuses():
    numels = [math.prod(s) for s in SHAPES]
    with pytest.raises(ValueError, match="fill"):
        zero12_pieces(numels, None, partition=sum(numels), world_size=2, group=0)  # twice what they fill
    shapes = {f"p{i}": torch.Size(s) for i, s in enumerate(SHAPES)}
    flat = torch.zeros(sum(numels))
    with pytest.raises(ValueError, match="consumed"), contextlib.redirect_stdout(io.StringIO()):
        zero_to_fp32._zero2_merge_trainable_params({}, 2, [[flat], [flat]], [_model_state(shapes)])


def _zero3_flat(params: list[torch.Tensor], world_size: int, cuts: list[int]) -> list[list[torch.Tensor]]:
    """Each rank's ZeRO 3 partition: every parameter padded to W · ceil(n / W) and dealt in equal pieces, the
    rank's pieces back to back, then cut into sub-group tensors at `cuts`."""
    ranks = [[] for _ in range(world_size)]
    for p in params:
        pn = zero3_partition_numel(p.numel(), world_size)
        padded = torch.cat([p.reshape(-1), torch.zeros(pn * world_size - p.numel())])
        for r in range(world_size):
            ranks[r].append(padded[r * pn:(r + 1) * pn])
    flat = [torch.cat(r) for r in ranks]
    bounds = [0, *cuts, flat[0].numel()]
    return [[f[a:b] for a, b in itertools.pairwise(bounds)] for f in flat]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_zero3_matches_zero_to_fp32(world_size):
    rng = torch.Generator().manual_seed(10 + world_size)
    shapes = {f"p{i}": torch.Size(s) for i, s in enumerate(SHAPES)}
    params = [torch.randn(s, generator=rng) for s in shapes.values()]
    ends = list(itertools.accumulate(zero3_partition_numel(p.numel(), world_size) for p in params))
    # sub-groups of whole parameters, as DeepSpeed's _create_fp16_sub_groups makes them (its GatheredTensor
    # mis-slices a parameter that straddles two; hubexport's pieces do not care)
    cuts = sorted(random.Random(world_size).sample(ends[:-1], 3))
    flat = _zero3_flat(params, world_size, cuts)
    theirs: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        zero_to_fp32._zero3_merge_trainable_params(theirs, world_size, flat, [_model_state(shapes)])
    pieces = zero3_pieces([p.numel() for p in params], world_size, [t.numel() for t in flat[0]])
    for (name, shape), p, param in zip(shapes.items(), pieces, params, strict=True):
        ours = _assemble(flat, p, param.numel()).view(shape)
        assert torch.equal(ours, theirs[name].contiguous()), name
        assert torch.equal(ours, param)


def test_zero3_parameter_across_sub_groups():
    params = [torch.arange(7.0), torch.arange(100.0, 103.0)]
    flat = _zero3_flat(params, 2, cuts=[2])  # rank partitions [4 + 2], cut inside the first parameter
    pieces = zero3_pieces([7, 3], 2, [2, 4])
    for p, param in zip(pieces, params, strict=True):
        assert torch.equal(_assemble(flat, p, param.numel()), param)


def test_zero3_refuses_a_size_mismatch():
    with pytest.raises(ValueError, match="per rank"):
        zero3_pieces([7, 3], world_size=2, group_sizes=[5])  # needs 4 + 2 = 6 per rank
