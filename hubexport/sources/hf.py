"""A folder of HF safetensors (one file or sharded with an index) as a Source; used for mbridge checkpoints, whose
model weights verl already wrote in HF layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from hubexport.core import TensorSpec
from hubexport.errors import CheckpointError
from hubexport.sources import Source
from hubexport.writers.safetensors import DTYPE_CODES, read_header

CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def _weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map, refusing anything but plain shard names next to it (no `../`, no absolute paths)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid index: {e}", hint="re-copy it or remove it") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no weight_map object", hint="re-copy it or remove it")
    for f in weight_map.values():
        if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
            raise CheckpointError(f"{index} points at {f!r}, outside the folder",
                                  hint="an index may only name shard files next to it; fix or remove the index")
    return weight_map


def _spec(path: Path, name: str, info: object) -> TensorSpec:
    try:
        shape = tuple(int(d) for d in info["shape"])  # type: ignore[index]
        dtype = CODE_DTYPES[info["dtype"]]  # type: ignore[index]
        if any(d < 0 for d in shape):
            raise ValueError("negative dimension")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has a malformed header entry for {name!r} ({e})",
                              hint="the file is corrupt; re-copy it") from None
    return TensorSpec(name, shape, dtype)


class SafetensorsSource(Source):
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _weight_map(index)
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise CheckpointError(f"{self.folder / missing[0]} is listed in {index.name} but missing",
                                      hint="the HF weights are incomplete; re-copy the huggingface/ folder")
        if not files:
            raise CheckpointError(f"{self.folder} has no .safetensors files", hint="point at the folder with weights")
        self._where: dict[str, Path] = {}
        self._specs: dict[str, TensorSpec] = {}
        for f in files:
            try:
                header = read_header(f)
            except (ValueError, OSError) as e:
                raise CheckpointError(f"{f} is not a readable safetensors file: {e}", hint="re-copy it") from e
            for name, info in header.items():
                spec = _spec(f, name, info)
                if name in self._where:
                    raise CheckpointError(f"{name} is in both {self._where[name].name} and {f.name}",
                                          hint="remove the stale shard")
                self._where[name] = f
                self._specs[name] = spec

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        try:
            with safe_open(str(self._where[name]), "pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self._where[name]} cannot be read ({e})", hint="the file is corrupt or truncated; "
                                  "re-copy it") from None

    def close(self) -> None:
        pass
