"""Orchestration: detect → source → mapping → plan → writer. Rank-aware: under torchrun every rank writes its own
files and rank 0 writes the index, config and tokenizer after a barrier."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig

from hubexport.detect import Layout, detect
from hubexport.dist import Dist
from hubexport.errors import CheckpointError, ConfigError, HubexportError, TargetError
from hubexport.hfdir import copy_support_files, load_config
from hubexport.mapping.hf_native import architecture_for, is_value_checkpoint, meta_model, saved_groups
from hubexport.mapping.mcore import megatron_to_hf_groups
from hubexport.plan import Plan, make_plan, parse_size
from hubexport.sources import Source, TensorSpec
from hubexport.sources.fsdp import FsdpSource
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
) -> Prepared:
    """Detect, open lazily, map and plan: reads headers and pickled metadata only."""
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError:
        raise ConfigError(f"--max-shard-size {max_shard_size!r} is not a size", hint="use e.g. 5GB or 500MB") from None
    layout = detect(Path(local_dir), backend)
    config = load_config(layout.hf_dir, layout.root, trust_remote_code=trust_remote_code)
    source = open_source(layout)
    specs = source.metas()
    if layout.format == "megatron" and layout.version != "mbridge":  # mbridge weights are HF-native already
        return _prepare_megatron(layout, source, config, specs, tie_word_embedding=tie_word_embedding,
                                 is_value_model=is_value_model, shard_bytes=shard_bytes, dtype=dtype)
    value_model = is_value_model or is_value_checkpoint(specs, specs)
    if is_value_model and "score.weight" not in specs:
        raise ConfigError(f"--is-value-model was given but {layout.root} has no score.weight value head",
                          hint="drop --is-value-model for an actor checkpoint")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tie_word_embedding and not tied:
        raise ConfigError(
            f"--tie-word-embedding contradicts {layout.hf_dir / 'config.json'}, which says tie_word_embeddings=false",
            hint="drop the flag: hubexport reads tying from the config and never drops a trained lm_head",
        )
    architecture = architecture_for(config, value_model=value_model)
    if value_model:
        config.num_labels = 1
        tied = False
    model = meta_model(config, architecture, trust_remote_code=trust_remote_code)
    groups = saved_groups(model, specs)
    plan = make_plan(groups, max_shard_size=shard_bytes, cast=DTYPE_NAMES[dtype] if dtype else None)
    config.architectures = [architecture]
    return Prepared(layout, source, config, plan, architecture, value_model, tied)


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


def merge(
    local_dir: Path,
    target_dir: Path,
    *,
    backend: str = "auto",
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    tie_word_embedding: bool = False,
    is_value_model: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> MergeResult:
    """Merge a sharded training checkpoint into a save_pretrained-style folder at `target_dir`, atomically."""
    dist = Dist.from_env()
    if not dist.is_main:
        log = _silent
    target = Path(target_dir)
    check_target(target, overwrite=overwrite)
    prep = prepare(local_dir, backend=backend, dtype=dtype, max_shard_size=max_shard_size,
                   tie_word_embedding=tie_word_embedding, is_value_model=is_value_model,
                   trust_remote_code=trust_remote_code)
    for note in prep.layout.notes:
        log(note)
    result = _result(prep, target)
    log(f"{prep.layout.format} {prep.layout.version} checkpoint, {_fmt_parallel(prep.layout.parallel)}: "
        f"{prep.architecture}, {result.num_parameters:,} parameters → {len(prep.plan.files)} file(s), "
        f"{prep.plan.total_size / 1e9:.2f} GB, at most {result.peak_tensor_bytes / 1e6:.0f} MB of tensors in flight")
    if dry_run:
        result.files = [WrittenFile(f.name if prep.plan.sharded else "model.safetensors", f.nbytes, None)
                        for f in prep.plan.files]
        return result
    tmp = fresh_staging(target) if dist.is_main else staging_dir(target)
    try:
        dist.sync()
        error: HubexportError | None = None
        try:
            mine = write_weights(prep, tmp, dist)
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
        dist.sync()
    except BaseException:
        if dist.is_main:
            discard(tmp)
        raise
    finally:
        prep.source.close()
    log(f"wrote {target} ({len(result.files)} weight file(s))")
    return result


def _write_error(e: OSError, target: Path) -> TargetError:
    """Disk full, file too large, read-only filesystem...: one line, the target left as it was."""
    where = Path(e.filename).name if e.filename else target
    return TargetError(f"writing {where} for {target} failed: {e.strerror or e}",
                       hint="free space (or quota) on that filesystem, or choose another --target-dir")


def _silent(_: str) -> None:
    pass


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
        dtype=str(dominant_dtype(prep.plan)).removeprefix("torch."),
        num_parameters=sum(math.prod(t.shape) for t in outputs),
        tied_embeddings=prep.tied,
        value_model=prep.value_model,
        global_step=prep.layout.global_step,
        peak_tensor_bytes=prep.plan.peak_bytes(prep.source.metas()),
        notes=list(prep.layout.notes),
    )
