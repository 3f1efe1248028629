"""Streaming safetensors writer: the header is computed from specs alone, then tensors are appended one at a time,
so memory holds one tensor group, never a whole shard."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hubexport.core import TensorSpec

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}


def header_bytes(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to 8-byte alignment as safetensors itself does."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


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


def read_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header without touching tensor data (used to verify what was written)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path} has an implausible header length {n}")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a header that is not a JSON object")
    header.pop("__metadata__", None)
    return header


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
