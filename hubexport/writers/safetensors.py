"""Streaming safetensors writer: the header is computed from specs alone, then tensors are appended one at a time,
so memory holds one tensor group, never a whole shard. The sha256 is computed by its own thread while the bytes are
written (hashlib releases the GIL), and tensors that already lie in checkpoint files are copied file to file."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Union

from hubexport.core import ZEROS, FileSlices, TensorSpec
from hubexport.safetensors_format import header_bytes

if TYPE_CHECKING:  # a file made of copied slices alone (the fast merge path) is written without torch
    import torch

CHUNK = 16 << 20  # fallback copy buffer
# Read-back buffer, one per hashing thread: sha256 of 1 MiB pieces from the page cache is no slower than of 16 MiB
# ones (1.66 against 1.60 GB/s here), and several files are hashed at once (fast_merge.WRITERS).
READ_BACK = 1 << 20
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
Fetched = Union["torch.Tensor", FileSlices]
Part = memoryview | FileSlices  # bytes in memory, or bytes to copy from checkpoint files


class Sink(Protocol):
    def update(self, data: memoryview, /) -> None: ...


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor without a copy when it is already contiguous."""
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_file(
    path: Path,
    specs: list[TensorSpec],
    fetch: Callable[[TensorSpec], Fetched],
    *,
    fsync: bool = True,
) -> str:
    """Write one safetensors file, asking `fetch` for each tensor in order (a tensor, or the file slices holding
    its bytes). Returns the file's sha256."""
    return write_parts(path, header_bytes(specs), _checked(specs, fetch), fsync=fsync)


def write_parts(path: Path, head: bytes, parts: Iterator[Part], *, fsync: bool = True) -> str:
    """Write `head` then each part, in order, and return the file's sha256. A part in memory is hashed before the
    next one is asked for, so the iterator may drop it."""
    try:
        return _write(path, head, parts, fsync=fsync)
    except OSError as e:  # name the file: a failed write() does not
        raise OSError(e.errno, e.strerror, str(path)) from None


def _checked(specs: list[TensorSpec], fetch: Callable[[TensorSpec], Fetched]) -> Iterator[Part]:
    """Each fetched tensor's bytes, after checking it is what the plan (and so the header) says."""
    for spec, item in _one_ahead(specs, fetch):
        if isinstance(item, FileSlices):
            if item.nbytes != spec.nbytes:
                raise AssertionError(f"{spec.name}: {item.nbytes} bytes in the checkpoint, planned {spec.nbytes}")
            yield item
            continue
        if tuple(item.shape) != spec.shape or item.dtype != spec.dtype:
            raise AssertionError(
                f"{spec.name}: produced {tuple(item.shape)} {item.dtype}, planned {spec.shape} {spec.dtype}"
            )
        yield tensor_bytes(item)
        del item  # hashed and written: the tensor may go


def _write(path: Path, head: bytes, parts: Iterator[Part], *, fsync: bool) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    back = os.open(path, os.O_RDONLY)
    try:
        # One hashing thread, fed in file order: memory while it is written, copied slices read back from the page
        # cache once they are in the file.
        with ThreadPoolExecutor(1, thread_name_prefix="hubexport-sha256") as hasher:
            jobs: list[Future] = [hasher.submit(digest.update, head)]
            _write_all(fd, memoryview(head))
            for item in parts:
                if isinstance(item, FileSlices):
                    start = os.lseek(fd, 0, os.SEEK_CUR)
                    copy_slices(item, fd)
                    jobs.append(hasher.submit(read_back, digest, back, start, item.nbytes))
                    continue
                jobs.append(hasher.submit(digest.update, item))
                _write_all(fd, item)
                jobs[-1].result()  # hashed too: the part may go
                del item
            if fsync:
                os.fsync(fd)  # while the last bytes are hashed
            for job in jobs:
                job.result()
    finally:
        os.close(back)
        os.close(fd)
    return digest.hexdigest()


class Fsyncs:
    """Each written file fsync'd on a thread while the next one is written, so a file's writeback overlaps the next
    file's copy (4 files of 360 MB: 0.52 s against 0.81–1.1 s fsync'd one after another, benchmarks/fsync_ab.py). Leaving
    the block waits for every fsync and raises the first failure, naming its file: a job's write() still returns
    only once its files are durable."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hubexport-fsync")
        self._jobs: list[Future] = []

    def add(self, path: Path) -> None:
        self._jobs.append(self._pool.submit(_fsync, path))

    def __enter__(self) -> Fsyncs:
        return self

    def __exit__(self, failed: type[BaseException] | None, *_: object) -> None:
        self._pool.shutdown(wait=True)
        for job in self._jobs if failed is None else ():  # else the write's own error is the one to report
            job.result()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _write_all(fd: int, data: memoryview) -> None:
    data = data.cast("B") if data.format != "B" else data
    while data:
        data = data[os.write(fd, data):]


def read_back(sink: Sink, fd: int, start: int, length: int) -> None:
    """Feed `length` bytes of `fd` from `start` to `sink` (a hash): what was just written, from the page cache."""
    buf = _scratch()
    end = start + length
    while start < end:
        n = os.preadv(fd, [buf[:min(READ_BACK, end - start)]], start)
        if n == 0:
            raise OSError(errno.EIO, "the file is shorter than what was written to it")
        sink.update(buf[:n])
        start += n


_local = threading.local()


def _scratch() -> memoryview:
    """This thread's read-back buffer, made once. One per call zeroed as many bytes as it then read, and left freed
    blocks in each thread's malloc arena: peak RSS grew with the number of tensors (59 → 72 MB from 1 to 8 GB). It is
    mapped, not allocated: each file's hashing thread takes its buffer with it when it ends (from the heap, each left
    its megabyte in its arena: 1.1 MB more at 21 files than at 3)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(mmap.mmap(-1, READ_BACK))
    return buf


def copy_slices(slices: FileSlices, dst: int, *, kernel: bool = True) -> None:
    """Append the slices to `dst` at its position: copy_file_range (no user-space copy), or pread + write where the
    kernel or filesystem cannot (another filesystem on old kernels, some network filesystems)."""
    for src, offset, length in slices.parts:
        if src == ZEROS:
            _write_all(dst, memoryview(bytes(length)))
            continue
        end = offset + length
        while kernel and offset < end:
            try:
                n = os.copy_file_range(src, dst, end - offset, offset)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
                break
            if n == 0:
                raise OSError(errno.EIO, "a checkpoint file is shorter than its index says")
            offset += n
        if offset < end:
            _copy_through_memory(src, dst, offset, end)


def _copy_through_memory(src: int, dst: int, offset: int, end: int) -> None:
    buf = memoryview(bytearray(min(CHUNK, end - offset)))
    while offset < end:
        n = os.preadv(src, [buf[:min(CHUNK, end - offset)]], offset)
        if n == 0:
            raise OSError(errno.EIO, "a checkpoint file is shorter than its index says")
        _write_all(dst, buf[:n])
        offset += n


def _one_ahead(specs: list[TensorSpec], fetch: Callable[[TensorSpec], Fetched]) -> Iterator[tuple[TensorSpec, Fetched]]:
    """Fetch the next tensor while the current one is written, so reading/converting overlaps writing/hashing (torch
    copies, file writes and hashlib all release the GIL). One tensor ahead bounds the extra memory."""
    if not specs:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="hubexport-fetch") as pool:
        pending = pool.submit(fetch, specs[0])
        for i, spec in enumerate(specs):
            t = pending.result()
            if i + 1 < len(specs):
                pending = pool.submit(fetch, specs[i + 1])
            yield spec, t
