"""The core types every layer shares: a tensor's metadata, a group of tensors that convert together, and the
name order transformers saves in. Sources, mappings, the plan and writers import this module; it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the types only: the fast merge path runs without torch
    import torch

Tensors = dict[str, "torch.Tensor"]


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


@dataclass(frozen=True)
class Group:
    """Source tensors that convert together into output tensors (a fused expert block, a qkv split...).

    `convert` is pure: it maps the source tensors (by name) to the output tensors (by name). A group with no outputs
    is a check (e.g. a tied alias must equal its canonical weight)."""

    inputs: tuple[str, ...]
    outputs: tuple[TensorSpec, ...]
    convert: Callable[[Tensors], Tensors]
    passthrough: bool = False  # outputs are the inputs unchanged, so their bytes may be copied without being read
    # A group whose every output is rows of its inputs (a row gather: q/k/v split or joined, gate/up, a vocabulary
    # trimmed or padded): per output, its (start, stop) ranges of the inputs' rows back to back (rows past them are
    # zeros), so their bytes may be copied without being read.
    rows: tuple[tuple[tuple[int, int], ...], ...] | None = None


ZEROS = -1  # a FileSlices part from this "file descriptor" is that many zero bytes


@dataclass(frozen=True)
class FileSlices:
    """A tensor's bytes as they already lie in checkpoint files: (fd, offset, length) parts, back to back, so a
    writer can copy them file to file (kernel-side) instead of through memory. A part of fd ZEROS is zeros."""

    parts: tuple[tuple[int, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.parts)

    def take(self, ranges: tuple[tuple[int, int], ...]) -> FileSlices:
        """The bytes [start, stop) of each range, in order, of what the parts hold back to back."""
        out = []
        for start, stop in ranges:
            at = 0
            for fd, offset, n in self.parts:
                lo, hi = max(start, at), min(stop, at + n)
                if lo < hi:
                    out.append((fd, offset + lo - at, hi - lo))
                at += n
        return FileSlices(tuple(out))


def natural_key(name: str) -> tuple:
    """`layers.2` sorts before `layers.10`, as transformers orders the tensors it saves."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
