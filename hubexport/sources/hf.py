"""A folder of HF safetensors (one file or sharded with an index) as a Source; used for mbridge checkpoints, whose
model weights verl already wrote in HF layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hubexport.errors import CheckpointError
from hubexport.sources import Source, TensorSpec
from hubexport.writers.safetensors import DTYPE_CODES, read_header

CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class SafetensorsSource(Source):
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
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
                if name in self._where:
                    raise CheckpointError(f"{name} is in both {self._where[name].name} and {f.name}",
                                          hint="remove the stale shard")
                self._where[name] = f
                self._specs[name] = TensorSpec(name, tuple(info["shape"]), CODE_DTYPES[info["dtype"]])

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), "pt") as f:
            return f.get_tensor(name)

    def close(self) -> None:
        pass
