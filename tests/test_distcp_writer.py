"""hubexport's own torch_dist writer against the real producers: each chunk's archive is what `torch.save` writes, and
a whole to-megatron checkpoint is what megatron-core's save planner and torch's FileSystemWriter write for the same
ShardedTensors, byte for byte. Row groups (q/k/v, gate/up, a padded vocabulary) are copied from the HF files."""

from __future__ import annotations

import io
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from hubexport.core import ZEROS, FileSlices
from hubexport.dist import Dist
from hubexport.executor import to_megatron
from hubexport.options import MegatronOptions, Output
from hubexport.resolve import ResolvedModel
from hubexport.to_mcore import McoreJob
from hubexport.writers import torchsave_zip
from tests.fixtures_mcore import tiny_hf

SHAPES = [((), torch.float32), ((7,), torch.bfloat16), ((3, 5), torch.float16), ((2, 3, 4, 5), torch.float32),
          ((1, 70000), torch.bfloat16), ((300, 257), torch.int64), ((4, 4), torch.bool), ((1, 128, 64), torch.uint8)]


def _torch_save(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=[f"{list(s)}-{d}".replace("torch.", "") for s, d in SHAPES])
def test_archive_is_what_torch_save_writes(shape, dtype) -> None:
    t = (torch.rand(shape) * 100).to(dtype)
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    archive = torchsave_zip.layout(str(dtype).removeprefix("torch."), shape, t.element_size())
    mine = archive.head + data + archive.tail(zlib.crc32(data))
    assert len(mine) == archive.size
    assert mine == _torch_save(t)


class _Discard:
    """A file object that keeps what torch.save writes around a tensor's storage, not the storage itself."""

    def __init__(self) -> None:
        self.kept: list[tuple[int, bytes]] = []
        self.pos = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n < 1 << 20:
            self.kept.append((self.pos, bytes(data)))
        self.pos += n
        return n

    def flush(self) -> None:
        pass


def test_archive_past_4_gib_has_torch_saves_zip64_fields() -> None:
    """A 4 GiB + 128 B tensor: zip64 sizes in the data record, zip64 offsets in the records after it. The storage
    is never touched (an untouched allocation reads as zeros), and what torch writes around it is kept."""
    n = (1 << 32) + 128
    t = torch.empty(n, dtype=torch.uint8)
    out = _Discard()
    torch.save(t, out)
    archive = torchsave_zip.layout("uint8", (n,), 1)
    head = b"".join(d for at, d in out.kept if at < len(archive.head))
    tail = b"".join(d for at, d in out.kept if at >= len(archive.head) + n)
    crc = int.from_bytes(tail[4:8], "little")  # torch's CRC of those bytes, whatever they are
    assert out.pos == archive.size
    assert head == archive.head and tail == archive.tail(crc)
    del t


# ---- whole checkpoints against megatron-core's save ------------------------------------------------------------

CASES = {  # name: (tiny_hf kind, overrides, spec)
    "qwen3_te": ("qwen3", {}, "te"),
    "qwen2_padded_vocab_local": ("qwen2", {"vocab_size": 200}, "local"),  # zero rows after the vocabulary
    "qwen3_moe_te": ("qwen3_moe", {}, "te"),  # expert axis
    "deepseek_v3_local": ("deepseek_v3", {}, "local"),  # MLA, per-layer keys
}


def _megatron_save(job: McoreJob, out: Path) -> None:
    """What hubexport wrote before it had its own writer: megatron-core ShardedTensors and ShardedObjects of the
    converted tensors, through megatron's save planner into torch's FileSystemWriter (one thread)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class OneFile(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
            dcp_save(mcore_to_pyt_state_dict(flat, False), storage_writer=FileSystemWriter(str(checkpoint_dir),
                     thread_count=1), planner=MCoreSavePlanner(flatten_state_dict=False))

    tensors = {}
    for g in job.plan.groups:
        if g.outputs:
            tensors.update(g.convert({n: job.source.read(n) for n in g.inputs}))
    state = {}
    for c in job.chunks:
        axes = [(a, i, n) for a, (i, n) in enumerate(zip(c.where.lead, c.where.lead_sizes, strict=True))]
        state[c.spec.name] = ShardedTensor.from_rank_offsets(c.where.key, tensors[c.spec.name], *axes, replica_id=0,
                                                             prepend_axis_num=len(c.where.lead))
    value = torch.empty(0, dtype=torch.uint8) if job.options.spec == "te" else None
    for e in job.entries[0]:
        if e.blob is not None:
            key = e.key.split("/shard_")[0]
            state[e.key] = ShardedObject(key, value, e.global_shape, e.offsets, replica_id=0)
    out.mkdir()
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        dist_checkpointing.save(state, str(out), sharded_strategy=OneFile("torch_dist", 1))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: tiny_hf(kind, root / name, **over) for name, (kind, over, _) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_is_megatrons_byte_for_byte(hf_models, tmp_path, case) -> None:
    spec = CASES[case][2]
    ours = tmp_path / "ours"
    to_megatron(hf_models[case], Output(ours), MegatronOptions(spec=spec), log=lambda _: None)
    job = McoreJob(ResolvedModel(hf_models[case]), MegatronOptions(spec=spec), Dist())
    try:
        _megatron_save(job, tmp_path / "megatron")
    finally:
        job.close()
    theirs = {p.name: p.read_bytes() for p in (tmp_path / "megatron").iterdir()}
    mine = {p.name: p.read_bytes() for p in ours.iterdir()}
    assert sorted(mine) == sorted(theirs) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    for name in ("__0_0.distcp", "common.pt", "metadata.json"):
        assert mine[name] == theirs[name], name
    metadata = pickle.loads(theirs[".metadata"])
    metadata.storage_meta = None  # torch records the run's path and a random save id there; hubexport does not
    assert mine[".metadata"] == pickle.dumps(metadata)


def test_row_groups_are_copied_from_the_hf_files(hf_models) -> None:
    """q/k/v, gate/up and the padded vocabulary are slices of the HF files (the padding: zeros), equal to what the
    conversion makes in memory; the rest goes through memory."""
    job = McoreJob(ResolvedModel(hf_models["qwen2_padded_vocab_local"]), MegatronOptions(spec="local"), Dist())
    produce = job._produce()
    copied = set()
    try:
        for e in job.entries[0]:
            if e.name is None:
                continue
            g = next(g for g in job.plan.groups if any(o.name == e.name for o in g.outputs))
            want = g.convert({n: job.source.read(n) for n in g.inputs})[e.name]
            got = produce(e)
            if isinstance(got, FileSlices):
                copied.add(e.name)
                raw = b"".join(bytes(n) if fd == ZEROS else _pread(fd, offset, n) for fd, offset, n in got.parts)
                assert raw == want.contiguous().view(torch.uint8).numpy().tobytes(), e.name
                if e.name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    assert got.parts[-1][0] == ZEROS and got.parts[-1][2] == 56 * 64 * 4  # 200 → 256 rows
            else:
                assert torch.equal(got, want), e.name
    finally:
        job.close()
    assert {"embedding.word_embeddings.weight", "output_layer.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
            "decoder.layers.0.self_attention.linear_qkv.bias", "decoder.layers.0.mlp.linear_fc1.weight",
            "decoder.layers.0.mlp.linear_fc2.weight"} <= copied


def _pread(fd: int, offset: int, n: int) -> bytes:
    return os.pread(fd, n, offset)
