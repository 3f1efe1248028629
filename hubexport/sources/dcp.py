"""torch DCP (`torch_dist`) directory reading without a model or a process group: the `.metadata` pickle through an
allow-listing unpickler, and any rectangular region of a tensor assembled from its chunk blobs (formats doc §3.1, §3.4).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as dcp_md

from hubexport.errors import CheckpointError


class _MCoreMetadata(dcp_md.Metadata):
    """Stands in for megatron-core 0.15's pickled `MCoreMetadata(Metadata)`: same fields plus `mcore_data`."""


class _Stub:
    """Stands in for helper classes that only matter to a writer (e.g. mcore's old `MCoreSavePlan`)."""

    def __setstate__(self, state: object) -> None:
        self.state = state


_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # strided layouts pickle through it
    # StorageMeta.checkpoint_id may be the writer's path object
    **{("pathlib", n): getattr(__import__("pathlib"), n) for n in ("Path", "PosixPath", "PurePosixPath",
                                                                   "WindowsPath", "PureWindowsPath")},
}
for _mod, _names in {
    "torch.distributed.checkpoint.metadata": ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
}.items():
    _m = __import__(_mod, fromlist=list(_names))
    for _n in _names:
        if hasattr(_m, _n):
            _ALLOWED[(_mod, _n)] = getattr(_m, _n)
_STUBS = {
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): _MCoreMetadata,
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"): _Stub,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the plain-data classes DCP metadata is made of; anything else is refused, never imported."""

    def find_class(self, module: str, name: str) -> object:
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in _STUBS:
            return _STUBS[(module, name)]
        if module.startswith("megatron.") and name.startswith("MCore"):  # later mcore planner/metadata helpers
            return _Stub
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_metadata(dist_dir: Path, recopy: str = "dist_ckpt/") -> dcp_md.Metadata:
    """`recopy` names what to re-copy in the hints (the torch_dist folder, or a DCP checkpoint directory)."""
    path = dist_dir / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", hint=f"the checkpoint is incomplete; re-copy {recopy}")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as e:  # a damaged pickle fails in many ways (KeyError, IndexError, struct.error, ...)
        raise CheckpointError(f"{path} cannot be read: {e}",
                              hint=f"the file is corrupt or from an unknown writer; re-copy {recopy}") from e
    if not isinstance(md, dcp_md.Metadata):
        raise CheckpointError(f"{path} holds a {type(md).__name__}, not DCP metadata", hint=f"re-copy {recopy}")
    return md


def check_files(dist_dir: Path, md: dcp_md.Metadata, recopy: str) -> None:
    """Every data file `.metadata` names exists and is long enough for the byte ranges it lists (stat only), so a
    missing or cut-short file is reported before any output is written."""
    ends: dict[str, int] = {}
    for info in md.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = dist_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing ({dist_dir / '.metadata'} lists it)",
                                  hint=f"the copy is incomplete; re-copy {recopy}")
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(f"{path} is truncated: {size} bytes, {dist_dir / '.metadata'} needs {end}",
                                  hint=f"the copy was cut short; re-copy {recopy}")


@dataclass(frozen=True)
class StoredChunk:
    """One saved piece of a DCP tensor: its offsets and sizes in the global tensor, and the byte range of its blob."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[StoredChunk, ...]


def open_checked(dist_dir: Path, recopy: str) -> tuple[dcp_md.Metadata, dict[str, DcpTensor]]:
    """A DCP checkpoint's metadata, with every file it names checked present and long enough, and its tensor index."""
    md = read_metadata(dist_dir, recopy=recopy)
    check_files(dist_dir, md, recopy)
    return md, tensor_index(md)


def tensor_index(md: dcp_md.Metadata) -> dict[str, DcpTensor]:
    """Every tensor key with its global shape, dtype and the storage of each of its chunks."""
    chunks: dict[str, list[StoredChunk]] = {}
    for idx, info in md.storage_data.items():
        if idx.offset is None:
            continue  # bytes items (ShardedObjects, TE _extra_state)
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"tensor {idx.fqn} is stored with transforms {info.transform_descriptors}",
                hint="compressed/transformed DCP storage is not supported; re-save without stream transforms",
            )
        chunks.setdefault(idx.fqn, []).append(
            StoredChunk(tuple(idx.offset), (), info.relative_path, info.offset, info.length)
        )
    out = {}
    for key, tmd in md.state_dict_metadata.items():
        if not isinstance(tmd, dcp_md.TensorStorageMetadata):
            continue
        sizes = {tuple(c.offsets): tuple(c.sizes) for c in tmd.chunks}
        stored = [StoredChunk(c.offsets, sizes[c.offsets], c.file, c.start, c.length) for c in chunks.get(key, [])
                  if c.offsets in sizes]
        out[key] = DcpTensor(key, tuple(tmd.size), tmd.properties.dtype, tuple(stored))
    return out


def _load_blob(dist_dir: Path, c: StoredChunk, key: str) -> torch.Tensor:
    path = dist_dir / c.file
    try:
        with open(path, "rb") as f:
            f.seek(c.start)
            blob = f.read(c.length)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} for {key}: {e}", hint="re-copy the dist_ckpt directory") from e
    if len(blob) != c.length or blob[:2] != b"PK":
        raise CheckpointError(f"{path} is truncated or not a torch.save blob at offset {c.start} ({key})",
                              hint="re-copy the dist_ckpt directory; safetensors-serialised DCP is not supported")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def read_region(dist_dir: Path, t: DcpTensor, lead: tuple[int, ...] = (),
                load: Callable[[Path, StoredChunk, str], torch.Tensor] = _load_blob) -> torch.Tensor:
    """The sub-tensor `t[lead]` (fixed indices on the leading axes), pasted from every chunk that overlaps it.
    Only blobs that overlap are read, so one layer of a stacked key costs one layer's bytes. `load` reads one
    chunk (a torch.save blob by default; safetensors-serialised DCP passes its own)."""
    n = len(lead)
    out_shape = t.shape[n:]
    out = torch.empty(out_shape, dtype=t.dtype)
    covered = 0
    for c in t.chunks:
        if any(not (o <= i < o + s) for i, o, s in zip(lead, c.offsets, c.sizes, strict=False)):
            continue
        data = load(dist_dir, c, t.key)
        if tuple(data.shape) != c.sizes:
            raise CheckpointError(f"chunk of {t.key} at {c.offsets} has shape {tuple(data.shape)}, "
                                  f"metadata says {c.sizes}", hint="the checkpoint is corrupt; re-copy it")
        sel = data[tuple(i - o for i, o in zip(lead, c.offsets, strict=False))]
        dst = tuple(slice(o, o + s) for o, s in zip(c.offsets[n:], c.sizes[n:], strict=True))
        out[dst] = sel
        covered += sel.numel()
    if covered != out.numel():
        where = f"{t.key}[{', '.join(map(str, lead))}]" if lead else t.key
        raise CheckpointError(f"the chunks of {where} cover {covered} of {out.numel()} elements",
                              hint="a .distcp file is missing or the checkpoint is incomplete; re-copy dist_ckpt/")
    return out
