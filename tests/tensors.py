"""Test-side reading of what a folder holds, independent of hubexport's own readers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
