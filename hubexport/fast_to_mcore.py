"""to-megatron without torch, transformers or megatron-core: when an earlier conversion of a folder with the same
weight-file headers, config and options left its recipe (`to_mcore_recipe`), every chunk of the torch_dist file is
its archive around the recorded runs of HF-file bytes (and zeros), copied kernel-side, and `.metadata` and
`common.pt` are the recorded bytes. The output is the full path's, byte for byte (`tests/test_fast_to_mcore.py`).

Anything else returns None and the full path (`to_mcore`) runs, with its checks and its errors: no recipe, --test,
several torchrun ranks, a check the HF tensors no longer pass, a file shorter than the recipe needs.
`HUBEXPORT_NO_FAST_PATH=1` always takes the full path."""

from __future__ import annotations

import os
from pathlib import Path

from hubexport import to_mcore_recipe
from hubexport.core import ZEROS, FileSlices
from hubexport.dist import Dist
from hubexport.errors import CheckpointError
from hubexport.merge_report import megatron_done_line, megatron_plan_line
from hubexport.options import MegatronOptions
from hubexport.resolve import ResolvedModel
from hubexport.result import MegatronFacts, OnFile, Result, WrittenFile
from hubexport.sources.hf import weight_files
from hubexport.sources.torchsave import ITEMSIZE
from hubexport.to_mcore_recipe import Part, Recipe
from hubexport.writers import torchsave_zip
from hubexport.writers.mcore import Entry, file_name, write_common, write_rank
from hubexport.writers.safetensors import CHUNK


def job(model: ResolvedModel, options: MegatronOptions) -> FastMcoreJob | None:
    """The fast job for this folder, or None when the full path must run."""
    if os.environ.get("HUBEXPORT_NO_FAST_PATH") == "1" or not (model.path / "config.json").is_file():
        return None
    try:
        files, _ = weight_files(model.path, [])
    except CheckpointError:
        return None
    key = to_mcore_recipe.key(model.path, files, options) if files else None
    recipe = to_mcore_recipe.load(key) if key else None
    if recipe is None:
        return None
    fast = FastMcoreJob(model, recipe, files)
    try:
        if fast.fits() and fast.checks_hold():
            return fast
    except OSError:
        pass
    fast.close()  # the full path reads the folder again, and says what is wrong with it
    return None


class FastMcoreJob:
    """The executor's job (see executor.Job) for a recorded to-megatron conversion, one process."""

    def __init__(self, model: ResolvedModel, recipe: Recipe, files: list[Path]) -> None:
        self.model, self.recipe, self.files = model, recipe, files
        self.inputs = (model.path,)
        self._fds = [os.open(f, os.O_RDONLY) for f in files]
        blob = recipe.blob.encode("latin-1")
        self.entries, at = [], 0
        for _ in range(recipe.objects):
            self.entries.append(Entry("", None, (), (), (), "uint8", 0, at, len(blob), blob))
            at += len(blob)
        for i, (dtype, sizes, _) in enumerate(recipe.chunks):
            size = torchsave_zip.layout(dtype, sizes, ITEMSIZE[dtype]).size
            self.entries.append(Entry("", f"recorded chunk {i}", (), sizes, (), dtype, i, at, size))
            at += size

    def _slices(self, parts: tuple[Part, ...]) -> FileSlices:
        return FileSlices(tuple((f if f == ZEROS else self._fds[f], o, n) for f, o, n in parts))

    def fits(self) -> bool:
        """Every recorded run lies inside its file, and each chunk's runs add up to its size."""
        sizes = [os.fstat(fd).st_size for fd in self._fds]
        for dtype, shape, parts in self.recipe.chunks:
            nbytes = ITEMSIZE.get(dtype, 0)
            for s in shape:
                nbytes *= s
            if sum(n for *_, n in parts) != nbytes:
                return False
        runs = [p for _, _, parts in self.recipe.chunks for p in parts]
        runs += [p for _, a, b in self.recipe.checks for p in (*a, *b)]
        return all(f == ZEROS or (0 <= f < len(sizes) and o >= 0 and o + n <= sizes[f]) for f, o, n in runs)

    def checks_hold(self) -> bool:
        """What the full path checks, on bytes: a tied alias (or an MTP copy) holds its weight's bytes, a critic's
        score bias is zero. Any doubt goes to the full path, which decides and explains."""
        for kind, a, b in self.recipe.checks:
            if kind == "equal" and not self._same(a, b):
                return False
            if kind == "zero" and any(any(c) for c in self._chunks(a)):
                return False
            if kind not in ("equal", "zero"):
                return False
        return True

    def _same(self, a: tuple[Part, ...], b: tuple[Part, ...]) -> bool:
        return sum(n for *_, n in a) == sum(n for *_, n in b) and all(
            x == y for x, y in zip(self._chunks(a), self._chunks(b), strict=True))

    def _chunks(self, parts: tuple[Part, ...]):
        """The bytes of one tensor (a single run) in pieces of at most CHUNK."""
        for f, offset, n in parts:
            for at in range(offset, offset + n, CHUNK):
                yield os.pread(self._fds[f], min(CHUNK, offset + n - at), at)

    def result(self, command: str, target: Path) -> Result:
        r = self.recipe.result
        return Result(command=command, target_dir=target, source_format="hf", source_version="safetensors",
                      parallel={}, architecture=r["architecture"], dtype=r["dtype"],
                      num_parameters=r["num_parameters"], tied_embeddings=r["tied_embeddings"],
                      value_model=r["value_model"], global_step=None, peak_tensor_bytes=r["peak_tensor_bytes"],
                      notes=list(r["notes"]), megatron=MegatronFacts(**r["megatron"]),
                      resolved=self.model.as_json() if self.model.repo_id else None)

    def describe(self, result: Result) -> list[str]:
        return [*result.notes, megatron_plan_line(result)]

    def planned_files(self) -> list[WrittenFile]:
        return []

    def precheck(self) -> None:
        """Checked when the job was made (checks_hold)."""

    def write(self, tmp: Path, dist: Dist, on_file: OnFile | None = None) -> list[WrittenFile]:
        parts = {e.name: p for e, (_, _, p) in zip(self.entries[self.recipe.objects:], self.recipe.chunks,
                                                   strict=True)}
        write_rank(tmp / file_name(0), self.entries, lambda e: self._slices(parts[e.name]))
        return []

    def finish(self, tmp: Path, files: list[WrittenFile]) -> None:
        write_common(tmp, self.recipe.metadata.encode("latin-1"), self.recipe.common.encode("latin-1"))

    def check(self, tmp: Path, dist: Dist) -> None:
        """Nothing to read back: --test always takes the full path."""

    def done(self, result: Result) -> str:
        return megatron_done_line(result)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
