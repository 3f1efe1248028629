"""A zip archive's central directory as (name, local header offset, size, stored) per entry, read from its bytes.

`zipfile` builds a ZipInfo of some 500 bytes for every entry, and a rank file of 2,000 tensors has 2,000 entries:
1 MB held while the file is located, the largest part of what locating an 8 GB checkpoint costs at its peak. This
reads only what torch.save's archives need (zip64 included); anything else raises BadZip, and the caller falls back
to torch's own loader."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Protocol

_END = struct.Struct("<4s4H2LH")  # signature, disk, directory's disk, entries here, entries, its size, its offset, comment
_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the zip64 end record, disks
_END64 = struct.Struct("<4sQ2H2L4Q")  # signature, size, versions, disks, entries here, entries, its size, its offset
_ENTRY = struct.Struct("<4s6H3L5H2L")  # signature, versions, flags, method, time, date, crc, sizes, name, extra,
#                                       comment lengths, disk, attributes, local header offset
_FULL16, _FULL32 = 0xFFFF, 0xFFFFFFFF  # "see the zip64 record"
_ZIP64_EXTRA = 1
_MAX_COMMENT = 0xFFFF


class BadZip(ValueError):
    """Not a zip archive this reader knows."""


class Readable(Protocol):
    length: int

    def pread(self, n: int, at: int) -> bytes: ...


def entries(archive: Readable) -> Iterator[tuple[str, int, int, bool]]:
    """Each entry's (name, local header offset, uncompressed size, stored uncompressed), in directory order."""
    count, size, offset = _directory(archive)
    data = archive.pread(size, offset)
    if len(data) != size:
        raise BadZip("zip directory cut short")
    at = 0
    for _ in range(count):
        if at + _ENTRY.size > size:
            raise BadZip("zip directory cut short")
        (sig, _made, _needed, flags, method, _time, _date, _crc, csize, usize, name_len, extra_len, comment_len,
         _disk, _internal, _external, header) = _ENTRY.unpack_from(data, at)
        if sig != b"PK\x01\x02":
            raise BadZip("bad zip directory entry")
        name_at = at + _ENTRY.size
        extra_at = name_at + name_len
        at = extra_at + extra_len + comment_len
        if at > size:
            raise BadZip("zip directory cut short")
        name = data[name_at:extra_at].decode("utf-8" if flags & 0x800 else "cp437")
        usize, csize, header = _zip64(data[extra_at:extra_at + extra_len], usize, csize, header)
        yield name, header, usize, method == 0 and csize == usize


def _directory(archive: Readable) -> tuple[int, int, int]:
    """(entries, size, offset) of the central directory, from the end record (or its zip64 record)."""
    tail = archive.pread(min(archive.length, _END.size + _MAX_COMMENT), max(archive.length - _END.size - _MAX_COMMENT, 0))
    base = archive.length - len(tail)
    at = len(tail) - _END.size + 1
    while True:  # the last signature whose comment ends the archive (a comment may hold the signature too)
        at = tail.rfind(b"PK\x05\x06", 0, at + 3)
        if at < 0:
            raise BadZip("no zip end record")
        _, disk, cd_disk, _here, count, size, offset, comment = _END.unpack_from(tail, at)
        if at + _END.size + comment == len(tail):
            break
    end = base + at
    if at >= _LOCATOR.size and tail[at - _LOCATOR.size:at - _LOCATOR.size + 4] == b"PK\x06\x07":
        _, _, end64, _ = _LOCATOR.unpack_from(tail, at - _LOCATOR.size)
        record = archive.pread(_END64.size, end64)
        if len(record) != _END64.size or record[:4] != b"PK\x06\x06":
            raise BadZip("bad zip64 end record")
        _, _, _, _, disk, cd_disk, _here, count, size, offset = _END64.unpack(record)
        end = end64
    elif _FULL16 in (count, disk, cd_disk) or _FULL32 in (size, offset):
        raise BadZip("zip64 end record missing")
    if disk or cd_disk or offset + size != end:
        raise BadZip("a zip archive of several disks, or with bytes before it")
    return count, size, offset


def _zip64(extra: bytes, usize: int, csize: int, header: int) -> tuple[int, int, int]:
    """The sizes and offset an entry's zip64 extra field holds in place of those saturated at 0xFFFFFFFF."""
    if _FULL32 not in (usize, csize, header):
        return usize, csize, header
    at = 0
    while at + 4 <= len(extra):
        kind, n = struct.unpack_from("<2H", extra, at)
        if kind == _ZIP64_EXTRA:
            values = iter(struct.unpack_from(f"<{n // 8}Q", extra, at + 4))
            try:
                usize = next(values) if usize == _FULL32 else usize
                csize = next(values) if csize == _FULL32 else csize
                header = next(values) if header == _FULL32 else header
            except StopIteration:
                raise BadZip("zip64 extra field too short") from None
            return usize, csize, header
        at += 4 + n
    raise BadZip("zip64 extra field missing")
