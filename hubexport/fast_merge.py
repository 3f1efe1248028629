"""The merge without torch or transformers: when a checkpoint's tensors are runs of file bytes (verl FSDP rank
files, `sources/fsdp_files`; a megatron-core torch_dist checkpoint's .distcp chunks, `sources/mcore` reading
dtypes by name) and an earlier merge of the same tensors, config and options left its recipe (`merge_recipe`), every
output file is its recorded header plus those runs (or the recorded byte ranges of them: a q/k/v split, a trimmed
vocabulary), copied kernel-side; a weight TP split along its columns is pasted in memory from its chunks' rows. The
output is the full path's, byte for byte (`tests/test_fast_merge_path.py`, `tests/test_fast_mcore_merge.py`);
start-up drops from ~6 s of imports to ~0.3 s.

With no recipe yet, an FSDP merge may write a guessed one while the full path's planning runs beside it
(`first_merge`): the job confirms it before any file leaves it.

Anything else returns None and the full path (`to_hf`) runs, with its checks and its errors: the fast path never
refuses a checkpoint itself. `HUBEXPORT_NO_FAST_PATH=1` always takes the full path."""

from __future__ import annotations

import itertools
import json
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hubexport import first_merge, merge_recipe
from hubexport.core import ZEROS, FileSlices
from hubexport.detect import Layout, detect
from hubexport.dist import Dist
from hubexport.errors import CheckpointError
from hubexport.hfdir import copy_support_files
from hubexport.merge_recipe import Copy, Recipe
from hubexport.merge_report import done_line, plan_line
from hubexport.options import MergeOptions
from hubexport.result import OnFile, Result, WrittenFile
from hubexport.safetensors_format import INDEX_NAME, check_complete
from hubexport.sources.dcp import Region
from hubexport.sources.fsdp_files import Located, Run, locate
from hubexport.sources.mcore import TorchDistSource
from hubexport.writers.safetensors import CHUNK, Fsyncs, write_parts

# Output files written at a time, each with its own sha256 thread: the hash, not the kernel copy, bounds one file's
# pace. 8 GB here (2 cores): 9.5 s one at a time, 7.7 s two, 7.6 s four (benchmarks/README.md).
WRITERS = min(os.cpu_count() or 1, 4)


def job(local_dir: Path, options: MergeOptions, *, plan_beside: bool = False, writers: int = WRITERS) -> FastJob | None:
    """The fast job for this checkpoint, or None when the full path must run. `plan_beside`: a first FSDP merge may
    write a guessed recipe while it is planned (`first_merge`; not for a dry run, which writes nothing). `writers`:
    how many output files are written at a time (torchrun's N processes as one: `launch.alone_if`)."""
    if os.environ.get("HUBEXPORT_NO_FAST_PATH") == "1":
        return None
    layout = detect(Path(local_dir), options.backend)
    tensors = _tensors(layout)
    if tensors is None:
        return None
    shapes = tensors.shapes()
    key = merge_recipe.key(layout.format, layout.version, layout.hf_dir, shapes, options)
    recipe = merge_recipe.load(key) if key else None
    planning = None
    if recipe is None and key and plan_beside and layout.format == "fsdp" and first_merge.worth_guessing():
        recipe = first_merge.guess(layout.hf_dir, shapes, options)
        planning = first_merge.Planning.start(Path(local_dir), key, options) if recipe else None
        recipe = recipe if planning else None
    files = _files(recipe, tensors) if recipe else None
    if files is None:
        tensors.close()
        if planning is not None:
            planning.close()
        return None
    fast = FastJob(Path(local_dir), layout, recipe, tensors, files, planning, writers)
    try:
        if fast.checks_hold():
            return fast
    except OSError:  # a rank file shorter than its index: the full path says which
        pass
    fast.close()  # the full path reads them again, and says which tensors differ
    return None


class Tensors(Protocol):
    """The checkpoint's tensors as byte runs of its files; `slices` and `region` are called from every writer thread."""

    def shapes(self) -> merge_recipe.Shapes: ...
    def slices(self, name: str) -> FileSlices | None: ...  # None: not runs of file bytes
    def region(self, name: str) -> Region | None: ...  # else bytes pasted in memory (None: neither)
    def replicas(self) -> Iterator[tuple[FileSlices, FileSlices]]: ...  # copies that must hold the same bytes
    def close(self) -> None: ...


class _RankFiles:
    """verl FSDP rank files (`sources/fsdp_files`)."""

    def __init__(self, files: list[Path], found: dict[str, Located]) -> None:
        self.found = found
        self._fds = [os.open(f, os.O_RDONLY) for f in files]

    def _runs(self, runs: tuple[Run, ...]) -> FileSlices:
        return FileSlices(tuple((self._fds[rank], offset, n) for rank, offset, n in runs))

    def shapes(self) -> merge_recipe.Shapes:
        return merge_recipe.shapes_of((n, t.shape, t.dtype) for n, t in self.found.items())

    def slices(self, name: str) -> FileSlices | None:
        return self._runs(self.found[name].runs) if name in self.found else None

    def replicas(self) -> Iterator[tuple[FileSlices, FileSlices]]:
        return ((self._runs(t.runs), self._runs((r,))) for t in self.found.values() for r in t.replicas)

    def region(self, name: str) -> None:
        """Every located tensor is runs (`slices`)."""

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class _TorchDist(TorchDistSource):
    """A torch_dist checkpoint's tensors (megatron's names, one layer each), read without torch."""

    def shapes(self) -> merge_recipe.Shapes:
        return merge_recipe.shapes_of((n, s.shape, s.dtype) for n, s in self.metas().items())

    def replicas(self) -> Iterator[tuple[FileSlices, FileSlices]]:
        return iter(())


def _tensors(layout: Layout) -> Tensors | None:
    """The checkpoint's tensors for the fast path, or None for a checkpoint it does not read."""
    if layout.format == "fsdp" and layout.files:
        found = locate(layout.files)
        return None if found is None else _RankFiles(layout.files, found)
    if layout.format == "megatron" and layout.version in ("v1", "v2") and layout.adapter is None:
        try:
            return _TorchDist(layout.files[0], dtype_names=True)
        except CheckpointError:  # the full path says what is wrong
            return None
    return None


@dataclass(frozen=True)
class Assembled:
    """An output pasted in memory from stored pieces when the writer reaches it (a weight TP split along its columns):
    one output's bytes in memory at a time."""

    region: Region
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def parts(self) -> Iterator[memoryview]:
        view = memoryview(self.region.paste())
        for start, stop in self.ranges:
            yield view[start:stop]


Output = tuple[str, FileSlices | Assembled]  # an output tensor's name and its bytes


@dataclass(frozen=True)
class _File:
    """An output file of the recipe. Its outputs are resolved again when it is written, so memory holds one file's
    (~250 bytes a tensor), not the whole model's."""

    name: str
    header: str  # as recorded: 8-byte length + JSON, latin-1
    nbytes: int


def _files(recipe: Recipe, tensors: Tensors) -> list[_File] | None:
    """Each output file; None when the recipe does not fit the tensors."""
    copies, out = recipe.copy_map(), []
    for name, text in recipe.files:
        if Path(name).name != name or not name.endswith(".safetensors"):
            return None  # a file name next to the others, never a path
        outputs = _outputs(text, copies, tensors)
        if outputs is None:
            return None
        out.append(_File(name, text, _nbytes(outputs)))
    return out


def _outputs(header: str, copies: dict[str, Copy], tensors: Tensors) -> list[Output] | None:
    """A recorded header's outputs in file order, each with its bytes; None when they do not fit the header."""
    entries = _entries(header)
    if entries is None:
        return None
    try:
        order = sorted(entries, key=lambda t: entries[t]["data_offsets"][0])
        outputs = [(t, _bytes_of(copies.get(t) or Copy(t), tensors)) for t in order]
        return outputs if _fits(outputs, entries) else None
    except (KeyError, TypeError, IndexError):
        return None


def _entries(header: str) -> dict[str, dict] | None:
    """A recorded header's tensor entries; None when it is not one JSON object exactly as long as it says."""
    head = header.encode("latin-1")
    try:
        (n,) = struct.unpack("<Q", head[:8])
        entries = json.loads(head[8:8 + n])
    except (struct.error, ValueError):
        return None
    if not isinstance(entries, dict) or len(head) != 8 + n:
        return None
    entries.pop("__metadata__", None)
    return entries


def _bytes_of(copy: Copy, tensors: Tensors) -> FileSlices | Assembled | None:
    if copy.source is None:
        return FileSlices(tuple((ZEROS, 0, stop - start) for start, stop in copy.ranges or ()))
    whole = tensors.slices(copy.source)
    if whole is not None:
        return whole if copy.ranges is None else whole.take(copy.ranges)
    region = tensors.region(copy.source)
    if region is None:
        return None
    ranges = copy.ranges or ((0, region.nbytes),)
    if any(not 0 <= a <= b <= region.nbytes for a, b in ranges):
        return None
    return Assembled(region, ranges)


def _fits(outputs: list[tuple[str, FileSlices | Assembled | None]], entries: dict[str, dict]) -> bool:
    """Each output is runs of file bytes as long as its header entry, and the entries' bytes follow each other."""
    end = 0
    for t, found in outputs:
        if found is None or entries[t]["data_offsets"] != [end, end + found.nbytes]:
            return False
        end += found.nbytes
    return True


class FastJob:
    """The executor's job (see executor.Job) for a recorded merge, one process."""

    def __init__(self, source: Path, layout: Layout, recipe: Recipe, tensors: Tensors, files: list[_File],
                 planning: first_merge.Planning | None, writers: int) -> None:
        self.layout, self.recipe, self.tensors, self.files = layout, recipe, tensors, files
        self._copies = recipe.copy_map()
        self.planning = planning  # a guessed recipe's planning, until it confirms the guess
        self.writers = max(1, min(writers, len(files)))
        self.inputs = tuple(p for p in (source, layout.root, layout.hf_dir, *layout.files) if p is not None)
        self._confirming = threading.Lock()  # the writers and the caller's on_file may each confirm
        self._stop = threading.Event()  # a file failed: the other writers stop too
        self._pasting = threading.Lock()

    def _confirm(self) -> None:
        """A guessed recipe becomes the planned one, or Unconfirmed is raised: before any file leaves the job."""
        with self._confirming:
            if self.planning is not None:
                try:
                    self.recipe = self.planning.confirm(self.recipe)
                finally:
                    self.planning.close()
                    self.planning = None

    def checks_hold(self) -> bool:
        """Tied aliases hold their weight's bytes and every rank's copy of a plain tensor is the same."""
        pairs = [(self.tensors.slices(a), self.tensors.slices(c)) for a, c in self.recipe.checks]
        return all(a is not None and b is not None and _same(a, b)
                   for a, b in itertools.chain(pairs, self.tensors.replicas()))

    def result(self, command: str, target: Path) -> Result:
        r, layout = self.recipe, self.layout
        return Result(command=command, target_dir=target, source_format=layout.format, source_version=layout.version,
                      parallel=dict(layout.parallel), architecture=r.architecture, dtype=r.dtype,
                      num_parameters=r.num_parameters, tied_embeddings=r.tied, value_model=r.value_model,
                      global_step=layout.global_step, peak_tensor_bytes=r.peak_tensor_bytes,
                      notes=[*layout.notes, *r.notes])

    def describe(self, result: Result) -> list[str]:
        total = sum(f.nbytes for f in self.files)
        return [*result.notes, plan_line(result, len(self.files), total)]

    def planned_files(self) -> list[WrittenFile]:
        return [WrittenFile(f.name, f.nbytes, None) for f in self.files]

    def precheck(self) -> None:
        """Checked when the job was made (checks_hold)."""

    def write(self, tmp: Path, dist: Dist, on_file: OnFile | None = None) -> list[WrittenFile]:
        """`writers` files at a time, each handed to `on_file` in order once it is written."""
        written = []
        with Fsyncs() as fsyncs, ThreadPoolExecutor(self.writers, thread_name_prefix="hubexport-writer") as pool:
            try:
                pending = [pool.submit(self._write_file, tmp, f, fsyncs) for f in self.files]
                for future in pending:
                    written.append(future.result())
                    if on_file is not None:
                        self._confirm()
                        on_file(written[-1], tmp / written[-1].name)
            except BaseException:
                self._stop.set()  # nothing more is written for nothing
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return written

    def outputs(self, f: _File) -> list[Output]:
        """The file's outputs, each with its bytes: as when the job was made, which they fitted."""
        outputs = _outputs(f.header, self._copies, self.tensors)
        assert outputs is not None
        return outputs

    def _write_file(self, tmp: Path, f: _File, fsyncs: Fsyncs) -> WrittenFile:
        parts = self._parts(self.outputs(f))
        try:
            sha = write_parts(tmp / f.name, f.header.encode("latin-1"), parts, fsync=False)
        finally:
            parts.close()  # a failed file lets go of the paste lock now, not when its traceback goes
        fsyncs.add(tmp / f.name)
        return WrittenFile(f.name, (tmp / f.name).stat().st_size, sha)

    def _parts(self, outputs: list[Output]) -> Iterator[FileSlices | memoryview]:
        """The outputs' bytes; a pasted output holds the paste lock until it is written, so memory holds one
        (the planned peak) however many files are written at a time."""
        for _, found in outputs:
            if isinstance(found, Assembled):
                with self._pasting:
                    yield from self._going(found.parts())
            else:
                yield from self._going((found,))

    def _going(self, parts: Iterable[FileSlices | memoryview]) -> Iterator[FileSlices | memoryview]:
        """Each part, unless another file failed meanwhile; a guess stops as soon as its planning has ended and not
        confirmed it (a model that converts its weights on saving is not copied whole for nothing)."""
        for part in parts:
            planning = self.planning  # another writer may confirm it meanwhile
            if planning is not None and planning.done():
                self._confirm()
            if self._stop.is_set():
                raise Stopped
            yield part

    def finish(self, tmp: Path, files: list[WrittenFile]) -> None:
        self._confirm()
        for f in self.files:
            check_complete(tmp / f.name, set(_entries(f.header)))
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
        self.tensors.close()
        if self.planning is not None:
            self.planning.close()


class Stopped(Exception):
    """Another file of the job failed: this one is left unfinished (its error is the one reported)."""


def _nbytes(outputs: list[Output]) -> int:
    return sum(found.nbytes for _, found in outputs)


def _same(a: FileSlices, b: FileSlices) -> bool:
    return a.nbytes == b.nbytes and all(x == y for x, y in zip(_chunks(a), _chunks(b), strict=False))


def _chunks(found: FileSlices) -> Iterator[bytes]:
    """The bytes of `found` in pieces of at most CHUNK, cut at the same places for any slices of equal length."""
    pending = b""
    for fd, offset, n in found.parts:
        end = offset + n
        while offset < end:
            data = os.pread(fd, min(CHUNK - len(pending), end - offset), offset)
            if not data:
                raise OSError("a checkpoint file is shorter than its index says")
            offset += len(data)
            pending += data
            if len(pending) == CHUNK:
                yield pending
                pending = b""
    yield pending
