"""HF safetensors → megatron-core torch_dist: plan from headers, write each rank's share lazily, optionally re-read
and compare, publish atomically. One code path: a single process is rank 0 of 1; under torchrun every rank writes
its own chunks into the same staging directory."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hubexport.dist import Dist
from hubexport.errors import ConfigError, HubexportError, MappingError
from hubexport.hfdir import load_config
from hubexport.mapping.hf_to_mcore import McorePlan, hf_to_megatron_plan
from hubexport.mapping.mcore import megatron_to_hf_groups
from hubexport.plan import Group
from hubexport.sources.hf import SafetensorsSource
from hubexport.sources.mcore import TorchDistSource
from hubexport.writers.mcore import (
    Chunk,
    assign_ranks,
    extra_state_modules,
    placement,
    process_group,
    save_torch_dist,
)
from hubexport.writers.staging import check_target, discard, fresh_staging, publish, staging_dir


@dataclass
class ToMegatronResult:
    output_path: Path
    architecture: str
    spec: str  # "te" | "local"
    layer_keys: str  # "stacked" | "per-layer"
    num_parameters: int  # of the HF model (megatron's vocabulary padding not counted)
    num_tensors: int  # logical megatron tensors (one layer, one expert) written
    num_keys: int  # stored tensor keys
    padded_vocab: int
    tied_embeddings: bool
    value_model: bool
    dtype: str
    world_size: int
    peak_tensor_bytes: int  # planned upper bound of tensor bytes one rank holds at once
    tested: bool
    notes: list[str] = field(default_factory=list)


def _silent(_: str) -> None:
    pass


def _run_checks(plan: McorePlan, source: SafetensorsSource) -> None:
    for g in plan.groups:
        if not g.outputs:
            g.convert({n: source.read(n) for n in g.inputs})


def _verify(out_dir: Path, plan: McorePlan, source: SafetensorsSource, config, dist: Dist) -> int:
    """Re-read the written checkpoint through the reader and the tables' forward direction; every HF tensor must come
    back bit-exact. Ranks split the work. Returns the number of tensors this rank compared."""
    written = TorchDistSource(out_dir)
    groups, _ = megatron_to_hf_groups(written.metas(), config, value_model=plan.value_model)
    hf = source.metas()
    expected = {n for g in plan.groups if g.outputs for n in g.inputs}
    produced = {o.name for g in groups for o in g.outputs}
    missing = expected - produced
    if missing:
        raise MappingError(f"--test: {len(missing)} HF tensor(s) do not come back from the written checkpoint: "
                           f"{sorted(missing)[:5]}", hint="this is a bug in hubexport; please report it")
    owners = assign_ranks([sum(o.nbytes for o in g.outputs) for g in groups], dist.world_size)
    compared = 0
    for g, owner in zip(groups, owners, strict=True):
        if owner != dist.rank:
            continue
        got = g.convert({n: written.read(n) for n in g.inputs})
        for name, t in got.items():
            if name not in hf:
                if name == "score.bias" and not torch.count_nonzero(t):
                    continue  # verl's critic has no bias: the HF export's zero bias is not in every folder
                raise MappingError(f"--test: the written checkpoint yields {name}, which the HF folder lacks",
                                   hint="this is a bug in hubexport; please report it")
            ref = source.read(name)
            if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
                raise MappingError(f"--test: {name} read back from the checkpoint differs from the HF tensor",
                                   hint="the output was not published; re-run, and report it if it persists")
            compared += 1
    return compared


def _produce(plan: McorePlan, source: SafetensorsSource) -> Callable[[str], torch.Tensor]:
    group_of: dict[str, Group] = {g.outputs[0].name: g for g in plan.groups if g.outputs}

    def produce(name: str) -> torch.Tensor:
        g = group_of[name]
        return g.convert({n: source.read(n) for n in g.inputs})[name]

    return produce


def to_megatron(
    hf_model_path: Path,
    output_path: Path,
    *,
    spec: str = "te",
    test: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    log: Callable[[str], None] = print,
) -> ToMegatronResult:
    """Convert a Hugging Face model folder into a megatron-core torch_dist checkpoint at `output_path`, atomically."""
    dist = Dist.from_env()
    if not dist.is_main:
        log = _silent
    hf_dir, target = Path(hf_model_path), Path(output_path)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir / 'config.json'} does not exist",
                          hint="--hf-model-path must be a Hugging Face model folder (config.json + *.safetensors)")
    check_target(target, overwrite=overwrite)
    config = load_config(hf_dir, hf_dir, trust_remote_code=trust_remote_code)
    source = SafetensorsSource(hf_dir)
    hf = source.metas()
    plan = hf_to_megatron_plan(hf, config, spec=spec)
    where = {"num_layers": plan.stacks, "num_experts": plan.num_experts, "stacked": plan.stacked}
    chunks = [Chunk(o, placement(o.name, **where)) for o in plan.outputs]
    owners = assign_ranks([c.spec.nbytes for c in chunks], dist.world_size)
    extra = [placement(m + "._extra_state", **where) for m in extra_state_modules([c.spec.name for c in chunks], spec)]
    peak = max((sum(hf[n].nbytes for n in g.inputs) + sum(o.nbytes for o in g.outputs) for g in plan.groups),
               default=0)
    dtypes: dict[torch.dtype, int] = {}
    for c in chunks:
        dtypes[c.spec.dtype] = dtypes.get(c.spec.dtype, 0) + c.spec.nbytes
    result = ToMegatronResult(
        output_path=target, architecture=(getattr(config, "architectures", None) or [plan.arch.causal_lm])[0],
        spec=spec, layer_keys="stacked" if plan.stacked else "per-layer",
        num_parameters=sum(math.prod(s.shape) for s in hf.values()), num_tensors=len(chunks),
        num_keys=len({c.where.key for c in chunks}), padded_vocab=plan.padded_vocab, tied_embeddings=plan.tied,
        value_model=plan.value_model, dtype=str(max(dtypes, key=dtypes.__getitem__)).removeprefix("torch."),
        world_size=dist.world_size, peak_tensor_bytes=peak, tested=test, notes=list(plan.notes),
    )
    for note in plan.notes:
        log(note)
    log(f"{result.architecture} → megatron-core torch_dist ({spec} spec, {result.layer_keys} layer keys): "
        f"{result.num_tensors} tensors in {result.num_keys} keys, {dist.world_size} writer(s), "
        f"at most {peak / 1e6:.0f} MB of tensors in flight per writer")
    tmp = fresh_staging(target) if dist.is_main else staging_dir(target)
    try:
        dist.sync()
        error: HubexportError | None = None
        try:
            if dist.is_main:  # consistency checks (a tied alias equals the embedding...) before any write
                _run_checks(plan, source)
        except HubexportError as e:
            error = e
        dist.sync(error)
        with process_group():
            save_torch_dist(tmp, chunks, [o == dist.rank for o in owners], _produce(plan, source),
                            extra_states=extra, spec=spec)
        if test:
            error, n = None, 0
            try:
                n = _verify(tmp, plan, source, config, dist)
            except HubexportError as e:
                error = e
            dist.sync(error)
            total = sum(dist.gather(n))
            log(f"--test: {total} HF tensors read back from the checkpoint, all bit-exact")
        if dist.is_main:
            publish(tmp, target)
        dist.sync()
    except BaseException:
        if dist.is_main:
            discard(tmp)
        raise
    log(f"wrote {target}")
    return result
