"""`sources/zipdir` reads a zip's central directory as `zipfile` does: torch.save's own archives, archives with a
comment, and zip64 records and extra fields (made by hand: a real one needs entries past 4 GB)."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from hubexport.sources import zipdir
from hubexport.sources.torchsave import Unreadable, read_archive


class _File:
    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.length = len(self.data)

    def pread(self, n: int, at: int) -> bytes:
        return self.data[at:at + n]


def _as_zipfile_reads(path: Path) -> list[tuple[str, int, int, bool]]:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, i.header_offset, i.file_size, i.compress_type == zipfile.ZIP_STORED) for i in z.infolist()]


def test_a_torch_save_archive_reads_as_zipfile_reads_it(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({f"w{i}": torch.full((i + 1,), float(i)) for i in range(40)}, path)
    assert list(zipdir.entries(_File(path))) == _as_zipfile_reads(path)
    archive = read_archive(path)
    assert sorted(archive.obj) == sorted(f"w{i}" for i in range(40))
    start, n = archive.byte_range(archive.obj["w3"])
    with open(path, "rb") as f:
        assert torch.frombuffer(bytearray(os.pread(f.fileno(), n, start)), dtype=torch.float32).tolist() == [3.0] * 4


@pytest.mark.parametrize("comment", [b"a comment", b"PK\x05\x06 a comment holding an end record's signature"])
def test_a_comment_and_a_compressed_entry(tmp_path, comment):
    """(zipfile itself refuses the second comment: it takes the last signature for the end record.)"""
    plain, path = tmp_path / "plain.zip", tmp_path / "c.zip"
    for p, text in ((plain, b"a comment"), (path, comment)):
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("a", b"x" * 100)
            z.writestr("b", b"y" * 1000, compress_type=zipfile.ZIP_DEFLATED)
            z.comment = text
    entries = list(zipdir.entries(_File(path)))
    assert entries == _as_zipfile_reads(plain)
    assert [stored for *_, stored in entries] == [True, False]


def _zip64(path: Path, blobs: dict[str, bytes]) -> None:
    """A stored zip whose every size and offset is in zip64 fields, and a zip64 end record (as torch writes for
    archives past 4 GB)."""
    out, central = bytearray(), bytearray()
    for name, blob in blobs.items():
        header = len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, 0, 0, 0, zipfile.crc32(blob), len(blob), len(blob),
                           len(name), 0) + name.encode() + blob
        extra = struct.pack("<2H3Q", 1, 24, len(blob), len(blob), header)
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, 0, 0, 0, 0, zipfile.crc32(blob), 0xFFFFFFFF,
                               0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + name.encode() + extra
    offset, end64 = len(out), len(out) + len(central)
    out += central
    out += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, len(blobs), len(blobs), len(central), offset)
    out += struct.pack("<4sLQL", b"PK\x06\x07", 0, end64, 1)
    out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(bytes(out))


def test_zip64_fields_read_as_zipfile_reads_them(tmp_path):
    path = tmp_path / "z64.zip"
    _zip64(path, {"a/data.pkl": b"p" * 7, "a/data/0": b"\x01" * 64, "a/data/1": b""})
    entries = list(zipdir.entries(_File(path)))
    assert entries == _as_zipfile_reads(path)
    assert [size for _, _, size, _ in entries] == [7, 64, 0]


@pytest.mark.parametrize("cut", [1, 22, 60, 200])
def test_a_cut_archive_is_refused(tmp_path, cut):
    path = tmp_path / "t.pt"
    torch.save({"w": torch.ones(3)}, path)
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(zipdir.BadZip):
        list(zipdir.entries(_File(path)))
    with pytest.raises(Unreadable):
        read_archive(path)
