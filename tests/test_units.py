"""Pure pieces: shard geometry against torch's own chunking, the streaming writer against safetensors, plan maths,
the pickle memo pruning of the torch-free reader against pickle itself."""

from __future__ import annotations

import json
import pickle
import pickletools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from hubexport.core import Group, TensorSpec
from hubexport.plan import make_plan, parse_size
from hubexport.safetensors_format import index_json, read_header
from hubexport.sources.mcore_legacy import gate_up_from_tp_shards
from hubexport.sources.shards import MeshPlacement, box_runs, covering_coords, local_region
from hubexport.sources.torchsave import without_idle_memo
from hubexport.writers.safetensors import write_file


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 40), other=st.integers(1, 5), n=st.integers(1, 9), dim=st.integers(0, 1))
def test_local_region_matches_torch_chunk(size, other, n, dim):
    """DTensor's Shard placement follows torch.chunk: same offsets and sizes, trailing pieces empty."""
    shape = (size, other) if dim == 0 else (other, size)
    x = torch.arange(size * other).reshape(shape)
    pieces = list(torch.chunk(x, n, dim=dim)) if size else []
    start = 0
    for c in range(n):
        offsets, sizes = local_region(shape, (n,), (c,), (MeshPlacement("shard", dim),))
        expected = pieces[c].shape[dim] if c < len(pieces) else 0
        assert sizes[dim] == expected and sizes[1 - dim] == other
        if expected:
            assert offsets[dim] == start
        start += expected


def test_hsdp_reads_one_replica_group():
    coords = covering_coords((2, 3), (MeshPlacement("replicate"), MeshPlacement("shard", 0)))
    assert coords == [(0, 0), (0, 1), (0, 2)]
    assert covering_coords((4,), (MeshPlacement("replicate"),)) == [(0,)]


def test_nested_shards_cover_the_tensor_once():
    shape, mesh = (10, 6), (2, 3)
    placements = (MeshPlacement("shard", 0), MeshPlacement("shard", 1))
    seen = torch.zeros(shape, dtype=torch.int32)
    for coord in covering_coords(mesh, placements):
        off, size = local_region(shape, mesh, coord, placements)
        seen[off[0]:off[0] + size[0], off[1]:off[1] + size[1]] += 1
    assert torch.equal(seen, torch.ones(shape, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int32, torch.uint8, torch.bool, torch.float8_e4m3fn])
def test_writer_is_read_by_safetensors(dtype, tmp_path):
    tensors = {
        "a.weight": torch.randn(3, 5).to(dtype),
        "scalar": torch.tensor(7).to(dtype),
        "empty": torch.empty(0, 4).to(dtype),
        "t.transposed": torch.randn(4, 2).t().to(dtype),  # non-contiguous input
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    sha = write_file(tmp_path / "x.safetensors", specs, lambda s: tensors[s.name])
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        raw = v.contiguous().reshape(-1).view(torch.uint8)
        assert back[k].dtype == dtype and torch.equal(back[k].reshape(-1).view(torch.uint8), raw)
    import hashlib

    assert sha == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    assert set(read_header(tmp_path / "x.safetensors")) == set(tensors)


def test_writer_refuses_a_tensor_unlike_its_plan(tmp_path):
    spec = TensorSpec("w", (2, 2), torch.float32)
    with pytest.raises(AssertionError, match="planned"):
        write_file(tmp_path / "x.safetensors", [spec], lambda s: torch.zeros(3, 2))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123 and parse_size("10KB") == 10_000
    with pytest.raises(ValueError):
        parse_size("five gigs")


def test_plan_shards_in_natural_order_and_balances_ranks():
    specs = [TensorSpec(f"model.layers.{i}.w", (250,), torch.float32) for i in (10, 2, 1)]
    groups = [Group((s.name,), (s,), lambda t: t) for s in specs]
    plan = make_plan(groups, max_shard_size=1000)
    assert [t.name for f in plan.files for t in f.tensors] == [
        "model.layers.1.w", "model.layers.2.w", "model.layers.10.w"]
    assert len(plan.files) == 3 and plan.total_size == 3000
    owners = [plan.files_for_rank(r, 2) for r in range(2)]
    assert sorted(f.name for o in owners for f in o) == sorted(f.name for f in plan.files)
    assert {len(o) for o in owners} == {1, 2}
    index = json.loads(index_json(plan.weight_map(), plan.total_size))
    assert index["metadata"]["total_size"] == 3000 and len(index["weight_map"]) == 3


def test_plan_cast_touches_floats_only():
    specs = [TensorSpec("w", (2,), torch.float32), TensorSpec("ids", (2,), torch.int64)]
    plan = make_plan([Group((s.name,), (s,), lambda t: t) for s in specs], max_shard_size="5GB", cast=torch.bfloat16)
    assert {t.name: t.dtype for t in plan.files[0].tensors} == {"w": torch.bfloat16, "ids": torch.int64}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_v0_tp_gate_up_shards_merge_to_the_global_layout(tp: int) -> None:
    """v0 TP shard i is [gate_i; up_i] (formats doc §2.4); the legacy source hands mappings torch_dist's [gate; up]."""
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    shards = [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp), strict=True)]
    assert torch.equal(gate_up_from_tp_shards(shards), torch.cat([gate, up]))


def test_box_runs_are_the_boxs_elements_in_order():
    """Every box of every small shape: the runs, expanded, are the box's elements' flat indices in row-major order."""
    import itertools
    import math

    for shape in [(), (5,), (3, 4), (2, 3, 4), (1, 4, 2)]:
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        boxes = itertools.product(*[[(o, n) for o in range(d) for n in range(1, d - o + 1)] for d in shape])
        for box in boxes:
            offsets, sizes = tuple(o for o, _ in box), tuple(n for _, n in box)
            run, starts = box_runs(shape, offsets, sizes)
            want = [sum((o + i) * s for o, i, s in zip(offsets, at, strides, strict=True))
                    for at in itertools.product(*(range(n) for n in sizes))]
            assert [first + j for first in starts for j in range(run)] == want, (shape, box)
    assert box_runs((4, 6), (0, 3), (4, 3)) == (3, [3, 9, 15, 21])  # a column block: one run per row
    assert box_runs((4, 6), (2, 0), (2, 6)) == (12, [12])  # a row block: one run


_leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300) \
    | st.binary(max_size=300)
_values = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)


def _memo_ops(data: bytes) -> tuple[int, int]:
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    return sum(n.endswith("PUT") for n in ops), sum(n.endswith("GET") for n in ops)


@settings(max_examples=300, deadline=None)
@given(value=_values, shared=_values)
def test_the_pruned_pickle_loads_as_the_pickle_does(value, shared):
    """Protocol 2 (torch.save's): dropping the PUTs no GET reads back loses nothing, shared objects stay shared
    (each GET still finds its object), and every PUT left is read back."""
    obj = {"value": value, "a": [shared, value], "b": (shared, [shared])}
    data = pickle.dumps(obj, protocol=2)
    pruned = bytearray(data)
    pruned = bytes(pruned[:without_idle_memo(pruned)])  # in place: the bytes kept move down over those dropped
    loaded = pickle.loads(pruned)
    assert loaded == pickle.loads(data)
    assert loaded["a"][0] is loaded["b"][0] is loaded["b"][1][0] or not isinstance(shared, (list, dict))
    puts, gets = _memo_ops(pruned)
    assert puts <= len({arg for op, arg, _ in pickletools.genops(pruned) if op.name.endswith("GET")}) <= gets
    assert len(pruned) < len(data) or _memo_ops(data)[0] == puts


def test_a_pickle_cut_before_its_stop_is_left_as_it_is():
    """Pruning leaves stale bytes past the pickle's new end: one without STOP must fail at its end, not read them."""
    data = pickle.dumps({"x": [1, 2], "y": ("a", "a")}, protocol=2)[:-1]
    pruned = bytearray(data)
    assert without_idle_memo(pruned) == len(data) and pruned == data
    assert without_idle_memo(bytearray(data + b".")) < len(data)  # with its STOP, it is pruned


@pytest.mark.parametrize("protocol", [0, 4, 5])
def test_a_pickle_of_other_opcodes_is_left_as_it_is(protocol):
    """Text opcodes (protocol 0) and MEMOIZE/FRAME (4, 5) are not read: the pickle is unpickled unchanged."""
    data = pickle.dumps({"x": [1, 2], "y": ("a", "a" * 300)}, protocol=protocol)
    pruned = bytearray(data)
    assert without_idle_memo(pruned) == len(data) and pruned == data
