"""A folder of HF safetensors (one file or sharded with an index) as a Source; used for mbridge checkpoints, whose
model weights verl already wrote in HF layout, for --base-model and for HF → Megatron.

With an index, its weight_map decides which files are read, as transformers does: a stray file beside the shards
(Mistral repos ship `consolidated.safetensors`, a second copy of every tensor) is ignored with a note."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from hubexport.core import TensorSpec, natural_key
from hubexport.errors import CheckpointError
from hubexport.safetensors_format import INDEX_NAME, Stored, read_index, read_layout
from hubexport.sources import Source

if TYPE_CHECKING:  # the recorded to-megatron (fast_to_mcore) lists the files without torch
    import torch


def weight_files(folder: Path, notes: list[str]) -> tuple[list[Path], dict[str, str] | None]:
    """The files to read and the index's weight_map (None without an index)."""
    present = sorted(folder.glob("*.safetensors"))
    index = folder / INDEX_NAME
    if not index.is_file():
        return present, None
    weight_map = read_index(index)
    if not weight_map:
        raise CheckpointError(f"{index} lists no tensors", hint="re-copy it, or remove it to read every shard")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]} is listed in {index.name} but missing",
                              hint="the HF weights are incomplete; re-copy the folder")
    stray = [p.name for p in present if p not in files]
    if stray:
        notes.append(f"ignored {', '.join(stray)}: not in {index.name} (e.g. a consolidated copy of the shards)")
    return files, weight_map


class SafetensorsSource(Source):
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.notes: list[str] = []
        self.files, weight_map = weight_files(self.folder, self.notes)
        if not self.files:
            raise CheckpointError(f"{self.folder} has no .safetensors files", hint="point at the folder with weights")
        self._where: dict[str, Path] = {}
        self._stored: dict[str, Stored] = {}
        for f in self.files:
            for name, stored in read_layout(f).items():
                if name in self._where:
                    raise CheckpointError(f"{name} is in both {self._where[name].name} and {f.name}",
                                          hint="remove the stale shard")
                if weight_map is not None and weight_map.get(name) != f.name:
                    raise CheckpointError(
                        f"{f} holds {name}, which {INDEX_NAME} puts in {weight_map.get(name) or 'no file'}",
                        hint="the index does not belong to these shards; re-copy the folder")
                self._where[name] = f
                self._stored[name] = stored
        if weight_map is not None:
            self._check_listed(weight_map)
        self._fds: dict[Path, int] = {}  # one descriptor per file, kept until close()
        self._lock = threading.Lock()  # the writer reads one tensor ahead on another thread

    def _check_listed(self, weight_map: dict[str, str]) -> None:
        absent = sorted(set(weight_map) - set(self._stored), key=natural_key)
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise CheckpointError(
                f"{self.folder / weight_map[absent[0]]} does not hold {absent[0]}{more}, which {INDEX_NAME} lists "
                "in it", hint="the index does not belong to these shards; re-copy the folder")

    def metas(self) -> dict[str, TensorSpec]:
        return {name: stored.spec for name, stored in self._stored.items()}

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read(self, name: str) -> torch.Tensor:
        """The tensor's bytes read into fresh memory (pread, not a memory map: mapped pages would stay resident and
        count towards this process's memory for every byte of the folder ever read)."""
        from hubexport.sources.pread import read_tensor

        path, stored = self._where[name], self._stored[name]
        try:
            return read_tensor(self._fd(path), stored.offset, stored.spec.dtype, stored.spec.shape)
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read for {name} ({e})", hint="the file is corrupt or truncated; "
                                  "re-copy it") from None

    def location(self, name: str) -> tuple[int, int, int]:
        """(index in `files`, offset, length) of the tensor's bytes."""
        stored = self._stored[name]
        return self.files.index(self._where[name]), stored.offset, stored.spec.nbytes

    def fd(self, index: int) -> int:
        """An open descriptor of `files[index]` (closed by close())."""
        return self._fd(self.files[index])

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)
