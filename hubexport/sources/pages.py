"""Give memory-mapped pages back after use, so resident memory stays bounded by the tensors in flight instead of
growing with every byte of checkpoint read (mapped file pages count towards RSS until unmapped or dropped)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import torch

_MADV_DONTNEED = 4  # on a private, never-written file mapping: pages are re-read from the file if touched again
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class MappedFiles:
    """Address ranges where checkpoint files are mapped. Only those are ever released: madvise(DONTNEED) on
    anonymous memory would zero it, so anything not proven file-backed is left alone (and on systems without
    /proc/self/maps nothing is released)."""

    def __init__(self, paths: list[Path]) -> None:
        index = {os.path.realpath(p): i for i, p in enumerate(paths)}
        self.ranges: list[tuple[int, int, int, int]] = []  # address lo, hi, file offset at lo, index into paths
        try:
            lines = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] in index:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                self.ranges.append((lo, hi, int(fields[2], 16), index[fields[5]]))

    def _mapping(self, start: int, end: int) -> tuple[int, int, int, int] | None:
        return next((r for r in self.ranges if r[0] <= start and end <= r[1]), None)

    def file_range(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(index into paths, file offset) of a contiguous tensor's bytes, read from the kernel's own record of the
        mapping; None when they are not mapped from one of the files (or /proc/self/maps is unavailable)."""
        start = t.data_ptr()
        found = self._mapping(start, start + t.numel() * t.element_size()) if t.is_contiguous() else None
        return None if found is None else (found[3], found[2] + start - found[0])

    def release(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if self._mapping(start, end) is None:
            return
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        if hi > lo:
            _libc.madvise(lo, hi - lo, _MADV_DONTNEED)
