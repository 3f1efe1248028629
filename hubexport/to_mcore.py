"""Hugging Face safetensors → megatron-core torch_dist: plan from headers, then the job the executor runs (every rank
writes its own chunks into the shared staging folder; --test re-reads them before publishing)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch

from hubexport import to_mcore_recipe
from hubexport.core import ZEROS, FileSlices, Group
from hubexport.dist import Dist
from hubexport.errors import ConfigError, MappingError
from hubexport.hfdir import load_config
from hubexport.mapping.hf_to_mcore import EqualCheck, McorePlan, ZeroCheck, hf_to_megatron_plan
from hubexport.mapping.mcore_to_hf import megatron_to_hf_groups
from hubexport.merge_report import megatron_done_line, megatron_plan_line
from hubexport.options import MegatronOptions, torch_dtype
from hubexport.resolve import ResolvedModel
from hubexport.result import MegatronFacts, OnFile, Result, WrittenFile
from hubexport.sources.hf import SafetensorsSource
from hubexport.sources.mcore import TorchDistSource
from hubexport.sources.quantized import dequantized, without_quantization
from hubexport.writers.mcore import (
    Chunk,
    Entry,
    Produced,
    assign_ranks,
    extra_state_blob,
    extra_state_modules,
    file_name,
    metadata_bytes,
    placement,
    plan_files,
    write_common,
    write_rank,
)


class McoreJob:
    """The executor's job for the HF → Megatron direction."""

    def __init__(self, model: ResolvedModel, options: MegatronOptions, dist: Dist) -> None:
        hf_dir = model.path
        if not (hf_dir / "config.json").is_file():
            raise ConfigError(f"{hf_dir / 'config.json'} does not exist",
                              hint="--hf-model-path must be a Hugging Face model folder (config.json + *.safetensors)")
        self.model, self.options, self.dist = model, options, dist
        self.inputs = (hf_dir,)
        config = load_config(hf_dir, hf_dir, trust_remote_code=options.trust_remote_code)
        self.hf_files = SafetensorsSource(hf_dir)
        # FP8 block-quantized weights (DeepSeek-V3 as published) are dequantized as they are read; scales never leave
        self.source = dequantized(self.hf_files, config, dtype=torch_dtype(options.dtype or "bf16"),
                                  where=str(hf_dir / "config.json"))
        self.config = without_quantization(config)
        self.hf = self.source.metas()
        self.plan: McorePlan = hf_to_megatron_plan(self.hf, self.config, spec=options.spec)
        where = {"num_layers": self.plan.stacks, "num_experts": self.plan.num_experts, "stacked": self.plan.stacked}
        self.chunks = [Chunk(o, placement(o.name, **where)) for o in self.plan.outputs]
        self.owners = assign_ranks([c.spec.nbytes for c in self.chunks], dist.world_size)
        extra = [placement(m + "._extra_state", **where)
                 for m in extra_state_modules([c.spec.name for c in self.chunks], options.spec)]
        self.copied: dict[str, tuple[tuple[int, int, int], ...]] = {}  # chunk → its (weight file, offset, n) parts
        self.entries = plan_files(self.chunks, self.owners, dist.world_size, extra, extra_state_blob(options.spec))

    def result(self, command: str, target: Path) -> Result:
        plan, hf = self.plan, self.hf
        peak = max((sum(hf[n].nbytes for n in g.inputs) + sum(o.nbytes for o in g.outputs) for g in plan.groups),
                   default=0)
        dtypes: dict[torch.dtype, int] = {}
        for c in self.chunks:
            dtypes[c.spec.dtype] = dtypes.get(c.spec.dtype, 0) + c.spec.nbytes
        facts = MegatronFacts(spec=self.options.spec, layer_keys="stacked" if plan.stacked else "per-layer",
                              num_tensors=len(self.chunks), num_keys=len({c.where.key for c in self.chunks}),
                              padded_vocab=plan.padded_vocab, world_size=self.dist.world_size, tested=self.options.test,
                              mtp_num_layers=plan.mtp_layers)
        return Result(
            command=command, target_dir=target, source_format="hf", source_version="safetensors", parallel={},
            architecture=plan.architecture,
            dtype=str(max(dtypes, key=dtypes.__getitem__)).removeprefix("torch."),
            num_parameters=sum(math.prod(s.shape) for s in hf.values()), tied_embeddings=plan.tied,
            value_model=plan.value_model, global_step=None, peak_tensor_bytes=peak,
            notes=[*self.hf_files.notes, *plan.notes],
            megatron=facts, resolved=self.model.as_json() if self.model.repo_id else None,
        )

    def describe(self, result: Result) -> list[str]:
        return [*result.notes, megatron_plan_line(result)]

    def planned_files(self) -> list[WrittenFile]:
        return []  # torch_dist file names and sizes are the writer's to choose

    def precheck(self) -> None:
        """Rank 0, before any write: consistency checks (a tied alias equals the embedding...)."""
        for g in self.plan.groups:
            if not g.outputs:
                g.convert({n: self.source.read(n) for n in g.inputs})

    def write(self, tmp: Path, dist: Dist, on_file: OnFile | None = None) -> list[WrittenFile]:
        """Every rank writes its own file (torch_dist files are not told one by one: nothing uploads them)."""
        write_rank(tmp / file_name(dist.rank), self.entries[dist.rank], self._produce())
        return []

    def _produce(self) -> Callable[[Entry], Produced]:
        group_of: dict[str, Group] = {o.name: g for g in self.plan.groups for o in g.outputs}
        pending: dict[str, torch.Tensor] = {}  # the rest of the last group (a fused tensor's experts): read it once

        def produce(entry: Entry) -> Produced:
            g = group_of[entry.name]
            if (rows := self._rows(g, entry.name)) is not None:
                self.copied[entry.name] = rows.parts
                return FileSlices(tuple((f if f == ZEROS else self.hf_files.fd(f), o, n) for f, o, n in rows.parts))
            if entry.name not in pending:
                pending.clear()
                pending.update(g.convert({n: self.source.read(n) for n in g.inputs}))
            return pending.pop(entry.name)

        return produce

    def _rows(self, g: Group, name: str) -> FileSlices | None:
        """An output made of the HF tensors' rows (and zero rows): where their bytes lie, as (index of the weight
        file, offset, length) parts."""
        if g.rows is None or self.source is not self.hf_files:  # dequantized weights are made in memory
            return None
        specs = [self.hf[n] for n in g.inputs]
        row_bytes = specs[0].nbytes // specs[0].shape[0] if specs[0].shape[0] else 0
        ranges = g.rows[next(i for i, o in enumerate(g.outputs) if o.name == name)]
        zeros = max((b for _, b in ranges), default=0) * row_bytes - sum(s.nbytes for s in specs)
        parts = (*(self.hf_files.location(n) for n in g.inputs), (ZEROS, 0, max(zeros, 0)))
        return FileSlices(parts).take(tuple((a * row_bytes, b * row_bytes) for a, b in ranges))

    def finish(self, tmp: Path, files: list[WrittenFile]) -> None:
        """Rank 0, once every rank's file is in place: the checkpoint's metadata; and, for one process whose every
        chunk was copied from the HF files, the recipe the next conversion of such a folder repeats without torch."""
        metadata = metadata_bytes(self.entries)
        write_common(tmp, metadata)
        if self.dist.world_size != 1:
            return
        key = to_mcore_recipe.key(self.model.path, self.hf_files.files, self.options)
        recipe = self._recipe(metadata, (tmp / "common.pt").read_bytes()) if key else None
        if key and recipe:
            to_mcore_recipe.store(key, recipe)

    def _recipe(self, metadata: bytes, common: bytes) -> to_mcore_recipe.Recipe | None:
        objects = [e for e in self.entries[0] if e.blob is not None]
        chunks = [e for e in self.entries[0] if e.blob is None]
        checks = []
        for g in self.plan.groups:
            if g.outputs:
                continue
            if isinstance(g.convert, EqualCheck):
                checks.append(("equal", (self.hf_files.location(g.convert.a),), (self.hf_files.location(g.convert.b),)))
            elif isinstance(g.convert, ZeroCheck):
                checks.append(("zero", (self.hf_files.location(g.convert.name),), ()))
            else:
                return None
        if any(e.name not in self.copied for e in chunks):
            return None  # made in memory: nothing to repeat without torch
        result = self.result("to-megatron", Path())
        facts = {k: getattr(result, k) for k in ("architecture", "dtype", "num_parameters", "tied_embeddings",
                                                 "value_model", "peak_tensor_bytes", "notes")}
        facts["megatron"] = dataclasses.asdict(result.megatron)
        return to_mcore_recipe.Recipe(
            len(objects), objects[0].blob.decode("latin-1") if objects else "",
            tuple((e.dtype, e.sizes, self.copied[e.name]) for e in chunks),
            metadata.decode("latin-1"), common.decode("latin-1"), tuple(checks), facts)

    def check(self, tmp: Path, dist: Dist) -> None:
        """--test: re-read the written checkpoint through the reader and the tables' forward direction; every HF
        tensor must come back bit-exact. Ranks split the work."""
        if not self.options.test:
            return
        written = TorchDistSource(tmp)
        groups, _ = megatron_to_hf_groups(written.metas(), self.config, value_model=self.plan.value_model,
                                          experts_transposed=self.plan.experts_transposed)
        expected = {n for g in self.plan.groups if g.outputs for n in g.inputs}
        missing = expected - {o.name for g in groups for o in g.outputs}
        if missing:
            raise MappingError(f"--test: {len(missing)} HF tensor(s) do not come back from the written checkpoint: "
                               f"{sorted(missing)[:5]}", hint="this is a bug in hubexport; please report it")
        owners = assign_ranks([sum(o.nbytes for o in g.outputs) for g in groups], dist.world_size)
        for g, owner in zip(groups, owners, strict=True):
            if owner == dist.rank:
                self._compare(g.convert({n: written.read(n) for n in g.inputs}))

    def _compare(self, got: dict[str, torch.Tensor]) -> None:
        for name, t in got.items():
            if name not in self.hf:
                if name == "score.bias" and not torch.count_nonzero(t):
                    continue  # verl's critic has no bias: the HF export's zero bias is not in every folder
                raise MappingError(f"--test: the written checkpoint yields {name}, which the HF folder lacks",
                                   hint="this is a bug in hubexport; please report it")
            ref = self.source.read(name)
            if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
                raise MappingError(f"--test: {name} read back from the checkpoint differs from the HF tensor",
                                   hint="the output was not published; re-run, and report it if it persists")

    def close(self) -> None:
        self.source.close()

    def done(self, result: Result) -> str:
        return megatron_done_line(result)
