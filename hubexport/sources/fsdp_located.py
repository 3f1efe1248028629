"""verl FSDP rank files whose every tensor `fsdp_files.locate` placed as runs of file bytes: read with pread, copied
file to file by the writer, and never unpickled by torch (no `torch.distributed.tensor` import, no memory map).
Anything else is read by `sources/fsdp.FsdpSource`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hubexport.core import FileSlices, TensorSpec
from hubexport.mapping.ops import same_bytes
from hubexport.sources.fsdp import replica_mismatch
from hubexport.sources.fsdp_files import Located, Run
from hubexport.sources.pread import read_into


class LocatedFsdpSource:
    def __init__(self, files: list[Path], located: dict[str, Located]) -> None:
        self.files, self._located = files, located
        self._fds = [os.open(f, os.O_RDONLY) for f in files]
        self._specs = {n: TensorSpec(n, t.shape, getattr(torch, t.dtype)) for n, t in located.items()}

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        t, spec = self._located[name], self._specs[name]
        out = self._read_runs(t.runs, spec)
        for replica in t.replicas:  # a plain tensor every rank holds: all copies must agree
            if not same_bytes(self._read_runs((replica,), spec), out):
                raise replica_mismatch(name, self.files[t.runs[0][0]], self.files[replica[0]])
        return out

    def _read_runs(self, runs: tuple[Run, ...], spec: TensorSpec) -> torch.Tensor:
        flat = torch.empty(spec.nbytes, dtype=torch.uint8)
        at = 0
        for rank, offset, n in runs:
            read_into(self._fds[rank], offset, flat[at:at + n])
            at += n
        return flat.view(spec.dtype).reshape(spec.shape)

    def slices(self, name: str) -> FileSlices:
        return FileSlices(tuple((self._fds[rank], offset, n) for rank, offset, n in self._located[name].runs))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
