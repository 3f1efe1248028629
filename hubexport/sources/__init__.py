"""Lazy checkpoint readers. Each source exposes `metas()` (names, global shapes, dtypes; no tensor bytes read) and
`read(name)` (one whole logical tensor, assembled from its shards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class Source(Protocol):
    def metas(self) -> dict[str, TensorSpec]: ...

    def read(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...
