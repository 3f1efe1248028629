"""Lazy checkpoint readers. Each source exposes `metas()` (names, global shapes, dtypes; no tensor bytes read) and
`read(name)` (one whole logical tensor, assembled from its shards)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from hubexport.core import TensorSpec

if TYPE_CHECKING:
    import torch


class Source(Protocol):
    def metas(self) -> dict[str, TensorSpec]: ...

    def read(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


class CombinedSource:
    """Several sources as one (e.g. a base model folder plus a LoRA-only checkpoint); names must not collide."""

    def __init__(self, *sources: Source) -> None:
        self.sources = sources
        self._owner: dict[str, Source] = {}
        for src in sources:
            for name in src.metas():
                if name in self._owner:
                    raise ValueError(f"{name} is in two sources")
                self._owner[name] = src

    def metas(self) -> dict[str, TensorSpec]:
        return {k: v for src in self.sources for k, v in src.metas().items()}

    def read(self, name: str) -> torch.Tensor:
        return self._owner[name].read(name)

    def close(self) -> None:
        for src in self.sources:
            src.close()
