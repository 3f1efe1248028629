"""One contiguous tensor as `torch.save` writes it, byte for byte, without torch: the pickle, the zip records (64-byte
aligned data, data descriptors, zip64 fields past 4 GiB, zip64 end records) and the serialization id, so the tensor's
bytes can be copied into place file to file and only its CRC-32 is computed from them.

Matches torch 2.x's writer (`caffe2/serialize/inline_container.cc` on miniz); `tests/test_distcp_writer.py` compares
it with `torch.save`."""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

ALIGN = 64
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
# torch dtype name → the storage class torch.save names in the pickle
STORAGE_CLASS = {"float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
                 "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
                 "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
                 "float8_e4m3fn": "Float8_e4m3fnStorage", "float8_e5m2": "Float8_e5m2Storage"}
_BEFORE = (("data.pkl", None), (".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"))
_DATA, _VERSION, _ID = "data/0", ("version", b"3\n"), ".data/serialization_id"
_RECORDS = [*(n for n, _ in _BEFORE), _DATA, _VERSION[0]]  # in write order


def _std_hash(data: bytes) -> int:
    """libstdc++'s std::hash of a string (_Hash_bytes, 64-bit): torch hashes record names with it."""
    mul = (0xC6A4A793 << 32) + 0x5BD1E995
    n, aligned = len(data), len(data) & ~7
    h = (0xC70F6907 ^ (n * mul)) & _U64
    for i in range(0, aligned, 8):
        k = (int.from_bytes(data[i:i + 8], "little") * mul) & _U64
        h = ((h ^ ((k ^ (k >> 47)) * mul & _U64)) * mul) & _U64
    if n & 7:
        h = ((h ^ int.from_bytes(data[aligned:], "little")) * mul) & _U64
    h = ((h ^ (h >> 47)) * mul) & _U64
    return h ^ (h >> 47)


def _combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64 bits."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _U64)) & _U64


def _names_hash() -> int:
    h = 0
    for name in reversed(_RECORDS):  # torch folds its unordered_set of names: newest first
        h = _combine(h, _std_hash(name.encode()))
    return h


_NAMES_HASH = _names_hash()


def _int(v: int) -> bytes:
    """A non-negative int as Python's pickler writes it (BININT1, BININT2, BININT, else LONG1)."""
    if v < 256:
        return b"K" + bytes([v])
    if v < 65536:
        return b"M" + struct.pack("<H", v)
    if v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() >> 3) + 1
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


class _Pickle:
    """The protocol-2 opcodes Python's pickler emits for torch.save's tensor, each memoised object numbered."""

    def __init__(self) -> None:
        self.out, self.memo = bytearray(b"\x80\x02"), 0

    def put(self, op: bytes) -> None:
        self.out += op + b"q" + bytes([self.memo])
        self.memo += 1

    def tuple(self, items: list[bytes]) -> None:
        """A tuple of encoded items: TUPLE1-3 opcodes, MARK ... TUPLE beyond; the empty tuple is not memoised."""
        if not items:
            self.out += b")"
        elif len(items) <= 3:
            self.put(b"".join(items) + b"\x85\x86\x87"[len(items) - 1:len(items)])
        else:
            self.put(b"(" + b"".join(items) + b"t")


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def tensor_pickle(dtype: str, shape: tuple[int, ...]) -> bytes:
    """`data.pkl` of torch.save(t) for a contiguous `t` (storage offset 0): `_rebuild_tensor_v2` of storage '0'."""
    numel, stride = 1, []
    for s in reversed(shape):
        stride.append(numel)
        numel *= s
    p = _Pickle()
    p.put(b"ctorch._utils\n_rebuild_tensor_v2\n")
    p.out += b"("  # the call's argument tuple
    p.out += b"("  # the persistent id: ('storage', class, key, location, numel)
    p.put(_text("storage"))
    p.put(f"ctorch\n{STORAGE_CLASS[dtype]}\n".encode())
    p.put(_text("0"))
    p.put(_text("cpu"))
    p.put(_int(numel) + b"t")
    p.out += b"Q"
    p.out += _int(0)
    p.tuple([_int(s) for s in shape])
    p.tuple([_int(s) for s in reversed(stride)])
    p.out += b"\x89"  # requires_grad=False
    p.put(b"ccollections\nOrderedDict\n")
    p.put(b")R")  # OrderedDict()
    p.put(b"t")
    p.put(b"R")
    return bytes(p.out + b".")


def _zip64(size: int, cursor: int, compressed: int) -> bytes:
    """miniz's zip64 extended-information field: the sizes past 4 GiB, the header's offset past 4 GiB."""
    values = (size, compressed) * (size >= _U32) + (cursor,) * (cursor >= _U32)
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


def _local(cursor: int, name: str, size: int) -> bytes:
    """A local file header with torch's `FB` padding extra field, so the record's data starts 64-byte aligned."""
    full = f"archive/{name}".encode()
    wide = _zip64(size, cursor, 0)  # a streamed record: the compressed size follows the data
    start = cursor + 30 + len(full) + len(wide) + 4
    pad = -start % ALIGN
    extra = wide + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, 0x808, 0, 0, 0, 0, 0, 0, len(full), len(extra)) + full + extra


def _descriptor(crc: int, size: int, cursor: int) -> bytes:
    if size >= _U32 or cursor >= _U32:
        return struct.pack("<4sIQQ", b"PK\x07\x08", crc, size, size)
    return struct.pack("<4sIII", b"PK\x07\x08", crc, size, size)


def _central(name: str, crc: int, size: int, cursor: int) -> bytes:
    full = f"archive/{name}".encode()
    wide = _zip64(size, cursor, size)
    short = min(size, _U32)
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, 0x808, 0, 0, 0, crc, short, short, len(full),
                       len(wide), 0, 0, 0, 0, min(cursor, _U32)) + full + wide


def _record(cursor: int, name: str, data: bytes) -> tuple[bytes, tuple[str, int, int, int]]:
    """A small record whole (header, data, descriptor) and its central-directory facts."""
    crc = zlib.crc32(data)
    return _local(cursor, name, len(data)) + data + _descriptor(crc, len(data), cursor), (name, crc, len(data), cursor)


@dataclass(frozen=True)
class Layout:
    """An archive around one tensor's `nbytes`: `head`, the data, then `tail(crc)`."""

    head: bytes
    nbytes: int
    records: tuple[tuple[str, int, int, int], ...]  # (name, crc, size, offset) of every record before the data
    data_offset: int  # where the data's own local header starts

    @functools.cached_property
    def tail_size(self) -> int:
        return len(self.tail(0))  # the tail's length does not depend on the CRC

    @property
    def size(self) -> int:
        return len(self.head) + self.nbytes + self.tail_size

    def tail(self, crc: int) -> bytes:
        """What follows the data once its CRC-32 is known: its descriptor, the version and serialization id records,
        the central directory and the (zip64) end records."""
        records = [*self.records, (_DATA, crc, self.nbytes, self.data_offset)]
        out = bytearray(_descriptor(crc, self.nbytes, self.data_offset))
        start = len(self.head) + self.nbytes
        raw, facts = _record(start + len(out), *_VERSION)
        out += raw
        records.append(facts)
        combined = 0  # torch's id: the record names' hash, then their CRCs folded in write order
        for _, c, _, _ in records:
            combined = _combine(combined, c)
        raw, facts = _record(start + len(out), _ID, f"{_NAMES_HASH:020d}{combined:020d}".encode())
        out += raw
        records.append(facts)
        directory = b"".join(_central(*r) for r in records)
        at, n = start + len(out), len(records)
        out += directory
        out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x31E, 0x2D, 0, 0, n, n, len(directory), at)
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, at + len(directory), 1)
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(directory), min(at, _U32), 0)
        return bytes(out)


def layout(dtype: str, shape: tuple[int, ...], itemsize: int) -> Layout:
    """The archive torch.save writes for a contiguous tensor of `dtype` and `shape`."""
    nbytes = itemsize
    for s in shape:
        nbytes *= s
    head, records = bytearray(), []
    for name, data in _BEFORE:
        raw, facts = _record(len(head), name, tensor_pickle(dtype, shape) if data is None else data)
        head += raw
        records.append(facts)
    data_offset = len(head)
    head += _local(data_offset, _DATA, nbytes)
    return Layout(bytes(head), nbytes, tuple(records), data_offset)
