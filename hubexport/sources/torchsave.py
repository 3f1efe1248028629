"""`torch.save` archives read without torch: the pickle through an allowlist of inert stand-ins (nothing is called,
no class of the file's choosing is built), and each storage's byte range in the zip (torch stores them uncompressed).

Only what a verl rank file of DTensors or plain tensors names is known; any other global raises `Unreadable`, and the
caller falls back to torch's own weights-only loader, which then explains what is wrong with the file."""

from __future__ import annotations

import array
import functools
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Storage:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True, slots=True)
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
    """Any allowed class of torch.distributed (DTensor, its spec, mesh, placements): it keeps the state it was given,
    and does nothing else. A kind with `keep` keeps only those keys' values, as a tuple: a rank file holds several
    stand-ins per tensor."""

    __slots__ = ("state",)
    kind = ""
    keep: tuple[str, ...] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = super().__new__(cls)
        obj.state = {} if cls.keep is None else (None,) * len(cls.keep)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        state = object_state(state)
        if self.keep is not None:
            kept = tuple(state.get(k) for k in self.keep)
            state = _one_of_each(kept) if all(type(v) is int for v in kept) else kept  # a Shard's (dim,)
        self.state = state

    def get(self, key: str, default: Any = None) -> Any:
        if self.keep is None:
            return self.state.get(key, default)
        return self.state[self.keep.index(key)] if key in self.keep else default


def _stub(kind: str, keep: tuple[str, ...] | None = None) -> type[Stub]:
    return type(kind, (Stub,), {"kind": kind, "keep": keep, "__slots__": ()})


@dataclass(slots=True)
class Wrapper:
    """A tensor subclass (a DTensor) as `_rebuild_wrapper_subclass` and `_rebuild_from_type_v2` describe it: its
    spec and local tensor, the two fields of its state that are read."""

    cls: type[Stub]
    dtype: str
    shape: tuple[int, ...]
    spec: Any = None
    local: Any = None


def _rebuild_tensor_v2(storage: Storage, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                       hooks: Any = None, metadata: Any = None) -> Tensor:
    if hooks or metadata or not isinstance(storage, Storage):
        raise Unreadable("tensor with hooks or metadata")
    return Tensor(storage, int(offset), ints(size), ints(stride))


def _rebuild_wrapper_subclass(cls: Any, dtype: str, size: tuple, stride: tuple, offset: int, layout: str,
                              device: str, requires_grad: bool = False) -> Wrapper:
    if not (isinstance(cls, type) and issubclass(cls, Stub)) or layout != "torch.strided":
        raise Unreadable("tensor subclass")
    return Wrapper(cls, dtype, ints(size))


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
    state = object_state(state)
    obj.spec, obj.local = state.get("_spec"), state.get("_local_tensor")
    return obj


def as_size(*shape: Any) -> tuple[int, ...]:
    """`torch.Size(...)` as the plain tuple it is."""
    return ints(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)


_one_of_each = functools.lru_cache(maxsize=4096)(tuple)


def ints(values: Any) -> tuple[int, ...]:
    """A shape or stride as a tuple of ints, one object per distinct value: they repeat layer after layer, and a
    rank file holds three per tensor (0.5 MB less at the peak of reading an 8 GB checkpoint of 1,923 tensors)."""
    return _one_of_each(tuple(int(v) for v in values))


_DIST = "torch.distributed"
# what a DTensor's spec is read for (`sources/fsdp_files`): its mesh and placements (each its dim), not its tensor
# meta or shard order
_SPEC_KEEPS: dict[str, tuple[str, ...]] = {"DTensorSpec": ("mesh", "placements"), "TensorMeta": (), "ShardOrderEntry": ()}
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
    **{(m, n): _stub(n, keep) for n, keep in _SPEC_KEEPS.items()
       for m in (f"{_DIST}.tensor._dtensor_spec", f"{_DIST}._tensor.placement_types")},
    **{(m, n): _stub(n, ("dim",)) for n in ("Shard", "Replicate", "Partial", "_StridedShard", "_Partial")
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
    storages; offsets are the file's. The zip directory is dropped before the pickle is read, so the two are never
    held at once. Raises Unreadable (or OSError)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size - start if length is None else length
            window = _Window(f.fileno(), start, size)
            with zipfile.ZipFile(window) as z:
                (at, pickled), offsets = _stored(z, window)
            pickle_bytes = without_idle_memo(_read_exactly(f.fileno(), at, pickled))
            return Archive(path, _Unpickler(io.BytesIO(pickle_bytes)).load(), offsets)
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from None


def _read_exactly(fd: int, at: int, n: int) -> bytes:
    data = os.pread(fd, n, at)
    if len(data) != n:
        raise Unreadable("data.pkl is cut short")
    return data


def _stored(z: zipfile.ZipFile, window: _Window) -> tuple[tuple[int, int], dict[str, tuple[int, int]]]:
    """(file offset, length) of data.pkl, and of each storage by its key; torch stores every entry uncompressed."""
    pickles = [i for i in z.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pickles) != 1:
        raise Unreadable("not one data.pkl")
    prefix = pickles[0].filename.removesuffix("data.pkl")
    if prefix + "byteorder" in z.namelist() and z.read(prefix + "byteorder") != b"little":
        raise Unreadable("a big-endian archive")
    offsets = {info.filename.removeprefix(prefix + "data/"): _data_range(info, window)
               for info in z.infolist() if info.filename.startswith(prefix + "data/")}
    return _data_range(pickles[0], window), offsets


def _data_range(info: zipfile.ZipInfo, window: _Window) -> tuple[int, int]:
    if info.compress_type != zipfile.ZIP_STORED:
        raise Unreadable(f"{info.filename} is compressed")
    window.seek(info.header_offset)
    sig, name_len, extra_len = _LOCAL_HEADER.unpack(window.read(_LOCAL_HEADER.size))
    if sig != b"PK\x03\x04":
        raise Unreadable(f"{info.filename} has no local header")
    return window.start + info.header_offset + 30 + name_len + extra_len, info.file_size


# Protocol 2's binary opcodes (what torch.save writes) by the bytes of argument after them: fixed sizes, or a length
# of 1 or 4 bytes followed by that many. Memo opcodes are handled apart; any other opcode leaves a pickle as it is.
_FIXED = {**dict.fromkeys(b"(.012N\x88\x89t\x85\x86\x87)]}aesuRb\x81Qdlo", 0),
          ord("K"): 1, 0x80: 1, ord("M"): 2, ord("J"): 4, ord("G"): 8}
_SIZED = {ord("U"): 1, ord("C"): 1, 0x8C: 1, 0x8A: 1, ord("X"): 4, ord("T"): 4, ord("B"): 4, 0x8B: 4}
_PUT = {ord("q"): 1, ord("r"): 4}  # BINPUT, LONG_BINPUT
_GET = {ord("h"): 1, ord("j"): 4}  # BINGET, LONG_BINGET
_GLOBAL, _STOP = ord("c"), ord(".")


def without_idle_memo(data: bytes) -> bytes:
    """The pickle without its PUTs that no GET reads back. The unpickler's memo holds what each PUT names until the
    load ends, and torch.save PUTs every tuple, dict and string: a rank file's args tuples and spec states, kept
    whole whatever the stand-ins keep (~3 KB per tensor). Unchanged when it holds an opcode not listed above."""
    puts, read, i, end = array.array("q"), set(), 0, len(data)  # each PUT's offset
    while i < end:
        op = data[i]
        i += 1
        if (n := _FIXED.get(op)) is not None:
            i += n
        elif (n := _SIZED.get(op)) is not None:
            i += n + int.from_bytes(data[i:i + n], "little")
        elif (n := _PUT.get(op)) is not None:
            puts.append(i - 1)
            i += n
        elif (n := _GET.get(op)) is not None:
            read.add(int.from_bytes(data[i:i + n], "little"))
            i += n
        elif op == _GLOBAL:  # module and name, each ending in a newline
            i = data.index(b"\n", data.index(b"\n", i) + 1) + 1
        else:
            return data
        if op == _STOP:
            break
    out, last, view = bytearray(), 0, memoryview(data)
    for at in puts:
        n = _PUT[data[at]]
        if int.from_bytes(data[at + 1:at + 1 + n], "little") not in read:
            out += view[last:at]
            last = at + 1 + n
    out += view[last:]
    view.release()
    del data, view, puts  # before the copy: the load's bytes are the one thing left
    return bytes(out)
