"""torch DCP (`torch_dist`) directory reading without a model or a process group: the `.metadata` pickle through an
allow-listing unpickler, and any rectangular region of a tensor assembled from its chunk blobs (formats doc §3.1, §3.4).
Imports torch only to read tensors: the metadata and the byte runs of chunks are read without it, with dtypes by name
(`read_metadata(..., dtype_names=True)`) for the torch-free merge (`fast_merge`)."""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubexport.errors import CheckpointError
from hubexport.sources.shards import box_runs, one_run
from hubexport.sources.torchsave import ITEMSIZE, Stub, Tensor, Unreadable, as_size, read_archive

if TYPE_CHECKING:
    import torch


class _Record(Stub):
    """A pickled plain-data class of DCP's metadata, its fields read as attributes (torch.distributed.checkpoint is
    never imported to read a checkpoint: ~1.5 s and ~50 MB). A field an older writer did not pickle is None."""

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.state.get(name)


class Metadata(_Record):
    """`torch.distributed.checkpoint.metadata.Metadata` (and megatron-core's `MCoreMetadata`, which adds
    `mcore_data`): state_dict_metadata, planner_data, storage_data, storage_meta."""


class TensorStorageMetadata(_Record):
    """properties, size, chunks."""


class TensorProperties(_Record):
    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple):  # (dtype, layout, requires_grad, memory_format, pin_memory)
            state = {"dtype": state[0]}
        super().__setstate__(state)


class MetadataIndex(_Record):
    """A storage_data key: (fqn, offset), compared and hashed as DCP's own (its `index` is only a lookup hint)."""

    def __hash__(self) -> int:
        return hash((self.fqn, self.offset))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetadataIndex) and (self.fqn, self.offset) == (other.fqn, other.offset)


_DCP = "torch.distributed.checkpoint"
_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch", "Size"): as_size,
    ("torch.serialization", "_get_layout"): str,  # strided layouts pickle through it
    # StorageMeta.checkpoint_id may be the writer's path object
    **{("pathlib", n): getattr(__import__("pathlib"), n) for n in ("Path", "PosixPath", "PurePosixPath",
                                                                   "WindowsPath", "PureWindowsPath")},
    (f"{_DCP}.metadata", "Metadata"): Metadata,
    (f"{_DCP}.metadata", "TensorStorageMetadata"): TensorStorageMetadata,
    (f"{_DCP}.metadata", "TensorProperties"): TensorProperties,
    (f"{_DCP}.metadata", "MetadataIndex"): MetadataIndex,
    **{(f"{_DCP}.metadata", n): type(n, (_Record,), {}) for n in ("BytesStorageMetadata", "ChunkStorageMetadata",
                                                                  "StorageMeta", "_MEM_FORMAT_ENCODING")},
    **{(f"{_DCP}.planner", n): type(n, (_Record,), {}) for n in ("SavePlan", "WriteItem", "WriteItemType",
                                                                 "TensorWriteData", "BytesIOWriteData")},
    (f"{_DCP}.filesystem", "_StorageInfo"): type("_StorageInfo", (_Record,), {}),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"): Metadata,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Only the plain-data classes DCP metadata is made of, as records; anything else is refused, never imported.
    Dtypes are torch's, or with `dtype_names` their names ("bfloat16")."""

    def __init__(self, file, dtype_names: bool) -> None:
        super().__init__(file)
        self.dtype_names = dtype_names

    def find_class(self, module: str, name: str) -> object:
        if module == "torch" and self.dtype_names and (module, name) not in _ALLOWED:
            return name  # a dtype by name; a string is never called, so anything else fails as a damaged pickle
        if module == "torch" and not self.dtype_names:
            import torch

            if isinstance(dtype := getattr(torch, name, None), torch.dtype):
                return dtype
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith("megatron.") and name.startswith("MCore"):  # mcore planner/metadata helpers
            return _Record
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_metadata(dist_dir: Path, recopy: str = "dist_ckpt/", *, dtype_names: bool = False) -> Metadata:
    """`recopy` names what to re-copy in the hints (the torch_dist folder, or a DCP checkpoint directory)."""
    path = dist_dir / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing", hint=f"the checkpoint is incomplete; re-copy {recopy}")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, dtype_names).load()
    except Exception as e:  # a damaged pickle fails in many ways (KeyError, IndexError, struct.error, ...)
        raise CheckpointError(f"{path} cannot be read: {e}",
                              hint=f"the file is corrupt or from an unknown writer; re-copy {recopy}") from e
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path} holds a {type(md).__name__}, not DCP metadata", hint=f"re-copy {recopy}")
    return md


def check_files(dist_dir: Path, md: Metadata, recopy: str) -> None:
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
    dtype: torch.dtype | str  # a name where the metadata was read with dtype_names
    chunks: tuple[StoredChunk, ...]


def open_checked(dist_dir: Path, recopy: str, *, dtype_names: bool = False) -> tuple[Metadata, dict[str, DcpTensor]]:
    """A DCP checkpoint's metadata, with every file it names checked present and long enough, and its tensor index."""
    md = read_metadata(dist_dir, recopy=recopy, dtype_names=dtype_names)
    check_files(dist_dir, md, recopy)
    return md, tensor_index(md)


def tensor_index(md: Metadata) -> dict[str, DcpTensor]:
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
        if not isinstance(tmd, TensorStorageMetadata):
            continue
        sizes = {tuple(c.offsets): tuple(c.sizes) for c in tmd.chunks}
        stored = [StoredChunk(c.offsets, sizes[c.offsets], c.file, c.start, c.length) for c in chunks.get(key, [])
                  if c.offsets in sizes]
        out[key] = DcpTensor(key, tuple(tmd.size), tmd.properties.dtype, tuple(stored))
    return out


def dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def _load_blob(dist_dir: Path, c: StoredChunk, key: str) -> torch.Tensor:
    import torch

    from hubexport.sources.pread import read_tensor

    path = dist_dir / c.file
    if (found := _stored(path, c)) is not None:  # one copy, straight from the storage's bytes
        with contextlib.suppress(OSError), open(path, "rb") as f:
            return read_tensor(f.fileno(), found[0], getattr(torch, found[1].dtype), found[1].shape)
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


def _stored(path: Path, c: StoredChunk) -> tuple[int, Tensor] | None:
    """Where the chunk's blob (a torch.save archive) keeps its tensor's bytes, when it holds one plain contiguous
    tensor of the chunk's shape; None otherwise (torch.load then reads the blob, and explains a damaged one)."""
    try:
        archive = read_archive(path, c.start, c.length)
    except (Unreadable, OSError):
        return None
    t = archive.obj
    where = archive.byte_range(t) if isinstance(t, Tensor) and t.shape == c.sizes else None
    return None if where is None or where[0] + where[1] > c.start + c.length else (where[0], t)


def _lead_skip(c: StoredChunk, lead: tuple[int, ...], stored: Tensor) -> int:
    """Elements from the start of the chunk's tensor to its part at the fixed leading indices `lead`."""
    return sum((i - o) * s for i, o, s in zip(lead, c.offsets, stored.stride, strict=False))


def _read_into(path: Path, c: StoredChunk, lead: tuple[int, ...], dst: torch.Tensor) -> bool:
    """Read the chunk's part of `t[lead]` straight into `dst`, the contiguous slice of the output it fills: no copy
    of the chunk in memory at all. False when the blob is not a plain tensor of the output's dtype."""
    from hubexport.sources.pread import read_into

    found = _stored(path, c) if dst.is_contiguous() else None
    if found is None or found[1].dtype != dtype_name(dst.dtype):
        return False
    offset, t = found
    skip = _lead_skip(c, lead, t) * dst.element_size()
    try:
        with open(path, "rb") as f:
            read_into(f.fileno(), offset + skip, dst)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Piece:
    """One stored chunk's part of a region: where its bytes start in its file, and its box in the region."""

    file: str
    start: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Region:
    """A tensor's `nbytes`, pasted in memory by `paste` when asked for."""

    nbytes: int
    paste: Callable[[], bytearray]


Blobs = dict[StoredChunk, tuple[int, Tensor] | None]  # each chunk's _stored, once read


def region_pieces(dist_dir: Path, t: DcpTensor, lead: tuple[int, ...] = (), blobs: Blobs | None = None) -> list[Piece] | None:
    """Each chunk's part of `t[lead]` (fixed indices on the leading axes), in offset order: when every chunk that
    overlaps it is a plain torch.save blob of t's dtype and together they cover it once; None otherwise (read_region
    then loads the blobs with torch, and explains a damaged one). Reads the blobs' headers only, each once when the
    caller keeps `blobs` (a stacked key's one chunk holds every layer)."""
    n = len(lead)
    name, size = dtype_name(t.dtype), itemsize(t.dtype)
    blobs = {} if blobs is None else blobs
    pieces = []
    for c in t.chunks:
        if any(not (o <= i < o + s) for i, o, s in zip(lead, c.offsets, c.sizes, strict=False)):
            continue
        if c not in blobs:
            blobs[c] = _stored(dist_dir / c.file, c)
        found = blobs[c]
        if found is None or found[1].dtype != name:
            return None
        offset, stored = found
        pieces.append(Piece(c.file, offset + _lead_skip(c, lead, stored) * size, c.offsets[n:], c.sizes[n:]))
    if sum(math.prod(p.sizes) for p in pieces) != math.prod(t.shape[n:]):
        return None
    return sorted(pieces, key=lambda p: p.offsets)


def itemsize(dtype: torch.dtype | str) -> int:
    return ITEMSIZE[dtype] if isinstance(dtype, str) else dtype.itemsize


def region_runs(shape: tuple[int, ...], size: int, pieces: list[Piece]) -> list[tuple[str, int, int]] | None:
    """Where a region's bytes lie back to back in the .distcp files, as (file, offset, length) runs: when every
    piece is one run of its row-major bytes (chunks split along its first axis, or one chunk). None otherwise
    (region_bytes or read_region then assemble it in memory). `size` is the item size."""
    if not all(one_run(shape, p.offsets, p.sizes) for p in pieces):
        return None
    return [(p.file, p.start, math.prod(p.sizes) * size) for p in pieces]


def region_bytes(fds: Callable[[str], int], shape: tuple[int, ...], size: int, pieces: list[Piece]) -> bytearray:
    """The region's row-major bytes pasted from its pieces without torch (a weight TP split along its columns: one
    read per piece, one copy per row); `size` is the item size. `fds` opens a .distcp file by name."""
    out = bytearray(math.prod(shape) * size)
    view = memoryview(out)
    for p in pieces:
        data = os.pread(fds(p.file), math.prod(p.sizes) * size, p.start)
        if len(data) != math.prod(p.sizes) * size:
            raise OSError(f"{p.file} is shorter than its .metadata says")
        run, starts = box_runs(shape, p.offsets, p.sizes)
        width, src = run * size, memoryview(data)
        for i, first in enumerate(starts):
            view[first * size:first * size + width] = src[i * width:(i + 1) * width]
    return out


def read_region(dist_dir: Path, t: DcpTensor, lead: tuple[int, ...] = (),
                load: Callable[[Path, StoredChunk, str], torch.Tensor] = _load_blob) -> torch.Tensor:
    """The sub-tensor `t[lead]` (fixed indices on the leading axes), pasted from every chunk that overlaps it.
    Only blobs that overlap are read, so one layer of a stacked key costs one layer's bytes. `load` reads one
    chunk (a torch.save blob by default; safetensors-serialised DCP passes its own). A torch.save chunk whose part
    is a contiguous slice of the output (row blocks, one layer of a stacked key) is read straight into it."""
    import torch

    n = len(lead)
    out_shape = t.shape[n:]
    out = torch.empty(out_shape, dtype=t.dtype)
    covered = 0
    for c in t.chunks:
        if any(not (o <= i < o + s) for i, o, s in zip(lead, c.offsets, c.sizes, strict=False)):
            continue
        dst = tuple(slice(o, o + s) for o, s in zip(c.offsets[n:], c.sizes[n:], strict=True))
        if load is _load_blob and _read_into(dist_dir / c.file, c, lead, out[dst]):
            covered += out[dst].numel()
            continue
        data = load(dist_dir, c, t.key)
        if tuple(data.shape) != c.sizes:
            raise CheckpointError(f"chunk of {t.key} at {c.offsets} has shape {tuple(data.shape)}, "
                                  f"metadata says {c.sizes}", hint="the checkpoint is corrupt; re-copy it")
        sel = data[tuple(i - o for i, o in zip(lead, c.offsets, strict=False))]
        out[dst] = sel
        covered += sel.numel()
    if covered != out.numel():
        where = f"{t.key}[{', '.join(map(str, lead))}]" if lead else t.key
        raise CheckpointError(f"the chunks of {where} cover {covered} of {out.numel()} elements",
                              hint="a .distcp file is missing or the checkpoint is incomplete; re-copy dist_ckpt/")
    return out
