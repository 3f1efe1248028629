"""Tensors read from file offsets into memory with pread: not through a memory map, whose pages would stay resident
(and count towards the process's memory) for every byte ever read."""

from __future__ import annotations

import errno
import os

import torch


def read_into(fd: int, offset: int, dst: torch.Tensor) -> None:
    """Fill the contiguous tensor `dst` with the bytes at `offset` of an open file. OSError when the file ends
    first."""
    if not dst.is_contiguous():
        raise ValueError("read_into needs a contiguous destination")  # reshape would fill a copy
    view, done = memoryview(dst.reshape(-1).view(torch.uint8).numpy()) if dst.numel() else memoryview(b""), 0
    while done < len(view):  # one pread returns at most ~2 GB on Linux
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"the file ends {len(view) - done} bytes before the tensor does")
        done += n


def read_tensor(fd: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor stored row-major at `offset` of an open file, in fresh memory."""
    out = torch.empty(shape, dtype=dtype)
    read_into(fd, offset, out)
    return out
