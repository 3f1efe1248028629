"""megatron-core `torch_dist` checkpoints, written without megatron-core or torch.distributed.checkpoint: the files
`dist_checkpointing.save` writes for ShardedTensors with the global shapes, offsets and replica ids that
megatron-core's own `sharded_state_dict()` gives (formats doc §3.2, §3.3), byte for byte
(`tests/test_distcp_writer.py`).

Every logical tensor (one layer, one expert) is one chunk of its stored key, so `dist_checkpointing.load` reshards it
to whatever TP/PP/EP the loading model uses. Each rank writes `__<rank>_0.distcp`: its ShardedObjects' bytes, then a
torch.save archive per chunk, its chunks grouped by key in first-seen order (torch's save plan). The layout depends
on shapes alone, so every rank knows every file's and rank 0 writes `.metadata` without gathering anything. A chunk
whose bytes lie in the HF files (rows of them, `Group.rows`) is copied file to file; only its CRC-32 is computed
from it, read back from the page cache on another thread. Anything else is produced one group at a time.
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from hubexport.core import FileSlices, TensorSpec
from hubexport.sources.torchsave import ITEMSIZE
from hubexport.writers import torchsave_zip
from hubexport.writers.safetensors import copy_slices, read_back, tensor_bytes

if TYPE_CHECKING:  # a checkpoint made of copied rows alone (the recorded to-megatron) is written without torch
    import torch

LAYER = re.compile(r"^(.*decoder\.layers)\.(\d+)\.(.+)$")  # also `language_model.` / `vision_model.decoder.layers`
EXPERT = ".mlp.experts.local_experts."
GROUPED = ".mlp.experts.experts."
# TE normalisation modules (TE ≥ 2 builds RMSNorm from fusible ops, which carry `_extra_state`); the local spec's
# torch norms have none. Loading ignores unexpected keys by default, so writing them for TE 1.x models is harmless,
# while a missing one fails the load.
TE_NORMS = ("q_layernorm", "k_layernorm", "pre_mlp_layernorm", "input_layernorm", "final_layernorm", "patch_norm",
            "enorm", "hnorm")
# linears not named `linear_*`: the MTP block's projection of [embedding; hidden]
LINEARS = ("eh_proj",)


@dataclass(frozen=True)
class Placement:
    """Where one logical tensor lives in the archive: its key and its indices on the prepended (layer, expert) axes."""

    key: str
    lead: tuple[int, ...]
    lead_sizes: tuple[int, ...]


def placement(name: str, *, num_layers: int | Mapping[str, int], num_experts: int, stacked: bool) -> Placement:
    """Inverse of `sources.mcore._logical_names`: `decoder.layers.<i>.<s>` → `decoder.layers.<s>` [i] when stacked,
    `…mlp.experts.local_experts.<j>.<w>` → `…mlp.experts.experts.<w>` [j] (TEGroupedMLP and SequentialMLP agree).
    `num_layers`: the decoder's layer count, or each stacked block's (`McorePlan.stacks`: a VLM's vision tower too)."""
    stacks = num_layers if isinstance(num_layers, Mapping) else {"decoder.layers": num_layers}
    key, lead, sizes = name, [], []
    m = LAYER.match(name)
    if m and stacked and m.group(1) in stacks:
        key = f"{m.group(1)}.{m.group(3)}"
        lead.append(int(m.group(2)))
        sizes.append(stacks[m.group(1)])
    if EXPERT in key:
        pre, rest = key.split(EXPERT)
        j, w = rest.split(".", 1)
        key = f"{pre}{GROUPED}{w}"
        lead.append(int(j))
        sizes.append(num_experts)
    return Placement(key, tuple(lead), tuple(sizes))


def extra_state_modules(names: list[str], spec: str) -> list[str]:
    """The decoder modules whose `_extra_state` megatron saves (as a ShardedObject): every linear (TE or local), and
    with the TE spec its norms too. Found from the tensor names, so they follow the architecture table."""
    modules = []
    for name in names:  # embedding and output layer (neither `linear_*` nor a norm) save none
        module, param = name.rsplit(".", 1)
        last = module.rsplit(".", 1)[-1]
        # a module's own weight, not a norm folded into its name (local MoE: `mlp.linear_fc1.layer_norm_weight`)
        linear = last.startswith("linear_") or last in LINEARS
        if param in ("weight", "bias") and (linear or (spec == "te" and last in TE_NORMS)):
            modules.append(module)
    return list(dict.fromkeys(modules))


@dataclass(frozen=True)
class Chunk:
    """One logical tensor as a chunk of its stored key."""

    spec: TensorSpec
    where: Placement

    @property
    def offsets(self) -> tuple[int, ...]:
        return (*self.where.lead, *(0 for _ in self.spec.shape))


def assign_ranks(sizes: list[int], world_size: int) -> list[int]:
    """Biggest first to the least-loaded rank (ties by position): deterministic, so every rank computes it alone."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint's CURRENT_DCP_VERSION for this layout
Produced = Union["torch.Tensor", FileSlices]


@dataclass(frozen=True)
class Entry:
    """One item of a rank's `.distcp` file, where it lies there, and what the metadata says of it."""

    key: str  # the storage key (a ShardedObject's `unique_key`)
    name: str | None  # the logical tensor whose bytes it holds; None for a ShardedObject
    offsets: tuple[int, ...]  # of the chunk in the stored tensor (with the prepended layer / expert axes)
    sizes: tuple[int, ...]  # the chunk's shape, as stored
    global_shape: tuple[int, ...]
    dtype: str  # torch dtype name
    index: int  # among this rank's chunks of `key` (torch's MetadataIndex hint)
    start: int  # in the file
    length: int
    blob: bytes | None = None  # a ShardedObject's torch.save bytes

    def archive(self) -> torchsave_zip.Layout:
        return torchsave_zip.layout(self.dtype, self.sizes, ITEMSIZE[self.dtype])


def file_name(rank: int) -> str:
    return f"__{rank}_0.distcp"


def plan_files(chunks: list[Chunk], owners: list[int], world_size: int, extra: list[Placement],
               blob: bytes) -> list[list[Entry]]:
    """Each rank's entries in file order: rank 0's ShardedObjects (`blob`, the torch.save of one `_extra_state`),
    then the rank's chunks grouped by key."""
    files: list[list[Entry]] = []
    for rank in range(world_size):
        entries, at = [], 0
        for p in extra if rank == 0 else []:
            lead, sizes = p.lead or (0,), p.lead_sizes or (1,)
            key = f"{p.key}/shard_{'.'.join(map(str, lead))}_{'.'.join(map(str, sizes))}"
            entries.append(Entry(key, None, lead, (), sizes, "uint8", 0, at, len(blob), blob))
            at += len(blob)
        by_key: dict[str, list[Chunk]] = {}
        for c, owner in zip(chunks, owners, strict=True):
            if owner == rank:
                by_key.setdefault(c.where.key, []).append(c)
        for key, mine in by_key.items():
            for i, c in enumerate(mine):
                sizes = (*(1 for _ in c.where.lead), *c.spec.shape)
                dtype = str(c.spec.dtype).removeprefix("torch.")
                size = torchsave_zip.layout(dtype, sizes, ITEMSIZE[dtype]).size
                entries.append(Entry(key, c.spec.name, c.offsets, sizes, (*c.where.lead_sizes, *c.spec.shape), dtype,
                                     i, at, size))
                at += size
        files.append(entries)
    return files


class _Crc:
    """zlib's CRC-32 behind hashlib's `update`, so the read-back helper serves both."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)


def write_rank(path: Path, entries: list[Entry], produce: Callable[[Entry], Produced], *, fsync: bool = True) -> None:
    """Write one rank's `.distcp`: each archive's head, its data (copied file to file, or a produced tensor's bytes)
    and its tail once the data's CRC-32 is known (read back on another thread for copied data)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="hubexport-crc32") as crcs:
            tails: list[Future] = []
            for e in entries:
                os.lseek(fd, e.start, os.SEEK_SET)
                if e.blob is not None:
                    _write_all(fd, e.blob)
                    continue
                archive = e.archive()
                _write_all(fd, archive.head)
                data_at = e.start + len(archive.head)
                item = produce(e)
                if isinstance(item, FileSlices):
                    if item.nbytes != archive.nbytes:
                        raise AssertionError(f"{e.name}: {item.nbytes} bytes to copy, planned {archive.nbytes}")
                    copy_slices(item, fd)
                    tails.append(crcs.submit(_tail_back, fd, archive, data_at))
                    continue
                data = tensor_bytes(item)
                if data.nbytes != archive.nbytes:
                    raise AssertionError(f"{e.name}: produced {tuple(item.shape)} {item.dtype}, planned {e.sizes}")
                _write_all(fd, data)
                _write_all(fd, archive.tail(zlib.crc32(data)))
                del item, data
            for t in tails:
                t.result()
        if fsync:
            os.fsync(fd)
    except OSError as e:  # name the file: a failed write() does not
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def _tail_back(fd: int, archive: torchsave_zip.Layout, data_at: int) -> None:
    crc = _Crc()
    read_back(crc, fd, data_at, archive.nbytes)
    tail = archive.tail(crc.value)
    os.pwrite(fd, tail, data_at + archive.nbytes)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def extra_state_blob(spec: str) -> bytes:
    """What megatron saves for each `_extra_state` ShardedObject: torch.save of the list of its data. TE writes an empty
    byte tensor when it has no FP8 state; megatron's local linears write None."""
    import torch

    buf = io.BytesIO()
    torch.save([torch.empty(0, dtype=torch.uint8) if spec == "te" else None], buf)
    return buf.getvalue()


def metadata_bytes(files: list[list[Entry]]) -> bytes:
    """`.metadata` as torch's writer pickles it: every key's properties, shape and chunks (rank order, then each
    rank's plan order: chunks, then ShardedObjects), and where each item lies."""
    import pickle

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    state: dict = {}
    storage: dict = {}
    for rank, entries in enumerate(files):
        for e in sorted(entries, key=lambda e: e.blob is not None):  # the plan lists chunks first
            if e.blob is not None:
                state[e.key] = BytesStorageMetadata()
                continue
            md = state.setdefault(e.key, TensorStorageMetadata(
                TensorProperties(dtype=getattr(torch, e.dtype)), torch.Size(e.global_shape), []))
            md.chunks.append(ChunkStorageMetadata(torch.Size(e.offsets), torch.Size(e.sizes)))
        # the storage index holds its own copy of each key and one file name per rank, as torch's plan does: the
        # pickle's memo then matches torch's, byte for byte
        keys: dict[str, str] = {}
        path = file_name(rank)
        for e in entries:
            key = keys.setdefault(e.key, e.key.encode().decode())
            index = MetadataIndex(key) if e.blob is not None else MetadataIndex(key, torch.Size(e.offsets), e.index)
            storage[index] = _StorageInfo(path, e.start, e.length)
    return pickle.dumps(Metadata(state, None, storage, None, DCP_VERSION))


def write_common(out_dir: Path, metadata: bytes, common: bytes | None = None) -> None:
    """Rank 0, after every rank wrote its file: `.metadata`, `common.pt` (megatron's common state dict, empty: every
    tensor is sharded; torch.save'd to its path, so the archive is named after the file as megatron's is) and
    `metadata.json`."""
    (out_dir / ".metadata").write_bytes(metadata)
    if common is None:
        import torch

        torch.save({}, out_dir / "common.pt")
    else:
        (out_dir / "common.pt").write_bytes(common)
    (out_dir / "metadata.json").write_text(json.dumps(METADATA_JSON))
