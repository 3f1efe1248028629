"""`torch.save` archives read without torch: the pickle through an allowlist of inert stand-ins (nothing is called,
no class of the file's choosing is built), and each storage's byte range in the zip (torch stores them uncompressed).

Only what a verl rank file of DTensors or plain tensors names is known; any other global raises `Unreadable`, and the
caller falls back to torch's own weights-only loader, which then explains what is wrong with the file."""

from __future__ import annotations

import array
import functools
import mmap
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubexport.sources import zipdir

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

    def __init__(self, file: mmap.mmap, archive: Archive, slim: Slim | None) -> None:
        super().__init__(file)
        rebuild = _rebuild_from_type_v2
        self._rebuild = rebuild if slim is None else (lambda *args: slim(rebuild(*args), archive))

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        try:
            found = _ALLOWED[module, name]
        except KeyError:
            raise Unreadable(f"{module}.{name}") from None
        return self._rebuild if found is _rebuild_from_type_v2 else found

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


@dataclass(frozen=True)
class _Window:
    """Bytes [start, start + length) of an open file as an archive of their own (a torch.save blob in a .distcp)."""

    fd: int
    start: int
    length: int

    def pread(self, n: int, at: int) -> bytes:
        """Up to n bytes from `at` (of the window), never past its end."""
        return os.pread(self.fd, max(min(n, self.length - at), 0), self.start + at)


# What a tensor subclass (a DTensor) is replaced by as soon as it is unpickled, given the archive being read (its
# offsets are known): its stand-ins then go at once, not when the whole file is read.
Slim = Callable[[Wrapper, Archive], Any]


def read_archive(path: Path, start: int = 0, length: int | None = None, slim: Slim | None = None) -> Archive:
    """Unpickle `path` (or the archive at bytes [start, start + length) of it) with the allowlist and locate its
    storages; offsets are the file's. The zip directory is dropped before the pickle is read, so the two are never
    held at once. Raises Unreadable (or OSError)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size - start if length is None else length
            (at, pickled), offsets = _directory(_Window(f.fileno(), start, size))
            archive = Archive(path, None, offsets)
            with _pruned(f.fileno(), at, pickled) as data:
                archive.obj = _Unpickler(data, archive, slim).load()
            return archive
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from None


def _pruned(fd: int, at: int, n: int) -> mmap.mmap:
    """data.pkl without its idle PUTs, pruned where it is read. In a mapping of its own: unmapped when closed, where
    the heap would keep its freed pages (and glibc's threshold for mapping large blocks would rise to its size)."""
    data = mmap.mmap(-1, max(n, 1))
    if n and os.preadv(fd, [data], at) != n:
        data.close()
        raise Unreadable("data.pkl is cut short")
    without_idle_memo(data)
    return data


def _directory(window: _Window) -> tuple[tuple[int, int], dict[str, tuple[int, int]]]:
    """(file offset, length) of data.pkl, and of each storage by its key; torch stores every entry uncompressed. The
    zip directory is read twice (once for data.pkl's folder), not held."""
    pickles = [e for e in zipdir.entries(window) if e[0].endswith("/data.pkl") or e[0] == "data.pkl"]
    if len(pickles) != 1:
        raise Unreadable("not one data.pkl")
    prefix = pickles[0][0].removesuffix("data.pkl")
    offsets, byteorder = {}, None
    for entry in zipdir.entries(window):
        if entry[0].startswith(prefix + "data/"):
            offsets[entry[0].removeprefix(prefix + "data/")] = _data_range(*entry, window)
        elif entry[0] == prefix + "byteorder":
            byteorder = _data_range(*entry, window)
    if byteorder is not None and os.pread(window.fd, byteorder[1], byteorder[0]) != b"little":
        raise Unreadable("a big-endian archive")
    return _data_range(*pickles[0], window), offsets


def _data_range(name: str, header: int, size: int, stored: bool, window: _Window) -> tuple[int, int]:
    if not stored:
        raise Unreadable(f"{name} is compressed")
    sig, name_len, extra_len = _LOCAL_HEADER.unpack(window.pread(_LOCAL_HEADER.size, header))
    if sig != b"PK\x03\x04":
        raise Unreadable(f"{name} has no local header")
    return window.start + header + _LOCAL_HEADER.size + name_len + extra_len, size


# Protocol 2's binary opcodes (what torch.save writes) by the bytes of argument after them: fixed sizes, or a length
# of 1 or 4 bytes followed by that many. Memo opcodes are handled apart; any other opcode leaves a pickle as it is.
_FIXED = {**dict.fromkeys(b"(.012N\x88\x89t\x85\x86\x87)]}aesuRb\x81Qdlo", 0),
          ord("K"): 1, 0x80: 1, ord("M"): 2, ord("J"): 4, ord("G"): 8}
_SIZED = {ord("U"): 1, ord("C"): 1, 0x8C: 1, 0x8A: 1, ord("X"): 4, ord("T"): 4, ord("B"): 4, 0x8B: 4}
_PUT = {ord("q"): 1, ord("r"): 4}  # BINPUT, LONG_BINPUT
_GET = {ord("h"): 1, ord("j"): 4}  # BINGET, LONG_BINGET
_GLOBAL, _STOP = ord("c"), ord(".")


def without_idle_memo(data: bytearray | mmap.mmap) -> int:
    """Prunes, in place, the pickle's PUTs that no GET reads back, and returns its length after (the bytes past it are
    left as they were). The unpickler's memo holds what each PUT names until the load ends, and torch.save PUTs every
    tuple, dict and string: a rank file's args tuples and spec states, kept whole whatever the stand-ins keep (~3 KB
    per tensor). Unchanged when it holds an opcode not listed above."""
    # each PUT's offset (65,000 in a rank file of 2,000 DTensors): 4 bytes each where they fit
    puts, read, i, end = array.array("I" if len(data) < 1 << 32 else "q"), set(), 0, len(data)
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
        elif op == _GLOBAL and (i := _past_lines(data, i, 2)) >= 0:  # module and name, each ending in a newline
            pass
        else:
            return end  # an opcode not listed, or a GLOBAL cut short
        if op == _STOP:
            break
    else:
        return end  # no STOP: left whole, so the load fails where it ends (not in the stale bytes pruning leaves)
    kept, last = 0, 0  # bytes [last, at) move down to `kept`: only bytes already read are overwritten
    with memoryview(data) as view:
        for at in puts:
            n = _PUT[data[at]]
            if int.from_bytes(data[at + 1:at + 1 + n], "little") not in read:
                view[kept:kept + at - last] = view[last:at]  # overlapping: memoryview copies with memmove
                kept, last = kept + at - last, at + 1 + n
        view[kept:kept + end - last] = view[last:]
    return kept + end - last


def _past_lines(data: bytearray | mmap.mmap, i: int, lines: int) -> int:
    """The offset just past `lines` more newlines from i; -1 when the data ends first."""
    for _ in range(lines):
        i = data.find(b"\n", i)
        if i < 0:
            return -1
        i += 1
    return i
