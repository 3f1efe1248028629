"""Hugging Face tensors → megatron-core tensors: the architecture tables of `mapping/archs` read in reverse, plus the
heads (untied lm_head, tied embedding, critic value head). Strict both ways, as the forward direction is.

Outputs carry megatron's in-memory names with global numbers (`decoder.layers.<i>.…`,
`…mlp.experts.local_experts.<j>.…`): the same logical names `sources/mcore.py` presents, so the storage layout
(stacked layer and expert axes) is the writer's business only.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace

import torch

from hubexport.core import Group, TensorSpec
from hubexport.errors import MappingError
from hubexport.mapping.archnames import model_class
from hubexport.mapping.archs import arch_for
from hubexport.mapping.mcore_to_hf import EMBED, OUTPUT, dims_from_config
from hubexport.mapping.ops import padded_vocab_size, same_bytes
from hubexport.mapping.registry import (
    HF_LAYER,
    Arch,
    Binding,
    apply_to_mcore,
    expand_to_mcore,
    hf_mtp_layers,
    plan_op,
)

SPECS = ("te", "local")
HF_HEAD, HF_SCORE = "lm_head.weight", "score.weight"
# Buffers some HF checkpoints carry that no megatron module holds (recomputed from the config).
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
SHOW = 5


@dataclass
class McorePlan:
    """Everything the writer needs, known before the first tensor byte is read."""

    arch: Arch
    groups: list[Group]  # each: HF inputs → megatron outputs (one, or a fused tensor's experts; a check has none)
    num_layers: int
    num_experts: int
    stacked: bool  # layers stacked under one key with a leading layer axis (else `decoder.layers.<i>.` keys)
    stacks: dict[str, int]  # stacked-key prefix → layer count (the language model, a vision tower's blocks)
    padded_vocab: int
    tied: bool
    value_model: bool
    notes: list[str] = field(default_factory=list)
    architecture: str = ""  # the transformers class the HF folder holds (archnames.model_class)
    experts_transposed: bool = False  # the folder's fused expert tensors are [E, in, out] (Dims.experts_transposed)
    mtp_layers: int = 0  # MTP blocks written (`mtp.layers.<m>.`): the loading model's mtp_num_layers

    @property
    def outputs(self) -> list[TensorSpec]:
        return [o for g in self.groups for o in g.outputs]


def _first(names, n: int = SHOW) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


TIE_HINT = "fix tie_word_embeddings in config.json: megatron would keep only one of them"
MTP_HINT = "megatron keeps one embedding and one output head: convert a checkpoint whose MTP copies are the originals"


@dataclass(frozen=True)
class EqualCheck:
    """A group with no outputs: HF tensor `b` must hold `a`'s bytes (megatron keeps one of them)."""

    a: str
    b: str
    what: str
    hint: str

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict:
        if not same_bytes(tensors[self.a], tensors[self.b]):
            raise MappingError(f"{self.b} differs from {self.a} although {self.what}", hint=self.hint)
        return {}


@dataclass(frozen=True)
class ZeroCheck:
    """A group with no outputs: verl's value head has no bias, so the HF score bias must be zero."""

    name: str

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict:
        if torch.count_nonzero(tensors[self.name]):
            raise MappingError(f"{self.name} is not zero: verl's value head has no bias, so it would be lost",
                               hint="only critics trained with verl (a bias-free [1, hidden] head) convert exactly")
        return {}


def _heads(hf: dict[str, TensorSpec], config, hidden: int) -> tuple[list[Binding], list[Group], bool, bool]:
    """(head bindings, check groups, tied, value model), decided by the folder's tensors and config."""
    arch = arch_for(config)
    output, hf_embed = arch.lm_prefix + OUTPUT, arch.hf_embed
    if HF_SCORE in hf and arch.lm_prefix:
        raise MappingError(f"{HF_SCORE}: critics of {arch.name} models are not supported",
                           hint="convert the actor (the *ForConditionalGeneration model)")
    if HF_SCORE in hf:  # *ForTokenClassification with one label: verl's critic
        if hf[HF_SCORE].shape != (1, hidden):
            raise MappingError(f"{HF_SCORE} has shape {list(hf[HF_SCORE].shape)}, not a [1, {hidden}] value head",
                               hint="only single-label token-classification models (critics) convert")
        checks = [Group(("score.bias",), (), ZeroCheck("score.bias"))] if "score.bias" in hf else []
        return [Binding((output,), (HF_SCORE,), "copy")], checks, False, True
    if bool(getattr(config, "tie_word_embeddings", False)):
        checks = []
        if HF_HEAD in hf:  # some writers keep the alias; megatron stores the embedding once
            checks.append(Group((hf_embed, HF_HEAD), (), EqualCheck(
                hf_embed, HF_HEAD, "config.json says tie_word_embeddings=true", TIE_HINT)))
        return [], checks, True, False
    if HF_HEAD not in hf:
        raise MappingError(f"{HF_HEAD} is missing and config.json says tie_word_embeddings=false",
                           hint="the HF folder is incomplete, or its config should say tie_word_embeddings=true")
    return [Binding((output,), (HF_HEAD,), "vocab")], [], False, False


def _mtp_copies(hf: dict[str, TensorSpec], arch: Arch, n_layers: int, mtp: int, tied: bool) -> list[Group]:
    """DeepSeek-V3's HF MTP layers carry copies of the shared embedding and output head; megatron's MTP block uses
    the model's own, so each copy must equal its original (the merge writes them back from those)."""
    head = arch.hf_embed if tied else HF_HEAD
    checks = []
    for m in range(mtp):
        layer = f"model.layers.{n_layers + m}."
        for copy, original in ((layer + "embed_tokens.weight", arch.hf_embed), (layer + "shared_head.head.weight", head)):
            if copy not in hf:
                raise MappingError(f"{copy} is missing from MTP layer {n_layers + m}",
                                   hint="the HF folder is incomplete (DeepSeek-V3 stores both copies in each MTP layer)")
            checks.append(Group((original, copy), (), EqualCheck(
                original, copy, "megatron's MTP block shares the model's embedding and output head", MTP_HINT)))
    return checks


def _check_consumed(unused: set[str], arch_name: str, n_layers: int) -> None:
    if not unused:
        return
    if any((m := HF_LAYER.match(n)) and int(m.group(1)) >= n_layers for n in unused):
        hint = (f"layers beyond {n_layers - 1} are DeepSeek-V3's multi-token-prediction blocks: config.json's "
                "num_nextn_predict_layers must count them")
    else:
        hint = ("config.json and the weights disagree (another architecture or layer count?), or the model has "
                "parts hubexport does not convert yet (vision tower...)")
    raise MappingError(f"{len(unused)} HF tensor(s) have no {arch_name} mapping: {_first(unused)}", hint=hint)


def hf_to_megatron_plan(hf: dict[str, TensorSpec], config, *, spec: str = "te",
                        vocab_divisible_by: int = 128) -> McorePlan:
    """Plan groups turning HF tensors into megatron tensors. Every HF tensor must be consumed and every tensor the
    config implies must be present; shapes are checked on meta tensors before any read."""
    if spec not in SPECS:
        raise MappingError(f"unknown layer spec {spec!r}", hint=f"use one of {', '.join(SPECS)}")
    arch = arch_for(config)
    text = arch.text_config(config)
    base = dims_from_config(config)
    # megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (× TP at load; the embedding and
    # output layer allow a shape mismatch there, so one padding serves every TP)
    padded = padded_vocab_size(text.vocab_size, vocab_divisible_by)
    transposed = arch.experts_transposed({n: t.shape for n, t in hf.items()}, config)
    dims = replace(base, padded_vocab=padded, experts_transposed=transposed)
    present = set(hf)
    mtp = hf_mtp_layers(arch, config, present)
    exp = expand_to_mcore(arch, config, present, spec=spec, mtp_layers=mtp)
    if exp.missing:
        raise MappingError(
            f"{len(exp.missing)} tensor(s) the {arch.name} config implies are not in the HF folder: "
            f"{_first(exp.missing)}",
            hint="check that config.json (num_hidden_layers, experts, biases, q_lora_rank...) belongs to these "
                 "weights",
        )
    heads, checks, tied, value = _heads(hf, config, text.hidden_size)
    checks += _mtp_copies(hf, arch, len(arch.layer_kinds(text)), mtp, tied)
    bindings = exp.bindings + heads
    used = {n for b in bindings for n in b.hf} | {n for g in checks for n in g.inputs}
    architecture, notes = model_class(config, value_model=value)
    ignored = sorted(n for n in present - used if IGNORED.match(n))
    if ignored:
        notes.append(f"skipped {len(ignored)} buffer(s) megatron recomputes: {_first(ignored)}")
    n_layers = len(arch.layer_kinds(text))
    _check_consumed(present - used - set(ignored), arch.name, n_layers)
    if mtp:
        layers = f"layer {n_layers}" if mtp == 1 else f"layers {n_layers}..{n_layers + mtp - 1}"
        notes.append(f"HF {layers}: {mtp} multi-token-prediction block(s), written as mtp.layers.*; "
                     f"load with mtp_num_layers={mtp}")
    groups = []
    for b in bindings:
        try:
            shapes, rows = plan_op(b.op, dims, [hf[n].shape for n in b.hf], to_mcore=True)
        except (RuntimeError, ValueError) as e:
            raise MappingError(
                f"{', '.join(b.hf)} {[list(hf[n].shape) for n in b.hf]} do not fit the config for {b.op}: {e}",
                hint="config.json (heads, head_dim, vocab_size) does not match the weights",
            ) from e
        dtypes = {hf[n].dtype for n in b.hf}
        if len(dtypes) > 1:
            raise MappingError(f"{', '.join(b.hf)} have different dtypes {sorted(map(str, dtypes))}",
                               hint="megatron stores them as one tensor; re-save the HF model in one dtype")
        dtype = dtypes.pop()
        outputs = tuple(TensorSpec(n, s, dtype) for n, s in zip(b.mcore, shapes, strict=True))
        groups.append(Group(inputs=b.hf, outputs=outputs,
                            convert=functools.partial(apply_to_mcore, b.op, dims, b.hf, b.mcore),
                            rows=rows))
    assert arch.lm_prefix + EMBED in {g.outputs[0].name for g in groups}, "every architecture maps the embedding"
    return McorePlan(arch, groups + checks, n_layers, arch.num_experts(text), arch.stacked(config),
                     arch.layer_stacks(config), padded, tied, value, notes, architecture, transposed, mtp)
