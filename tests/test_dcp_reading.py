"""Reading megatron-core's torch_dist checkpoints without torch.distributed.checkpoint: the `.metadata` records equal
what DCP's own reader returns, every chunk is read from its storage's bytes (straight into the output where it
fills a contiguous slice of it) and equals torch.load of its blob, DCP is never imported to merge, and what is rows
of a stored tensor is copied file to file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from hubexport.core import FileSlices
from hubexport.sources import dcp
from hubexport.sources.dcp import read_metadata, read_region, tensor_index
from hubexport.to_hf import GroupCache, prepare

ROOT = Path(__file__).resolve().parents[1]


def _torch_load(dist_dir: Path, c: dcp.StoredChunk, key: str) -> torch.Tensor:
    with open(dist_dir / c.file, "rb") as f:
        f.seek(c.start)
        return torch.load(io.BytesIO(f.read(c.length)), map_location="cpu", weights_only=True)


@pytest.fixture(params=[("mcore_tp1", "untied"), ("mcore_tp2pp2", "v1"), ("mcore_moe_ep2", "ep2")],
                ids=["tp1", "tp2pp2", "moe_ep2"])
def dist_dir(request) -> Path:
    fixture, name = request.param
    cases = request.getfixturevalue(fixture)
    case = cases[name]
    return next(p.parent for p in case.actor.rglob(".metadata"))


def test_metadata_records_equal_dcps_own_reader(dist_dir):
    ours, theirs = read_metadata(dist_dir), FileSystemReader(dist_dir).read_metadata()
    assert set(ours.state_dict_metadata) == set(theirs.state_dict_metadata)
    tensors = 0
    for key, want in theirs.state_dict_metadata.items():
        got = ours.state_dict_metadata[key]
        if not hasattr(want, "chunks"):
            assert not isinstance(got, dcp.TensorStorageMetadata), key
            continue
        tensors += 1
        assert isinstance(got, dcp.TensorStorageMetadata), key
        assert (tuple(got.size), got.properties.dtype) == (tuple(want.size), want.properties.dtype), key
        assert [(tuple(c.offsets), tuple(c.sizes)) for c in got.chunks] == \
            [(tuple(c.offsets), tuple(c.sizes)) for c in want.chunks], key
    assert tensors > 5
    stored = {(i.fqn, None if i.offset is None else tuple(i.offset)): (s.relative_path, s.offset, s.length)
              for i, s in theirs.storage_data.items()}
    assert {(i.fqn, None if i.offset is None else tuple(i.offset)): (s.relative_path, s.offset, s.length)
            for i, s in ours.storage_data.items()} == stored
    assert getattr(ours, "mcore_data", None) == getattr(theirs, "mcore_data", None)


def test_every_chunk_is_read_from_its_storage_bytes(dist_dir):
    index = tensor_index(read_metadata(dist_dir))
    chunks = 0
    for t in index.values():
        for c in t.chunks:
            assert dcp._stored(dist_dir / c.file, c) is not None, (t.key, c)
            got, want = dcp._load_blob(dist_dir, c, t.key), _torch_load(dist_dir, c, t.key)
            assert got.dtype == want.dtype and torch.equal(got, want), t.key
            chunks += 1
        lead = [()] if len(t.shape) < 3 else [(i,) for i in range(t.shape[0])]  # stacked layers, one at a time
        for at in lead:
            direct, pasted = read_region(dist_dir, t, at), read_region(dist_dir, t, at, load=_torch_load)
            assert direct.dtype == pasted.dtype and torch.equal(direct, pasted), (t.key, at)
    assert chunks > len(index) / 2


def test_regions_pasted_without_torch_are_what_torch_reads(dist_dir):
    """The torch-free paste (`region_bytes`, the fast merge's path for weights TP split along their columns) gives
    read_region's bytes for every tensor and stacked layer, whatever the chunks' split."""
    index, torchs = tensor_index(read_metadata(dist_dir, dtype_names=True)), tensor_index(read_metadata(dist_dir))
    fds: dict[str, int] = {}
    split = 0
    try:
        for t in index.values():
            lead = [()] if len(t.shape) < 3 else [(i,) for i in range(t.shape[0])]
            for at in lead:
                pieces = dcp.region_pieces(dist_dir, t, at)
                assert pieces is not None, (t.key, at)
                split += dcp.region_runs(t.shape[len(at):], dcp.itemsize(t.dtype), pieces) is None
                got = dcp.region_bytes(lambda f: fds.setdefault(f, os.open(dist_dir / f, os.O_RDONLY)),
                                       t.shape[len(at):], dcp.itemsize(t.dtype), pieces)
                want = read_region(dist_dir, torchs[t.key], at)
                assert bytes(got) == want.contiguous().view(torch.uint8).numpy().tobytes(), (t.key, at)
    finally:
        for fd in fds.values():
            os.close(fd)
    assert split > 0 or "tp2" not in str(dist_dir)  # TP=2 has column splits: the paste, not runs


READ = """
import json, sys
from pathlib import Path
from hubexport.sources.dcp import read_metadata, read_region, tensor_index
from hubexport.to_hf import GroupCache, prepare
d = Path(sys.argv[1])
for t in tensor_index(read_metadata(d)).values():
    read_region(d, t, (0,) * (len(t.shape) >= 3))
print(json.dumps("torch.distributed.checkpoint" in sys.modules))
"""


def test_reading_never_imports_torch_distributed_checkpoint(dist_dir):
    out = subprocess.run([sys.executable, "-c", READ, str(dist_dir)], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert json.loads(out.strip().splitlines()[-1]) is False


@pytest.mark.parametrize(("fixture", "name", "in_memory"), [
    ("mcore_tp1", "untied", ()),
    # TP splits row-parallel weights along their columns: each row's bytes are in two chunks
    ("mcore_tp2pp2", "v1", (".self_attn.o_proj.", ".mlp.down_proj.")),
])
def test_megatron_tensors_are_copied_file_to_file(request, fixture, name, in_memory):
    """Every output that is rows of one checkpoint tensor (norms, q/k/v, gate/up, the trimmed vocabulary) is copied
    from the .distcp files without being read; only what TP split along columns is assembled in memory."""
    prep = prepare(request.getfixturevalue(fixture)[name].actor)
    cache = GroupCache(prep.plan, prep.source)
    try:
        copied = {s.name: isinstance(cache.fetch(s), FileSlices) for f in prep.plan.files for s in f.tensors}
    finally:
        prep.source.close()
    assert {n for n, c in copied.items() if not c} == {n for n in copied if any(p in n for p in in_memory)}
    assert any(".q_proj." in n for n, c in copied.items() if c) and any(".up_proj." in n for n, c in copied.items() if c)
