"""A Hugging Face safetensors folder (single file or sharded with an index), read lazily: headers for metas(), one
tensor per read(). Used for `--base-model` (the base weights a LoRA-only checkpoint lacks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from hubexport.errors import CheckpointError
from hubexport.sources import TensorSpec
from hubexport.writers.safetensors import DTYPE_CODES, read_header

CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def weight_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a directory", hint="pass the Hugging Face model folder")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})", hint="re-download the model") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors weights",
                              hint="pass a folder written by save_pretrained with safetensors (the default)")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]} is listed in the index but missing", hint="re-download the model")
    return files


class HfSource:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file: dict[str, Path] = {}
        self._specs: dict[str, TensorSpec] = {}
        self._handles: dict[Path, Any] = {}
        for path in weight_files(folder):
            try:
                header = read_header(path)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path} is not a safetensors file ({e})", hint="re-download the model") from None
            for name, entry in header.items():
                if entry["dtype"] not in CODE_DTYPES:
                    raise CheckpointError(f"{name} in {path} has unsupported dtype {entry['dtype']}",
                                          hint="convert the model to bf16/fp16/fp32 first")
                self._specs[name] = TensorSpec(name, tuple(entry["shape"]), CODE_DTYPES[entry["dtype"]])
                self._file[name] = path

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        path = self._file[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
