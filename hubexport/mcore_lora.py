"""Megatron-core LoRA as verl trains it (Megatron-Bridge's `LoRALinear`: `<linear>.adapter.linear_in.weight` = A
[r, in], `<linear>.adapter.linear_out.weight` = B [out, r], scale alpha/dim) seen under PEFT's names, so the FSDP
LoRA path (lora.py, lora_views.py, lora_export.py) exports and fuses it unchanged.

The megatron → HF mapping of a LoRA comes from the arch tables: the rule that splits the base weight's rows (qkv per
query group, fc1 into gate/up, copy) splits B's rows the same way, and every HF projection shares A, since
(B·A) split by rows = (B split by rows)·A. Pure slicing: bit-exact."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import torch

from hubexport.core import Group, Tensors, TensorSpec
from hubexport.errors import MappingError
from hubexport.lora import ADAPTER, PEFT_PREFIX
from hubexport.mapping.archs import arch_for
from hubexport.mapping.mcore_to_hf import dims_from_config, megatron_to_hf_groups
from hubexport.mapping.registry import OPS, Dims, expand, plan_op
from hubexport.sources import Source

ADAPTER_RE = re.compile(r"^(?P<module>.+)\.adapter\.(?P<part>linear_in|linear_out)\.weight$")
ROW_OPS = ("copy", "qkv", "gate_up")  # ops that only split rows: valid on B as on W


def is_mcore_lora(names: Iterable[str]) -> bool:
    return any(".adapter." in n for n in names)


def split_adapter_keys(metas: dict[str, TensorSpec]) -> tuple[dict[str, TensorSpec], dict[str, tuple[str, str]]]:
    """Base tensors, and each adapted linear (e.g. `decoder.layers.0.self_attention.linear_qkv`) → its (A, B) keys."""
    base: dict[str, TensorSpec] = {}
    parts: dict[str, dict[str, str]] = {}
    for name, spec in metas.items():
        m = ADAPTER_RE.match(name)
        if m:
            parts.setdefault(m.group("module"), {})[m.group("part")] = name
        elif ".adapter." in name:
            raise MappingError(f"{name} is a Megatron adapter tensor hubexport does not know",
                               hint="only LoRA (adapter.linear_in / adapter.linear_out weights) can be exported")
        else:
            base[name] = spec
    modules = {}
    for module, found in parts.items():
        if len(found) != 2:
            raise MappingError(f"Megatron LoRA on {module} has only {next(iter(found.values()))} in the checkpoint",
                               hint="the checkpoint is incomplete; re-copy the whole dist_ckpt/ folder")
        modules[module] = (found["linear_in"], found["linear_out"])
    return base, modules


def _to_peft(op: str, dims: Dims, a_key: str, b_key: str, a_names: tuple[str, ...], b_names: tuple[str, ...],
             tensors: Tensors) -> Tensors:
    """Pure: A under every HF projection's lora_A name, B's rows split by the base weight's op."""
    a = tensors[a_key]
    bs = OPS[op].to_hf((tensors[b_key],), dims)
    out = {n: a for n in a_names}
    out.update({n: b.contiguous() for n, b in zip(b_names, bs, strict=True)})
    return out


def peft_groups(modules: dict[str, tuple[str, str]], metas: dict[str, TensorSpec], config) -> list[Group]:
    """Groups writing each Megatron LoRA as PEFT's per-projection `lora_A`/`lora_B` (adapter name `default`)."""
    arch = arch_for(config)
    dims = dims_from_config(config)
    bound = {b.mcore[0]: b for b in expand(arch, config, {f"{m}.weight" for m in modules}).bindings if len(b.mcore) == 1}
    groups = []
    for module, (a_key, b_key) in sorted(modules.items()):
        b = bound.get(f"{module}.weight")
        if b is None or b.op not in ROW_OPS:
            raise MappingError(f"LoRA on {module} has no Hugging Face {arch.name} mapping hubexport can apply to it",
                               hint="only LoRA on decoder linears (linear_qkv, linear_proj, linear_fc1, linear_fc2, "
                                    "experts) can be exported")
        hf = [n.removesuffix(".weight") for n in b.hf]
        a_names = tuple(f"{PEFT_PREFIX}{m}.lora_A.{ADAPTER}.weight" for m in hf)
        b_names = tuple(f"{PEFT_PREFIX}{m}.lora_B.{ADAPTER}.weight" for m in hf)
        a, bm = metas[a_key], metas[b_key]
        try:
            b_shapes, _ = plan_op(b.op, dims, [bm.shape])
        except (RuntimeError, ValueError) as e:
            raise MappingError(f"{b_key} {list(bm.shape)} does not fit the config for {b.op}: {e}",
                               hint="config.json (heads, head_dim) does not match the checkpoint") from e
        outputs = tuple(TensorSpec(n, a.shape, a.dtype) for n in a_names)
        outputs += tuple(TensorSpec(n, s, bm.dtype) for n, s in zip(b_names, b_shapes, strict=True))
        groups.append(Group((a_key, b_key), outputs, functools.partial(_to_peft, b.op, dims, a_key, b_key, a_names,
                                                                       b_names)))
    return groups


class MappedSource:
    """A Source seen through plan Groups: its tensors are the groups' outputs; a read runs the group that makes it,
    keeping that group's other outputs until they are read (q, k, v of one linear_qkv cost one read)."""

    def __init__(self, source: Source, groups: list[Group]) -> None:
        self.source = source
        self._group = {o.name: g for g in groups for o in g.outputs}
        self._specs = {o.name: o for g in groups for o in g.outputs}
        self._pending: dict[str, torch.Tensor] = {}

    def metas(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._pending:
            g = self._group[name]
            self._pending = g.convert({n: self.source.read(n) for n in g.inputs})
        return self._pending.pop(name)

    def close(self) -> None:
        self.source.close()


def peft_view(source: Source, config, *, tie_word_embedding: bool, value_model: bool,
              notes: list[str]) -> tuple[MappedSource, dict]:
    """The checkpoint as a PEFT-wrapped HF model would save it: base weights under their HF names (through the arch
    table, when the checkpoint holds them), LoRA under PEFT's names; plus the config updates of the base mapping."""
    metas = source.metas()
    base, modules = split_adapter_keys(metas)
    groups, updates = [], {}
    if base:
        groups, updates = megatron_to_hf_groups(base, config, tie_word_embedding=tie_word_embedding,
                                                value_model=value_model, notes=notes)
    return MappedSource(source, [*groups, *peft_groups(modules, metas, config)]), updates
