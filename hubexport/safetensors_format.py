"""The safetensors file format, both ways: dtype codes, the 8-byte length + JSON header, header entries as
TensorSpecs, and the shard index. Sources read it, writers write it, the card reads facts from it."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# torch dtype name → safetensors code; by name, so that writing a header never needs torch imported
DTYPE_CODES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
}
CODE_NAMES: dict[str, str] = {v: k for k, v in DTYPE_CODES.items()}


def dtype_code(dtype: object) -> str:
    """The safetensors code of a torch dtype (or of its name)."""
    return DTYPE_CODES[str(dtype).removeprefix("torch.")]


def code_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code; KeyError for a code torch has no dtype for."""
    import torch

    return getattr(torch, CODE_NAMES[code])


INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100_000_000


def header_bytes(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to 8-byte alignment as safetensors itself does."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": dtype_code(s.dtype), "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def raw_header(path: Path) -> bytes:
    """The 8-byte length and the JSON header, as they are in the file. Raises ValueError or OSError."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise ValueError(f"{path} has an implausible header length {n}")
        return raw + f.read(n)


def _header(path: Path) -> tuple[int, dict[str, dict]]:
    """The byte offset where tensor data starts, and the parsed header. Raises ValueError or OSError."""
    raw = raw_header(path)
    header = json.loads(raw[8:])
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a header that is not a JSON object")
    header.pop("__metadata__", None)
    return len(raw), header


def read_header(path: Path) -> dict[str, dict]:
    """Parse a safetensors header without touching tensor data. Raises ValueError or OSError."""
    return _header(path)[1]


def check_complete(path: Path, names: set[str]) -> None:
    """A file this run wrote holds exactly the tensors planned for it."""
    if set(read_header(path)) != names:
        raise CheckpointError(f"{path.name} was written incompletely", hint="re-run the merge")


def header_spec(path: Path, name: str, info: object) -> TensorSpec:
    """One header entry as a TensorSpec, refusing what safetensors itself would choke on later."""
    try:
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        dtype = code_dtype(info["dtype"])  # type: ignore[index]
        if any(d < 0 for d in shape):
            raise ValueError("negative dimension")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has a malformed header entry for {name!r} ({e})",
                              hint="the file is corrupt; re-copy it") from None
    return TensorSpec(name, shape, dtype)


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes lie in its file."""

    spec: TensorSpec
    offset: int


def read_layout(path: Path) -> dict[str, Stored]:
    """Every tensor of one file and the file offset of its bytes, from the header alone; an entry whose byte range
    does not match its dtype and shape, or runs past the end of the file, is refused as safetensors itself would."""
    try:
        start, header = _header(path)
        size = path.stat().st_size
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}", hint="re-copy it") from None
    out: dict[str, Stored] = {}
    for name, info in header.items():
        spec = header_spec(path, name, info)
        try:
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            begin, end = -1, -1
        if begin < 0 or end - begin != spec.nbytes:
            raise CheckpointError(f"{path} has a malformed header entry for {name!r} (data_offsets do not fit "
                                  f"{spec.dtype} {list(spec.shape)})", hint="the file is corrupt; re-copy it")
        if start + end > size:
            raise CheckpointError(f"{path} is truncated: {name} ends at byte {start + end}, the file has {size}",
                                  hint="re-copy it")
        out[name] = Stored(spec, start + begin)
    return out


def read_specs(path: Path) -> dict[str, TensorSpec]:
    """Every tensor of one file, from its header alone."""
    return {name: stored.spec for name, stored in read_layout(path).items()}


def index_json(weight_map: dict[str, str], total_size: int) -> str:
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)


def read_index(index: Path) -> dict[str, str]:
    """The index's weight_map, refusing anything but plain shard names next to it (no `../`, no absolute paths)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (ValueError, AttributeError, OSError) as e:
        raise CheckpointError(f"{index} is not a valid index: {e}", hint="re-copy it or remove it") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no weight_map object", hint="re-copy it or remove it")
    for f in weight_map.values():
        if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
            raise CheckpointError(f"{index} points at {f!r}, outside the folder",
                                  hint="an index may only name shard files next to it; fix or remove the index")
    return weight_map
