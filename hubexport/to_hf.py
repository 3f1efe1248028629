"""Training checkpoint → Hugging Face folder: detect → source → mapping → plan, then the job the executor runs (every
rank writes its own shard files; rank 0 writes the adapter, index, config and tokenizer after a barrier)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from hubexport import lora, lora_export, mcore_lora, merge_recipe
from hubexport.core import FileSlices, Group, TensorSpec
from hubexport.detect import Layout, detect
from hubexport.dist import Dist
from hubexport.errors import CheckpointError, ConfigError
from hubexport.hfdir import copy_support_files, load_config
from hubexport.lora_export import LoraExport
from hubexport.mapping.archnames import is_value_checkpoint
from hubexport.mapping.hf_native import TiedCheck, architecture_for, meta_model, native_groups
from hubexport.mapping.mcore_to_hf import megatron_to_hf_groups
from hubexport.merge_recipe import Copy, Recipe
from hubexport.merge_report import done_line, plan_line
from hubexport.options import MergeOptions
from hubexport.plan import Plan, make_plan, parse_size
from hubexport.result import OnFile, Result, WrittenFile
from hubexport.safetensors_format import INDEX_NAME, check_complete
from hubexport.sources import Source
from hubexport.sources.fsdp import FsdpSource
from hubexport.sources.fsdp_files import locate
from hubexport.sources.fsdp_located import LocatedFsdpSource
from hubexport.writers.safetensors import Fsyncs, write_file


@dataclass
class Prepared:
    """Everything known before the first tensor byte is read."""

    layout: Layout
    source: Source
    config: PretrainedConfig
    plan: Plan
    architecture: str
    value_model: bool
    tied: bool
    lora: LoraExport | None = None
    recipe_key: str | None = None  # where this merge's recipe is cached for the fast path, when it can be
    planning_notes: tuple[str, ...] = ()  # the notes planning added to detect's


def open_source(layout: Layout) -> Source:
    if layout.format == "fsdp":  # without torch's unpickler (and the DTensor import) when every tensor is byte runs
        located = locate(layout.files)
        return FsdpSource(layout.files) if located is None else LocatedFsdpSource(layout.files, located)
    if layout.format == "megatron":  # torch.distributed.checkpoint takes ~1.5 s to import: only for these
        from hubexport.sources.mcore import open_megatron_source

        return open_megatron_source(layout)
    if layout.format == "dcp":
        from hubexport.sources.torch_dcp import open_dcp_source

        return open_dcp_source(layout)
    if layout.format == "deepspeed":
        from hubexport.sources.deepspeed import open_deepspeed_source

        return open_deepspeed_source(layout)
    raise CheckpointError(f"{layout.root}: {layout.format} checkpoints ({layout.version}) are not supported yet",
                          hint="convert it with the tool that wrote it, or upgrade hubexport")


def shard_bytes(max_shard_size: int | str) -> int:
    try:
        return parse_size(max_shard_size)
    except ValueError:
        raise ConfigError(f"--max-shard-size {max_shard_size!r} is not a size", hint="use e.g. 5GB or 500MB") from None


def prepare(local_dir: Path, options: MergeOptions = MergeOptions()) -> Prepared:
    """Detect, open lazily, map and plan: reads headers and pickled metadata only."""
    o = options
    max_bytes = shard_bytes(o.max_shard_size)
    layout = detect(Path(local_dir), o.backend)
    detected = len(layout.notes)
    config = load_config(layout.hf_dir, layout.root, trust_remote_code=o.trust_remote_code)
    source, mcore_peft = _open(layout, config, o)
    specs = source.metas()
    keys = lora.split_keys(specs) if lora.is_peft_checkpoint(specs) else None
    if keys is None and (o.lora_mode or o.lora_base_model or o.lora_alpha or o.lora_rank):
        raise ConfigError(f"{layout.root} holds no LoRA tensors, so --lora/--lora-alpha/--lora-rank/--base-model "
                          "do not apply", hint="drop those options for a full fine-tuning checkpoint")
    if layout.format == "megatron" and layout.version != "mbridge" and not mcore_peft:  # mbridge: HF-native already
        return _prepare_megatron(layout, source, config, specs, o, max_bytes, detected)
    value_model, tied = _heads(layout, config, specs, keys, o)
    architecture, arch_notes = architecture_for(config, value_model=value_model)
    layout.notes.extend(arch_notes)
    if value_model:
        config.num_labels = 1
        tied = False
    exported = None
    if keys is None:
        groups = native_groups(config, architecture, specs, trust_remote_code=o.trust_remote_code)
    else:
        model = meta_model(config, architecture, trust_remote_code=o.trust_remote_code)
        groups, source, exported = lora_export.prepare_lora(
            layout, model, source, keys, mode=o.lora_mode or "adapter", alpha=o.lora_alpha, rank=o.lora_rank,
            base_model=o.lora_base_model, cast=o.cast, value_model=value_model)
    plan = make_plan(groups, max_shard_size=max_bytes, cast=o.cast)
    config.architectures = [architecture]
    key = _recipe_key(layout, specs, plan, o) if exported is None else None
    return Prepared(layout, source, config, plan, architecture, value_model, tied, exported, key,
                    tuple(layout.notes[detected:]))


def _recipe_key(layout: Layout, specs: dict[str, TensorSpec], plan: Plan, o: MergeOptions) -> str | None:
    """A merge the fast path may repeat. FSDP: every output a checkpoint tensor unchanged, every other group a tie
    check. torch_dist: every output a stored tensor's layer, or rows of one, in its dtype, or zeros."""
    if layout.format == "megatron":
        if layout.version not in ("v1", "v2") or layout.adapter is not None or not all(
                _bytes_of_one_input(g, specs) for g in plan.groups):
            return None
    elif not all((g.passthrough and len(g.inputs) == 1 and g.outputs == (specs.get(g.inputs[0]),))
                 or isinstance(g.convert, TiedCheck) for g in plan.groups):
        return None
    shapes = merge_recipe.shapes_of((s.name, s.shape, s.dtype) for s in specs.values())
    return merge_recipe.key(layout.format, layout.version, layout.hf_dir, shapes, o)


def _bytes_of_one_input(g: Group, specs: dict[str, TensorSpec]) -> bool:
    """Outputs that are bytes of one input (a layer, rows of it) in its dtype, or zeros (a row gather of nothing)."""
    if not g.inputs:
        return g.rows is not None
    return len(g.inputs) == 1 and (g.passthrough or g.rows is not None) and all(
        o.dtype == specs[g.inputs[0]].dtype for o in g.outputs)


def _open(layout: Layout, config: PretrainedConfig, o: MergeOptions) -> tuple[Source, bool]:
    """The checkpoint's source; a Megatron LoRA run is shown under PEFT's names (the FSDP LoRA path exports it)."""
    source = open_source(layout)
    mcore_peft = layout.format == "megatron" and layout.version != "mbridge" and mcore_lora.is_mcore_lora(source.metas())
    lora.check_megatron_adapter(layout, has_lora=mcore_peft)  # a Megatron PEFT run: never export its base alone
    if mcore_peft:
        source, updates = mcore_lora.peft_view(source, config, tie_word_embedding=o.tie_word_embedding,
                                               value_model=o.is_value_model, notes=layout.notes)
        config.update(updates)
    return source, mcore_peft


def _heads(layout: Layout, config: PretrainedConfig, specs: dict[str, TensorSpec], keys: lora.LoraKeys | None,
           o: MergeOptions) -> tuple[bool, bool]:
    """(value model, tied embeddings), from the checkpoint's keys and the config; a flag that contradicts them is an
    error, never a silent drop."""
    base_specs = specs if keys is None else {n: TensorSpec(n, specs[k].shape, specs[k].dtype) for n, k in keys.base.items()}
    value_model = o.is_value_model or is_value_checkpoint(base_specs, base_specs)
    if o.is_value_model and "score.weight" not in base_specs and not (keys and keys.lora_only):
        raise ConfigError(f"--is-value-model was given but {layout.root} has no score.weight value head",
                          hint="drop --is-value-model for an actor checkpoint")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if o.tie_word_embedding and not tied:
        raise ConfigError(
            f"--tie-word-embedding contradicts {layout.hf_dir / 'config.json'}, which says tie_word_embeddings=false",
            hint="drop the flag: hubexport reads tying from the config and never drops a trained lm_head",
        )
    return value_model, tied


def _prepare_megatron(layout: Layout, source: Source, config: PretrainedConfig, specs: dict[str, TensorSpec],
                      o: MergeOptions, max_bytes: int, detected: int) -> Prepared:
    """Megatron names and layouts → HF through the architecture tables; heads decided by the checkpoint's keys."""
    groups, updates = megatron_to_hf_groups(specs, config, tie_word_embedding=o.tie_word_embedding,
                                            value_model=o.is_value_model, notes=layout.notes)
    config.update(updates)
    plan = make_plan(groups, max_shard_size=max_bytes, cast=o.cast)
    value_model = "num_labels" in updates
    return Prepared(layout, source, config, plan, updates["architectures"][0], value_model,
                    bool(updates.get("tie_word_embeddings", False)) and not value_model,
                    recipe_key=_recipe_key(layout, specs, plan, o), planning_notes=tuple(layout.notes[detected:]))


def dominant_dtype(plan: Plan) -> torch.dtype:
    return plan.dominant_dtype() or torch.float32


class GroupCache:
    """Computes each group once, keeping only the latest group's outputs: outputs are ordered, so a group's outputs
    are consumed before the next group's are needed (a group split across two files costs one recomputation)."""

    def __init__(self, plan: Plan, source: Source) -> None:
        self.plan, self.source = plan, source
        self.group_of = plan.group_of()
        self.specs = source.metas()
        self._index: int | None = None
        self._outputs: dict[str, torch.Tensor] = {}

    def run(self, index: int) -> dict[str, torch.Tensor]:
        group = self.plan.groups[index]
        return group.convert({n: self.source.read(n) for n in group.inputs})

    def fetch(self, spec: TensorSpec) -> torch.Tensor | FileSlices:
        index = self.group_of[spec.name]
        if (found := self._slices(self.plan.groups[index], spec)) is not None:
            return found
        if index != self._index:
            self._outputs, self._index = self.run(index), index
        t = self._outputs.pop(spec.name)
        return t.to(spec.dtype) if t.dtype != spec.dtype else t

    def _slices(self, group: Group, spec: TensorSpec) -> FileSlices | None:
        """An output that is a source tensor unchanged, or rows of one (a row gather), in its own dtype, whose
        bytes the source can point at: copied file to file, never read."""
        slices = getattr(self.source, "slices", None)
        if slices is None or len(group.inputs) != 1 or not (group.passthrough or group.rows is not None):
            return None
        source_spec = self.specs.get(group.inputs[0])
        if source_spec is None or source_spec.dtype != spec.dtype:
            return None
        whole = slices(group.inputs[0])
        if whole is None:
            return None
        ranges = copy_of(group, spec, source_spec).ranges
        return whole if ranges is None else whole.take(ranges)


def copy_of(group: Group, spec: TensorSpec, source: TensorSpec | None) -> Copy:
    """What an output of a one-input passthrough or row-gather group is: its input's bytes, or byte ranges of them;
    of a row gather without inputs (`source` None), zeros."""
    if source is None:
        return Copy(None, ((0, spec.nbytes),))
    if group.rows is None:
        return Copy(group.inputs[0])
    row_bytes = source.nbytes // source.shape[0] if source.shape[0] else 0
    rows = group.rows[next(i for i, o in enumerate(group.outputs) if o.name == spec.name)]
    return Copy(group.inputs[0], tuple((a * row_bytes, b * row_bytes) for a, b in rows))


class HfJob:
    """The executor's job for the checkpoint → HF direction."""

    def __init__(self, prep: Prepared, source_path: Path) -> None:
        self.prep = prep
        layout = prep.layout
        owned = [Path(source_path), layout.root, layout.hf_dir, *layout.files]
        self.inputs = tuple(p for p in owned if p is not None)
        if prep.lora and prep.lora.base_model is not None:
            self.inputs += (prep.lora.base_model,)

    @property
    def layout(self) -> Layout:
        return self.prep.layout

    @property
    def writes_adapter(self) -> bool:
        return self.prep.lora is not None and self.prep.lora.mode != "fuse"

    def result(self, command: str, target: Path) -> Result:
        p = self.prep
        weights_plan = p.plan if p.plan.files or not p.lora else p.lora.plan
        return Result(
            command=command, target_dir=target, source_format=p.layout.format, source_version=p.layout.version,
            parallel=dict(p.layout.parallel), architecture=p.architecture,
            dtype=str(dominant_dtype(weights_plan)).removeprefix("torch."),
            num_parameters=p.plan.num_parameters, tied_embeddings=p.tied,
            value_model=p.value_model, global_step=p.layout.global_step,
            peak_tensor_bytes=p.plan.peak_bytes(p.source.metas()),
            notes=[*p.layout.notes, *getattr(p.source, "notes", []), *(p.lora.notes if p.lora else [])],
            lora=p.lora.summary() if p.lora else None,
        )

    def describe(self, result: Result) -> list[str]:
        p = self.prep
        lines = [*result.notes, plan_line(result, len(p.plan.files), p.plan.total_size)]
        return lines + ([lora_export.describe(p.lora)] if p.lora else [])

    def planned_files(self) -> list[WrittenFile]:
        files = [WrittenFile(f.name, f.nbytes, None) for f in self.prep.plan.files]
        if self.writes_adapter:
            files.append(WrittenFile(f"{lora.ADAPTER_DIR}/adapter_model.safetensors", self.prep.lora.plan.total_size,
                                     None))
        return files

    def precheck(self) -> None:
        """Rank 0, before any write: the check groups (a tied alias equals its canonical weight...)."""
        cache = GroupCache(self.prep.plan, self.prep.source)
        for i, g in enumerate(self.prep.plan.groups):
            if not g.outputs:
                cache.run(i)

    def write(self, tmp: Path, dist: Dist, on_file: OnFile | None = None) -> list[WrittenFile]:
        """This rank's shard files (rank 0 also writes the adapter), each told to `on_file` once complete."""
        plan = self.prep.plan
        cache = GroupCache(plan, self.prep.source)
        written = []
        with Fsyncs() as fsyncs:
            for f in plan.files_for_rank(dist.rank, dist.world_size):
                sha = write_file(tmp / f.name, list(f.tensors), cache.fetch, fsync=False)
                fsyncs.add(tmp / f.name)
                written.append(WrittenFile(f.name, (tmp / f.name).stat().st_size, sha))
                if on_file is not None:
                    on_file(written[-1], tmp / f.name)
        if dist.is_main and self.writes_adapter:
            written.append(self._write_adapter(tmp))
            if on_file is not None:
                on_file(written[-1], tmp / written[-1].name)
        return written

    def _write_adapter(self, tmp: Path) -> WrittenFile:
        """`lora_adapter/` with PEFT's file names, from the same source and the same streaming writer."""
        exp = self.prep.lora
        folder = tmp / lora.ADAPTER_DIR
        folder.mkdir()
        [planned] = exp.plan.files
        path = folder / "adapter_model.safetensors"
        sha = write_file(path, list(planned.tensors), GroupCache(exp.plan, self.prep.source).fetch)
        check_complete(path, {t.name for t in planned.tensors})
        (folder / "adapter_config.json").write_text(json.dumps(exp.config, indent=2, sort_keys=True) + "\n")
        return WrittenFile(f"{lora.ADAPTER_DIR}/{path.name}", path.stat().st_size, sha)

    def finish(self, tmp: Path, files: list[WrittenFile]) -> None:
        """Rank 0, after every rank wrote its files: check them, then index, config and tokenizer."""
        p = self.prep
        if p.lora is not None and not p.lora.writes_base:
            return  # the adapter alone: a config.json without weights would pass for a broken model
        for f in p.plan.files:
            check_complete(tmp / f.name, {t.name for t in f.tensors})
        self._write_config(tmp)
        if p.layout.hf_dir is not None:
            copy_support_files(p.layout.hf_dir, tmp)
        if p.recipe_key is not None:
            merge_recipe.store(p.recipe_key, self._recipe(tmp))

    def _write_config(self, folder: Path) -> None:
        """The index (when sharded) and config.json, as save_pretrained writes them."""
        p = self.prep
        if (index := merge_recipe.index_of(p.plan)) is not None:
            (folder / INDEX_NAME).write_text(index)
        p.config.dtype = dominant_dtype(p.plan)
        p.config.save_pretrained(folder)

    def planned_recipe(self, folder: Path) -> Recipe:
        """The recipe this merge records, from its plan alone: config.json and the index are written into `folder`
        (the first merge's planning process, `first_merge`)."""
        self._write_config(folder)
        return self._recipe(folder)

    def _recipe(self, tmp: Path) -> Recipe:
        """What the fast path needs to write this folder again: read back from what was just written."""
        p, r = self.prep, self.result("merge", tmp)
        specs = p.source.metas()
        index = tmp / INDEX_NAME
        return Recipe(architecture=r.architecture, dtype=r.dtype, num_parameters=r.num_parameters, tied=r.tied_embeddings,
                      value_model=r.value_model, peak_tensor_bytes=r.peak_tensor_bytes, notes=p.planning_notes,
                      files=merge_recipe.headers(p.plan),
                      index=index.read_bytes().decode() if index.exists() else None,
                      config=(tmp / "config.json").read_bytes().decode(),
                      checks=tuple((g.convert.alias, g.convert.canonical) for g in p.plan.groups
                                   if isinstance(g.convert, TiedCheck)),
                      copies=tuple((o.name, c.source, c.ranges) for g in p.plan.groups for o in g.outputs
                                   if (c := copy_of(g, o, specs[g.inputs[0]] if g.inputs else None)) != Copy(o.name)))

    def check(self, tmp: Path, dist: Dist) -> None:
        """Every shard's header was checked against the plan in finish(); nothing more to read back."""

    def close(self) -> None:
        self.prep.source.close()

    def done(self, result: Result) -> str:
        return done_line(result, len(self.prep.plan.files), f" + {lora.ADAPTER_DIR}/" if self.writes_adapter else "")


