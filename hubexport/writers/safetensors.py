"""Streaming safetensors writer: the header is computed from specs alone, then tensors are appended one at a time,
so memory holds one tensor group, never a whole shard."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hubexport.core import TensorSpec
from hubexport.safetensors_format import header_bytes


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor without a copy when it is already contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_file(
    path: Path,
    specs: list[TensorSpec],
    fetch: Callable[[TensorSpec], torch.Tensor],
    *,
    fsync: bool = True,
) -> str:
    """Write one safetensors file, asking `fetch` for each tensor in order. Returns the file's sha256."""
    try:
        return _write(path, specs, fetch, fsync=fsync)
    except OSError as e:  # name the file: a failed write() does not
        raise OSError(e.errno, e.strerror, str(path)) from None


def _write(path: Path, specs: list[TensorSpec], fetch: Callable[[TensorSpec], torch.Tensor], *, fsync: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        head = header_bytes(specs)
        f.write(head)
        digest.update(head)
        for spec, t in _one_ahead(specs, fetch):
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise AssertionError(
                    f"{spec.name}: produced {tuple(t.shape)} {t.dtype}, planned {spec.shape} {spec.dtype}"
                )
            data = tensor_bytes(t)
            f.write(data)
            digest.update(data)
            del t, data
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _one_ahead(specs: list[TensorSpec], fetch: Callable[[TensorSpec], torch.Tensor]
               ) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
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
