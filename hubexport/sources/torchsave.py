"""`torch.save` archives read without torch: the pickle through an allowlist of inert stand-ins (nothing is called,
no class of the file's choosing is built), and each storage's byte range in the zip (torch stores them uncompressed).

Only what a verl rank file of DTensors or plain tensors names is known; any other global raises `Unreadable`, and the
caller falls back to torch's own weights-only loader, which then explains what is wrong with the file."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# torch dtype name → bytes per element, for the dtypes a checkpoint's weights and buffers use
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_STORAGES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
             "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
             "Float8_e4m3fnStorage": "float8_e4m3fn", "Float8_e5m2Storage": "float8_e5m2"}
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


class Unreadable(Exception):
    """The archive holds something this reader does not know (torch's loader decides what it is)."""


@dataclass(frozen=True)
class Storage:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class Tensor:
    """A plain tensor: a strided view of a storage."""

    storage: Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


class Stub:
    """Any allowed class of torch.distributed (DTensor, its spec, mesh, placements): it keeps the arguments it was
    made with and the state it was given, and does nothing else."""

    kind = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = super().__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = object_state(state)

    def get(self, key: str, default: Any = None) -> Any:
        return self.state.get(key, default)


def _stub(kind: str) -> type[Stub]:
    return type(kind, (Stub,), {"kind": kind})


@dataclass
class Wrapper:
    """A tensor subclass (a DTensor) as `_rebuild_wrapper_subclass` and `_rebuild_from_type_v2` describe it."""

    cls: type[Stub]
    dtype: str
    shape: tuple[int, ...]
    state: dict[str, Any] = field(default_factory=dict)


def _rebuild_tensor_v2(storage: Storage, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                       hooks: Any = None, metadata: Any = None) -> Tensor:
    if hooks or metadata or not isinstance(storage, Storage):
        raise Unreadable("tensor with hooks or metadata")
    return Tensor(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_wrapper_subclass(cls: Any, dtype: str, size: tuple, stride: tuple, offset: int, layout: str,
                              device: str, requires_grad: bool = False) -> Wrapper:
    if not (isinstance(cls, type) and issubclass(cls, Stub)) or layout != "torch.strided":
        raise Unreadable("tensor subclass")
    return Wrapper(cls, dtype, tuple(int(s) for s in size))


def object_state(state: Any) -> dict[str, Any]:
    """A pickled object state: a dict, or (dict, slots) as `copyreg` writes it for classes with slots."""
    if isinstance(state, tuple) and len(state) == 2:
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        raise Unreadable(f"object state {type(state).__name__}")
    return state


def _rebuild_from_type_v2(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    if func is not _rebuild_wrapper_subclass:
        raise Unreadable("tensor rebuilt by another function")
    obj = func(*args)
    if obj.cls is not new_type:
        raise Unreadable("tensor subclass changed on rebuild")
    obj.state = object_state(state)
    return obj


def as_size(*shape: Any) -> tuple[int, ...]:
    """`torch.Size(...)` as the plain tuple it is."""
    return tuple(int(s) for s in (shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape))


_DIST = "torch.distributed"
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_wrapper_subclass"): _rebuild_wrapper_subclass,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.serialization", "_get_layout"): str,
    ("torch", "device"): str,
    ("torch", "Size"): as_size,
    **{("torch", n): n for n in ITEMSIZE},
    **{(m, "DTensor"): _stub("DTensor") for m in (f"{_DIST}.tensor", f"{_DIST}.tensor._api", f"{_DIST}._tensor.api")},
    **{(m, n): _stub(n) for n in ("DTensorSpec", "TensorMeta", "ShardOrderEntry")
       for m in (f"{_DIST}.tensor._dtensor_spec", f"{_DIST}._tensor.placement_types")},
    **{(m, n): _stub(n) for n in ("Shard", "Replicate", "Partial", "_StridedShard", "_Partial")
       for m in (f"{_DIST}.tensor.placement_types", f"{_DIST}._tensor.placement_types")},
    (f"{_DIST}.device_mesh", "DeviceMesh"): _stub("DeviceMesh"),
    (f"{_DIST}._mesh_layout", "_MeshLayout"): _stub("_MeshLayout"),
    (f"{_DIST}._mesh_layout", "_FlatLayout"): _stub("_FlatLayout"),
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


class _Unpickler(pickle.Unpickler):
    """Every global the pickle names must be in the allowlist; storage classes stand for their dtype."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise Unreadable(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise Unreadable(f"persistent id {pid!r:.60}")
        return Storage(pid[1].dtype, str(pid[2]), int(pid[4]))


@dataclass
class Archive:
    """One torch.save file: its unpickled object and where each storage's bytes start in the file."""

    path: Path
    obj: Any
    offsets: dict[str, tuple[int, int]]  # storage key → (file offset, byte length)

    def byte_range(self, t: Tensor) -> tuple[int, int] | None:
        """(file offset, length) of a contiguous tensor's bytes; None when they are not a plain run of its storage."""
        if t.storage.key not in self.offsets or not t.contiguous() or t.offset < 0:
            return None
        start, size = self.offsets[t.storage.key]
        item = ITEMSIZE[t.dtype]
        begin, length = t.offset * item, t.numel * item
        if begin + length > size or t.storage.numel * item != size:
            return None
        return start + begin, length


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a file of their own (a torch.save blob inside a .distcp)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + offset, 0), self.length)
        return self.pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")[:max(self.length - self.pos, 0)]
        n = os.preadv(self.fd, [view], self.start + self.pos) if len(view) else 0
        self.pos += n
        return n


def read_archive(path: Path, start: int = 0, length: int | None = None) -> Archive:
    """Unpickle `path` (or the archive at bytes [start, start + length) of it) with the allowlist and locate its
    storages; offsets are the file's. Raises Unreadable (or OSError)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size - start if length is None else length
            window = _Window(f.fileno(), start, size)
            with zipfile.ZipFile(window) as z:
                return _read(path, z, window)
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from None


def _read(path: Path, z: zipfile.ZipFile, window: _Window) -> Archive:
    pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pickles) != 1:
        raise Unreadable("not one data.pkl")
    prefix = pickles[0].filename.removesuffix("data.pkl")
    if prefix + "byteorder" in z.namelist() and z.read(prefix + "byteorder") != b"little":
        raise Unreadable("a big-endian archive")
    with z.open(pickles[0]) as f:
        obj = _Unpickler(f).load()
    offsets = {}
    for info in z.infolist():
        if not info.filename.startswith(prefix + "data/"):
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise Unreadable(f"{info.filename} is compressed")
        window.seek(info.header_offset)
        sig, name_len, extra_len = _LOCAL_HEADER.unpack(window.read(_LOCAL_HEADER.size))
        if sig != b"PK\x03\x04":
            raise Unreadable(f"{info.filename} has no local header")
        data = window.start + info.header_offset + 30 + name_len + extra_len
        offsets[info.filename.removeprefix(prefix + "data/")] = (data, info.file_size)
    return Archive(path, obj, offsets)
