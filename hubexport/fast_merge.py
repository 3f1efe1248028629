"""The merge without torch or transformers: when a verl FSDP checkpoint's tensors are runs of rank-file bytes
(`sources/fsdp_files`) and an earlier merge of the same tensors, config and options left its recipe
(`merge_recipe`), every output file is its recorded header plus those runs, copied kernel-side. The output is the
full path's, byte for byte (`tests/test_fast_merge_path.py`); start-up drops from ~6 s of imports to ~0.3 s.

Anything else returns None and the full path (`to_hf`) runs, with its checks and its errors: the fast path never
refuses a checkpoint itself. `HUBEXPORT_NO_FAST_PATH=1` always takes the full path."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from hubexport import merge_recipe
from hubexport.core import FileSlices
from hubexport.detect import Layout, detect
from hubexport.dist import Dist
from hubexport.hfdir import copy_support_files
from hubexport.merge_recipe import Recipe
from hubexport.merge_report import done_line, plan_line
from hubexport.options import MergeOptions
from hubexport.result import OnFile, Result, WrittenFile
from hubexport.safetensors_format import INDEX_NAME, check_complete, dtype_code
from hubexport.sources.fsdp_files import Located, Run, locate
from hubexport.writers.safetensors import CHUNK, write_parts


def job(local_dir: Path, options: MergeOptions) -> FastJob | None:
    """The fast job for this checkpoint, or None when the full path must run."""
    if os.environ.get("HUBEXPORT_NO_FAST_PATH") == "1":
        return None
    layout = detect(Path(local_dir), options.backend)
    if layout.format != "fsdp" or not layout.files:
        return None
    found = locate(layout.files)
    if found is None:
        return None
    shapes = merge_recipe.shapes_of((n, t.shape, t.dtype) for n, t in found.items())
    key = merge_recipe.key(layout.format, layout.version, layout.hf_dir, shapes, options)
    recipe = merge_recipe.load(key) if key else None
    files = _files(recipe, found) if recipe else None
    if files is None:
        return None
    fast = FastJob(Path(local_dir), layout, recipe, found, files)
    try:
        if fast.checks_hold():
            return fast
    except OSError:  # a rank file shorter than its index: the full path says which
        pass
    fast.close()  # the full path reads them again, and says which tensors differ
    return None


def _files(recipe: Recipe, found: dict[str, Located]) -> list[tuple[str, bytes, list[str]]] | None:
    """(name, header, tensor names in order) of each output file; None when the recipe does not fit the tensors."""
    out = []
    for name, text in recipe.files:
        if Path(name).name != name or not name.endswith(".safetensors"):
            return None  # a file name next to the others, never a path
        head = text.encode("latin-1")
        try:
            (n,) = struct.unpack("<Q", head[:8])
            entries = json.loads(head[8:8 + n])
        except (struct.error, ValueError):
            return None
        if not isinstance(entries, dict):
            return None
        entries.pop("__metadata__", None)
        try:
            order = sorted(entries, key=lambda t: entries[t]["data_offsets"][0])
            fits = len(head) == 8 + n and _fits(order, entries, found)
        except (KeyError, TypeError, IndexError):
            return None
        if not fits:
            return None
        out.append((name, head, order))
    return out


def _fits(order: list[str], entries: dict[str, dict], found: dict[str, Located]) -> bool:
    """Each header entry is a checkpoint tensor's dtype and shape, and the entries' bytes follow each other."""
    end = 0
    for t in order:
        e = entries[t]
        if t not in found or e["dtype"] != dtype_code(found[t].dtype) or e["shape"] != list(found[t].shape):
            return False
        if e["data_offsets"] != [end, end + found[t].nbytes]:
            return False
        end += found[t].nbytes
    return True


class FastJob:
    """The executor's job (see executor.Job) for a recorded FSDP merge, one process."""

    def __init__(self, source: Path, layout: Layout, recipe: Recipe, found: dict[str, Located],
                 files: list[tuple[str, bytes, list[str]]]) -> None:
        self.layout, self.recipe, self.found, self.files = layout, recipe, found, files
        self.inputs = tuple(p for p in (source, layout.root, layout.hf_dir, *layout.files) if p is not None)
        self._fds = [os.open(f, os.O_RDONLY) for f in layout.files]

    def _slices(self, runs: tuple[Run, ...]) -> FileSlices:
        return FileSlices(tuple((self._fds[rank], offset, n) for rank, offset, n in runs))

    def checks_hold(self) -> bool:
        """Tied aliases hold their weight's bytes and every rank's copy of a plain tensor is the same."""
        pairs = [(self.found[a].runs, self.found[c].runs) for a, c in self.recipe.checks]
        pairs += [(t.runs, (r,)) for t in self.found.values() for r in t.replicas]
        return all(self._same(a, b) for a, b in pairs)

    def _same(self, a: tuple[Run, ...], b: tuple[Run, ...]) -> bool:
        return sum(n for *_, n in a) == sum(n for *_, n in b) and all(
            x == y for x, y in zip(self._chunks(a), self._chunks(b), strict=False))

    def _chunks(self, runs: tuple[Run, ...]) -> Iterator[bytes]:
        """The bytes of `runs` in pieces of at most CHUNK, cut at the same places for any runs of equal length."""
        pending = b""
        for rank, offset, n in runs:
            end = offset + n
            while offset < end:
                data = os.pread(self._fds[rank], min(CHUNK - len(pending), end - offset), offset)
                if not data:
                    raise OSError(f"{self.layout.files[rank]} is shorter than its index says")
                offset += len(data)
                pending += data
                if len(pending) == CHUNK:
                    yield pending
                    pending = b""
        yield pending

    def result(self, command: str, target: Path) -> Result:
        r, layout = self.recipe, self.layout
        return Result(command=command, target_dir=target, source_format=layout.format, source_version=layout.version,
                      parallel=dict(layout.parallel), architecture=r.architecture, dtype=r.dtype,
                      num_parameters=r.num_parameters, tied_embeddings=r.tied, value_model=r.value_model,
                      global_step=layout.global_step, peak_tensor_bytes=r.peak_tensor_bytes,
                      notes=[*layout.notes, *r.notes])

    def _tensor_bytes(self, names: list[str]) -> int:
        return sum(self.found[t].nbytes for t in names)

    def describe(self, result: Result) -> list[str]:
        return [*result.notes, plan_line(result, len(self.files), sum(self._tensor_bytes(t) for _, _, t in self.files))]

    def planned_files(self) -> list[WrittenFile]:
        return [WrittenFile(name, self._tensor_bytes(names), None) for name, _, names in self.files]

    def precheck(self) -> None:
        """Checked when the job was made (checks_hold)."""

    def write(self, tmp: Path, dist: Dist, on_file: OnFile | None = None) -> list[WrittenFile]:
        written = []
        for name, head, names in self.files:
            sha = write_parts(tmp / name, head, (self._slices(self.found[t].runs) for t in names))
            written.append(WrittenFile(name, (tmp / name).stat().st_size, sha))
            if on_file is not None:
                on_file(written[-1], tmp / name)
        return written

    def finish(self, tmp: Path, files: list[WrittenFile]) -> None:
        for name, _, names in self.files:
            check_complete(tmp / name, set(names))
        if self.recipe.index is not None:
            (tmp / INDEX_NAME).write_bytes(self.recipe.index.encode())
        (tmp / "config.json").write_bytes(self.recipe.config.encode())
        if self.layout.hf_dir is not None:
            copy_support_files(self.layout.hf_dir, tmp)

    def check(self, tmp: Path, dist: Dist) -> None:
        """Every header was checked in finish(); nothing more to read back."""

    def done(self, result: Result) -> str:
        return done_line(result, len(self.files))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
