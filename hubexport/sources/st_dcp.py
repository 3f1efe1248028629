"""Safetensors-serialised DCP (torch's `HuggingFaceStorageWriter(save_distributed=True)`, NeMo Automodel's `model/`):
every rank writes `shard-0000R-model-0000X-of-0000Y.safetensors` holding its local pieces under the full names, and
records each piece's global offsets in the file's metadata (`DCP_SHARDING_INFO`). There is no `.metadata`: the global
shapes come from the pieces, and a tensor is whole only if its pieces cover it exactly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError
from hubexport.safetensors_format import CODE_NAMES, code_dtype
from hubexport.sources.dcp import DcpTensor, StoredChunk, read_region

SHARD_RE = re.compile(r"^shard-(\d+)-model-(\d+)-of-(\d+)\.safetensors$")
SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
RECOPY = "re-copy the whole folder of shard-*.safetensors files"


def shard_files(folder: Path) -> list[Path]:
    """The shard files, refusing a set that lacks a writer's file: every FSDP rank holds a piece of every sharded
    tensor, so each writer writes each model file (without `.metadata` a lost last piece would otherwise only show
    as a smaller tensor)."""
    found = {(int(m.group(1)), int(m.group(2)), int(m.group(3))): p for p in folder.iterdir()
             if (m := SHARD_RE.match(p.name))}
    counts = {y for _, _, y in found}
    if len(counts) > 1:
        raise CheckpointError(f"{folder} mixes shard files of {sorted(counts)} model files",
                              hint="two saves were copied into one folder; keep one")
    writers = sorted({r for r, _, _ in found})
    models = sorted({x for _, x, _ in found})
    for r in range(1, writers[-1] + 1 if writers else 1):
        for x in models:
            if (r, x, max(counts)) not in found:
                name = f"shard-{r:05d}-model-{x:05d}-of-{max(counts):05d}.safetensors"
                raise CheckpointError(f"{folder / name} is missing (writers {writers} wrote model files {models})",
                                      hint=f"a rank's file is missing; {RECOPY}")
    return [found[k] for k in sorted(found)]


def _pieces(path: Path) -> list[tuple[str, tuple[int, ...], tuple[int, ...], torch.dtype]]:
    """(name, global offsets, local shape, dtype) of each piece in one shard file, from its header alone."""
    try:
        with safe_open(str(path), "pt") as f:  # checks the header against the file size: a cut-short file fails
            info = json.loads((f.metadata() or {}).get(SHARDING_KEY, "null"))
            pieces = [(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()]
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({str(e)[:120]})",
                              hint=f"the copy is incomplete; {RECOPY}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} has no {SHARDING_KEY} metadata",
                              hint="only files written by torch's HuggingFaceStorageWriter are DCP shards")
    out = []
    for name, shape, code in pieces:
        offsets = (info.get(name) or {}).get("saved_offsets")
        if not isinstance(offsets, list) or len(offsets) != len(shape) or code not in CODE_NAMES:
            raise CheckpointError(f"{path} has no valid offsets or dtype for {name}", hint=f"the file is corrupt; {RECOPY}")
        out.append((name, tuple(int(o) for o in offsets), tuple(shape), code_dtype(code)))
    return out


def _assemble(pieces: dict[str, list[tuple[StoredChunk, torch.dtype]]]) -> dict[str, DcpTensor]:
    out = {}
    for name, chunks in pieces.items():
        dtypes = {d for _, d in chunks}
        if len(dtypes) != 1:
            raise CheckpointError(f"the pieces of {name} have dtypes {sorted(map(str, dtypes))}",
                                  hint=f"the shards come from different saves; {RECOPY}")
        ndims = {len(c.sizes) for c, _ in chunks}
        if len(ndims) != 1:
            raise CheckpointError(f"the pieces of {name} have different ranks", hint=f"the file is corrupt; {RECOPY}")
        shape = tuple(max(c.offsets[i] + c.sizes[i] for c, _ in chunks) for i in range(ndims.pop()))
        covered = sum(math.prod(c.sizes) for c, _ in chunks)
        if covered != math.prod(shape):
            raise CheckpointError(f"the pieces of {name} cover {covered} of {math.prod(shape)} elements",
                                  hint=f"a shard file is missing or from another save; {RECOPY}")
        out[name] = DcpTensor(name, shape, dtypes.pop(), tuple(c for c, _ in chunks))
    return out


def _load_piece(folder: Path, c: StoredChunk, name: str) -> torch.Tensor:
    try:
        with safe_open(str(folder / c.file), "pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / c.file} cannot be read ({e})", hint=RECOPY) from None


class SafetensorsDcpSource:
    def __init__(self, folder: Path) -> None:
        from hubexport.sources.torch_dcp import refuse_torchtitan_names

        self.dir = Path(folder)
        files = shard_files(self.dir)
        if not files:
            raise CheckpointError(f"{self.dir} has no shard-*-model-*.safetensors files", hint=RECOPY)
        pieces: dict[str, list[tuple[StoredChunk, torch.dtype]]] = {}
        for path in files:
            for name, offsets, shape, dtype in _pieces(path):
                pieces.setdefault(name, []).append((StoredChunk(offsets, shape, path.name, 0, 0), dtype))
        refuse_torchtitan_names(self.dir, pieces)
        self._tensors = _assemble(pieces)

    def metas(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(n, t.shape, t.dtype) for n, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return read_region(self.dir, self._tensors[name], load=_load_piece)

    def close(self) -> None:
        pass
