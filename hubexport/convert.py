"""Orchestration: detect → source → mapping → plan → writer. Rank-aware: under torchrun every rank writes its own
files and rank 0 writes the index, config and tokenizer after a barrier."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hubexport import lora
from hubexport.detect import Layout, detect
from hubexport.dist import Dist
from hubexport.errors import CheckpointError, ConfigError, HubexportError, MappingError, TargetError
from hubexport.hfdir import copy_support_files, load_config
from hubexport.mapping.hf_native import architecture_for, check_keys, is_value_checkpoint, meta_model, saved_groups
from hubexport.mapping.mcore import megatron_to_hf_groups
from hubexport.plan import Group, Plan, make_plan, natural_key, parse_size
from hubexport.sources import CombinedSource, Source, TensorSpec
from hubexport.sources.fsdp import FsdpSource
from hubexport.sources.hf import SafetensorsSource
from hubexport.sources.mcore import open_megatron_source
from hubexport.writers.safetensors import index_json, read_header, write_file
from hubexport.writers.staging import check_target, discard, fresh_staging, publish, staging_dir


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    sha256: str | None  # None in a dry run


@dataclass
class MergeResult:
    target_dir: Path
    source_format: str  # "fsdp" | "megatron" | "hf"
    source_version: str  # e.g. "fsdp2", "legacy", "v1", "v2"
    parallel: dict[str, int]  # {"world_size": 4} or {"tp": 2, "pp": 2, "ep": 1}
    architecture: str  # e.g. "Qwen2ForCausalLM"
    dtype: str  # dominant dtype of the written weights, e.g. "bfloat16"
    num_parameters: int
    tied_embeddings: bool
    value_model: bool
    global_step: int | None
    peak_tensor_bytes: int = 0  # planned upper bound of tensor bytes held at once (largest group in + out)
    files: list[WrittenFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lora: dict | None = None  # {"mode", "r", "lora_alpha", "modules", "adapter_dir", ...} for PEFT checkpoints


DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


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


@dataclass
class LoraExport:
    """The LoRA side of a PEFT checkpoint: how the base folder was made and the adapter to write next to it."""

    mode: str  # "adapter" | "fuse" | "both"
    settings: lora.LoraSettings
    keys: lora.LoraKeys
    plan: Plan  # lora_adapter/adapter_model.safetensors
    config: dict
    writes_base: bool  # False for a LoRA-only checkpoint without --base-model: the adapter alone
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"mode": self.mode, "r": self.settings.r, "lora_alpha": self.config["lora_alpha"],
                "modules": len(self.keys.modules), "lora_only": self.keys.lora_only, "settings_from": self.settings.origin,
                "adapter_dir": lora.ADAPTER_DIR if self.mode != "fuse" else None}


def open_source(layout: Layout) -> Source:
    if layout.format == "fsdp":
        return FsdpSource(layout.files)
    if layout.format == "megatron":
        return open_megatron_source(layout)
    raise CheckpointError(f"{layout.root}: {layout.format} checkpoints ({layout.version}) are not supported yet",
                          hint="convert it with the tool that wrote it, or upgrade hubexport")


def prepare(
    local_dir: Path,
    *,
    backend: str = "auto",
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    tie_word_embedding: bool = False,
    is_value_model: bool = False,
    trust_remote_code: bool = False,
    lora_mode: str | None = None,
    lora_alpha: float | None = None,
    lora_rank: int | None = None,
    base_model: Path | None = None,
) -> Prepared:
    """Detect, open lazily, map and plan: reads headers and pickled metadata only."""
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError:
        raise ConfigError(f"--max-shard-size {max_shard_size!r} is not a size", hint="use e.g. 5GB or 500MB") from None
    if lora_mode is not None and lora_mode not in lora.MODES:
        raise ConfigError(f"--lora {lora_mode!r} is not a LoRA export mode", hint="use adapter, fuse or both")
    layout = detect(Path(local_dir), backend)
    config = load_config(layout.hf_dir, layout.root, trust_remote_code=trust_remote_code)
    source = open_source(layout)
    specs = source.metas()
    keys = lora.split_keys(specs) if lora.is_peft_checkpoint(specs) else None
    if keys is None and (lora_mode or base_model or lora_alpha or lora_rank):
        raise ConfigError(f"{layout.root} holds no LoRA tensors, so --lora/--lora-alpha/--lora-rank/--base-model "
                          "do not apply", hint="drop those options for a full fine-tuning checkpoint")
    if layout.format == "megatron" and layout.version != "mbridge":  # mbridge weights are HF-native already
        return _prepare_megatron(layout, source, config, specs, tie_word_embedding=tie_word_embedding,
                                 is_value_model=is_value_model, shard_bytes=shard_bytes, dtype=dtype)
    base_specs = specs if keys is None else {n: TensorSpec(n, specs[k].shape, specs[k].dtype) for n, k in keys.base.items()}
    value_model = is_value_model or is_value_checkpoint(base_specs, base_specs)
    if is_value_model and "score.weight" not in base_specs and not (keys and keys.lora_only):
        raise ConfigError(f"--is-value-model was given but {layout.root} has no score.weight value head",
                          hint="drop --is-value-model for an actor checkpoint")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tie_word_embedding and not tied:
        raise ConfigError(
            f"--tie-word-embedding contradicts {layout.hf_dir / 'config.json'}, which says tie_word_embeddings=false",
            hint="drop the flag: hubexport reads tying from the config and never drops a trained lm_head",
        )
    architecture, arch_notes = architecture_for(config, value_model=value_model)
    layout.notes.extend(arch_notes)
    if value_model:
        config.num_labels = 1
        tied = False
    model = meta_model(config, architecture, trust_remote_code=trust_remote_code)
    cast = DTYPE_NAMES[dtype] if dtype else None
    lora_export = None
    if keys is None:
        groups = saved_groups(model, specs)
    else:
        groups, source, lora_export = prepare_lora(
            layout, model, source, keys, mode=lora_mode or "adapter", alpha=lora_alpha, rank=lora_rank,
            base_model=base_model, cast=cast, value_model=value_model)
    plan = make_plan(groups, max_shard_size=shard_bytes, cast=cast)
    config.architectures = [architecture]
    return Prepared(layout, source, config, plan, architecture, value_model, tied, lora_export)


def prepare_lora(
    layout: Layout, model: PreTrainedModel, source: Source, keys: lora.LoraKeys, *, mode: str, alpha: float | None,
    rank: int | None, base_model: Path | None, cast: torch.dtype | None, value_model: bool,
) -> tuple[list[Group], Source, LoraExport]:
    """Base-model groups (LoRA fused in for fuse/both) over the checkpoint, or over --base-model for a LoRA-only
    checkpoint; plus the adapter's plan and config."""
    settings = lora.find_settings(layout.root, alpha=alpha, rank=rank)
    lora.check_settings(settings, layout.root)
    specs = source.metas()
    notes = lora.resolve_ranks(keys, specs, settings)
    fuse = mode in ("fuse", "both")
    writes_base = True
    if not keys.lora_only:
        if base_model is not None:
            notes.append(f"--base-model {base_model} ignored: the checkpoint holds the base weights")
        base_specs = {n: TensorSpec(n, specs[k].shape, specs[k].dtype) for n, k in keys.base.items()}
        recipes = lora.base_recipes(keys, keys.base, specs, settings, fuse=fuse)
        groups = [lora.rebind(g, recipes) for g in saved_groups(model, base_specs)]
    elif base_model is None:
        if fuse:
            raise ConfigError(
                f"{layout.root} holds only LoRA tensors (save_lora_only), so --lora {mode} has no base weights to "
                "fuse into", hint="pass --base-model PATH (the Hugging Face folder the run started from), or use "
                                   "--lora adapter")
        groups, writes_base = [], False
        notes.append("LoRA-only checkpoint: writing the adapter alone (pass --base-model to write the model too)")
    else:
        base = SafetensorsSource(Path(base_model))
        base_names = check_base_folder(model, base)
        source = CombinedSource(base, source)
        specs = source.metas()
        recipes = lora.base_recipes(keys, {n: n for n in base_names}, specs, settings, fuse=fuse)
        groups = [lora.rebind(lora.copy_group(specs[n]), recipes) for n in base_names]
    if fuse:
        check_fusable_ties(model, keys)
    adapter = make_plan(lora.adapter_groups(keys, specs, settings.bias), max_shard_size=2**62, cast=cast,
                        prefix="adapter_model")
    modules = [n for n, _ in model.named_modules()]
    config = lora.adapter_config(
        keys, settings, targets=lora.target_modules(keys.modules, modules),
        task_type="TOKEN_CLS" if value_model else "CAUSAL_LM", base_model=str(base_model) if base_model else None)
    return groups, source, LoraExport(mode, settings, keys, adapter, config, writes_base, notes)


def check_base_folder(model: PreTrainedModel, base: SafetensorsSource) -> list[str]:
    """--base-model must hold exactly what save_pretrained writes for the checkpoint's architecture."""
    meta = {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    expected = {o.name: o.shape for g in saved_groups(model, meta) for o in g.outputs}
    found = base.metas()
    try:
        check_keys(expected, found, type(model).__name__)
    except MappingError as e:
        raise MappingError(f"--base-model {base.folder}: {e.message}",
                           hint="pass the base model the LoRA run started from (same architecture and sizes)") from None
    return sorted(found, key=natural_key)


def check_fusable_ties(model: PreTrainedModel, keys: lora.LoraKeys) -> None:
    """A tied pair shares one tensor: folding a delta into one side would silently change the other."""
    changed = {f"{m}.weight" for m in keys.modules} | set(keys.trained)
    for alias, canonical in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        hit = sorted(changed & {alias, canonical})
        if hit and getattr(model.config, "tie_word_embeddings", False):
            other = canonical if hit[0] == alias else alias
            raise ConfigError(f"fusing the LoRA of {hit[0]} would also change {other}, which is tied to it",
                              hint="export with --lora adapter, or untie the embeddings before training")


def _prepare_megatron(layout: Layout, source: Source, config: PretrainedConfig, specs: dict[str, TensorSpec], *,
                      tie_word_embedding: bool, is_value_model: bool, shard_bytes: int,
                      dtype: str | None) -> Prepared:
    """Megatron names and layouts → HF through the architecture tables; heads decided by the checkpoint's keys."""
    groups, updates = megatron_to_hf_groups(specs, config, tie_word_embedding=tie_word_embedding,
                                            value_model=is_value_model, notes=layout.notes)
    config.update(updates)
    plan = make_plan(groups, max_shard_size=shard_bytes, cast=DTYPE_NAMES[dtype] if dtype else None)
    value_model = "num_labels" in updates
    return Prepared(layout, source, config, plan, updates["architectures"][0], value_model,
                    bool(updates.get("tie_word_embeddings", False)) and not value_model)


def dominant_dtype(plan: Plan) -> torch.dtype:
    by_dtype: dict[torch.dtype, int] = {}
    for f in plan.files:
        for t in f.tensors:
            if t.dtype.is_floating_point:
                by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else torch.float32


class GroupCache:
    """Computes each group once, keeping only the latest group's outputs: outputs are ordered, so a group's outputs
    are consumed before the next group's are needed (a group split across two files costs one recomputation)."""

    def __init__(self, plan: Plan, source: Source) -> None:
        self.plan, self.source = plan, source
        self.group_of = plan.group_of()
        self._index: int | None = None
        self._outputs: dict[str, torch.Tensor] = {}

    def run(self, index: int) -> dict[str, torch.Tensor]:
        group = self.plan.groups[index]
        return group.convert({n: self.source.read(n) for n in group.inputs})

    def fetch(self, spec: TensorSpec) -> torch.Tensor:
        index = self.group_of[spec.name]
        if index != self._index:
            self._outputs, self._index = self.run(index), index
        t = self._outputs.pop(spec.name)
        return t.to(spec.dtype) if t.dtype != spec.dtype else t


def write_weights(prep: Prepared, tmp: Path, dist: Dist) -> list[WrittenFile]:
    cache = GroupCache(prep.plan, prep.source)
    written = []
    if dist.is_main:  # checks (tied aliases equal) run once
        for i, g in enumerate(prep.plan.groups):
            if not g.outputs:
                cache.run(i)
    for f in prep.plan.files_for_rank(dist.rank, dist.world_size):
        name = f.name if prep.plan.sharded else "model.safetensors"
        sha = write_file(tmp / name, list(f.tensors), cache.fetch)
        written.append(WrittenFile(name, (tmp / name).stat().st_size, sha))
    return written


def finish_folder(prep: Prepared, tmp: Path, files: list[WrittenFile]) -> None:
    """Rank 0, after every rank wrote its files: check them, then index, config and tokenizer."""
    if prep.lora is not None and not prep.lora.writes_base:
        return  # the adapter alone: a config.json without weights would pass for a broken model
    for f in files:
        header = read_header(tmp / f.name)
        planned = next(p for p in prep.plan.files if p.name == f.name or not prep.plan.sharded)
        if set(header) != {t.name for t in planned.tensors}:
            raise CheckpointError(f"{f.name} was written incompletely", hint="re-run the merge")
    if prep.plan.sharded:
        (tmp / "model.safetensors.index.json").write_text(index_json(prep.plan.weight_map(), prep.plan.total_size))
    prep.config.dtype = dominant_dtype(prep.plan)
    prep.config.save_pretrained(tmp)
    if prep.layout.hf_dir is not None:
        copy_support_files(prep.layout.hf_dir, tmp)


def write_adapter(prep: Prepared, tmp: Path) -> WrittenFile:
    """Rank 0: `lora_adapter/` with PEFT's file names, from the same source and the same streaming writer."""
    assert prep.lora is not None
    folder = tmp / lora.ADAPTER_DIR
    folder.mkdir()
    [planned] = prep.lora.plan.files
    path = folder / "adapter_model.safetensors"
    sha = write_file(path, list(planned.tensors), GroupCache(prep.lora.plan, prep.source).fetch)
    if set(read_header(path)) != {t.name for t in planned.tensors}:
        raise CheckpointError(f"{path.name} was written incompletely", hint="re-run the merge")
    (folder / "adapter_config.json").write_text(json.dumps(prep.lora.config, indent=2, sort_keys=True) + "\n")
    return WrittenFile(f"{lora.ADAPTER_DIR}/{path.name}", path.stat().st_size, sha)


def merge(
    local_dir: Path,
    target_dir: Path,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    **options: Any,
) -> MergeResult:
    """Merge a sharded training checkpoint into a save_pretrained-style folder at `target_dir`, atomically.
    `options` are prepare()'s (backend, dtype, max_shard_size, tying, value model, LoRA...)."""
    dist = Dist.from_env()
    if not dist.is_main:
        log = _silent
    target = Path(target_dir)
    check_target(target, overwrite=overwrite)
    prep = prepare(local_dir, **options)
    for note in prep.layout.notes + (prep.lora.notes if prep.lora else []):
        log(note)
    result = _result(prep, target)
    log(f"{prep.layout.format} {prep.layout.version} checkpoint, {_fmt_parallel(prep.layout.parallel)}: "
        f"{prep.architecture}, {result.num_parameters:,} parameters → {len(prep.plan.files)} file(s), "
        f"{prep.plan.total_size / 1e9:.2f} GB, at most {result.peak_tensor_bytes / 1e6:.0f} MB of tensors in flight")
    if prep.lora:
        log(_lora_line(prep.lora))
    if dry_run:
        result.files = [WrittenFile(f.name if prep.plan.sharded else "model.safetensors", f.nbytes, None)
                        for f in prep.plan.files]
        if prep.lora and prep.lora.mode != "fuse":
            result.files.append(WrittenFile(f"{lora.ADAPTER_DIR}/adapter_model.safetensors", prep.lora.plan.total_size,
                                            None))
        return result
    tmp = fresh_staging(target) if dist.is_main else staging_dir(target)
    try:
        dist.sync()
        error: HubexportError | None = None
        adapter: list[WrittenFile] = []
        try:
            mine = write_weights(prep, tmp, dist)
            if dist.is_main and prep.lora and prep.lora.mode != "fuse":
                adapter.append(write_adapter(prep, tmp))
        except HubexportError as e:
            error, mine = e, []
        except OSError as e:
            error, mine = _write_error(e, target), []
        dist.sync(error)
        result.files = sorted((f for part in dist.gather(mine) for f in part), key=lambda f: f.name)
        if dist.is_main:
            try:
                finish_folder(prep, tmp, result.files)
                publish(tmp, target)
            except OSError as e:
                raise _write_error(e, target) from None
        result.files += adapter
        dist.sync()
    except BaseException:
        if dist.is_main:
            discard(tmp)
        raise
    finally:
        prep.source.close()
    extra = f" + {lora.ADAPTER_DIR}/" if adapter else ""
    log(f"wrote {target} ({len(result.files) - len(adapter)} weight file(s){extra})")
    return result


def _write_error(e: OSError, target: Path) -> TargetError:
    """Disk full, file too large, read-only filesystem...: one line, the target left as it was."""
    where = Path(e.filename).name if e.filename else target
    return TargetError(f"writing {where} for {target} failed: {e.strerror or e}",
                       hint="free space (or quota) on that filesystem, or choose another --target-dir")


def _silent(_: str) -> None:
    pass


def _lora_line(exp: LoraExport) -> str:
    s = exp.settings
    what = {"adapter": f"base model + {lora.ADAPTER_DIR}/", "fuse": "fused into the weights",
            "both": f"fused into the weights + {lora.ADAPTER_DIR}/"}[exp.mode]
    if not exp.writes_base:
        what = f"{lora.ADAPTER_DIR}/ only"
    return (f"LoRA: {len(exp.keys.modules)} module(s), r={s.r}, lora_alpha={exp.config['lora_alpha']} "
            f"(from {s.origin}) → {what}")


def _fmt_parallel(parallel: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in parallel.items()) or "single file"


def _result(prep: Prepared, target: Path) -> MergeResult:
    outputs = [t for f in prep.plan.files for t in f.tensors]
    return MergeResult(
        target_dir=target,
        source_format=prep.layout.format,
        source_version=prep.layout.version,
        parallel=dict(prep.layout.parallel),
        architecture=prep.architecture,
        dtype=str(dominant_dtype(prep.plan if prep.plan.files or not prep.lora else prep.lora.plan)).removeprefix("torch."),
        num_parameters=sum(math.prod(t.shape) for t in outputs),
        tied_embeddings=prep.tied,
        value_model=prep.value_model,
        global_step=prep.layout.global_step,
        peak_tensor_bytes=prep.plan.peak_bytes(prep.source.metas()),
        notes=list(prep.layout.notes) + (prep.lora.notes if prep.lora else []),
        lora=prep.lora.summary() if prep.lora else None,
    )
