"""Bidirectional name rules between megatron-core and Hugging Face, with `{L}` (layer) and `{E}` (expert) wildcards,
and their expansion against a config with coverage checks.

A Rule says: these mcore tensors ↔ these HF tensors, through this op. The same row serves both directions
(`to_hf` / `to_mcore`). `mcore` is the Transformer-Engine spec's spelling, `local` the local spec's where it differs;
`alt` lists further spellings a reader accepts (per-layer checkpoints of unfused specs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from hubexport.mapping import ops


@dataclass(frozen=True)
class Dims:
    """The plain numbers ops need; derived from the HF config."""

    num_query_groups: int
    heads_per_group: int
    head_dim: int
    vocab_size: int
    padded_vocab: int | None = None  # only the HF → mcore direction needs it
    vision_heads: int = 0  # a vision tower's attention heads (no GQA), for its fused qkv
    experts_transposed: bool = False  # fused HF expert tensors stored [E, in, out] (published Qwen3-VL-MoE)


@dataclass(frozen=True)
class Op:
    to_hf: Callable[[tuple[torch.Tensor, ...], Dims], tuple[torch.Tensor, ...]]
    to_mcore: Callable[[tuple[torch.Tensor, ...], Dims], tuple[torch.Tensor, ...]]


OPS: dict[str, Op] = {
    "copy": Op(lambda xs, d: ops.identity(*xs), lambda xs, d: ops.identity(*xs)),
    "qkv": Op(
        lambda xs, d: ops.qkv_to_hf(xs[0], num_query_groups=d.num_query_groups, heads_per_group=d.heads_per_group,
                                    head_dim=d.head_dim),
        lambda xs, d: ops.qkv_to_mcore(*xs, num_query_groups=d.num_query_groups),
    ),
    "vision_qkv": Op(lambda xs, d: ops.fused_qkv_to_hf(xs[0], num_heads=d.vision_heads),
                     lambda xs, d: ops.fused_qkv_to_mcore(xs[0], num_heads=d.vision_heads)),
    "gate_up": Op(lambda xs, d: ops.gate_up_to_hf(xs[0]), lambda xs, d: ops.gate_up_to_mcore(*xs)),
    "experts": Op(lambda xs, d: ops.experts_to_hf(*xs, transposed=d.experts_transposed),
                  lambda xs, d: ops.experts_to_mcore(xs[0], transposed=d.experts_transposed)),
    "vocab": Op(
        lambda xs, d: ops.trim_vocab(xs[0], vocab_size=d.vocab_size),
        lambda xs, d: ops.pad_vocab(xs[0], padded_size=d.padded_vocab or xs[0].shape[0]),
    ),
}


@dataclass(frozen=True)
class Rule:
    mcore: tuple[str, ...]
    hf: tuple[str, ...]
    op: str = "copy"
    when: str | None = None  # layer kind ("dense" | "moe"); None: every layer
    if_config: str | None = None  # config attribute that must be truthy ("!attr": falsy)
    alt: tuple[tuple[str, ...], ...] = ()
    local: tuple[str, ...] | None = None  # the local spec's spelling, when it differs from the TE spec's

    def spelled(self, spec: str) -> tuple[str, ...]:
        return self.local if spec == "local" and self.local else self.mcore

    @property
    def per_layer(self) -> bool:
        return any("{L}" in n for n in (*self.mcore, *self.hf))

    @property
    def per_expert(self) -> bool:
        return any("{E}" in n for n in (*self.mcore, *self.hf))

    @property
    def fuses_experts(self) -> bool:
        """One HF tensor holds all of a layer's experts (transformers 5's fused `mlp.experts.gate_up_proj`): `{E}`
        on the mcore side only, bound to every expert at once."""
        return any("{E}" in n for n in self.mcore) and not any("{E}" in n for n in self.hf)


def R(mcore: str | tuple[str, ...], hf: str | tuple[str, ...], op: str = "copy", *, when: str | None = None,
      if_config: str | None = None, alt: Iterable[str | tuple[str, ...]] = (),
      local: str | tuple[str, ...] | None = None) -> Rule:
    """Table-row constructor: a single name may be given as a plain string."""
    def tup(x: str | tuple[str, ...]) -> tuple[str, ...]:
        return (x,) if isinstance(x, str) else tuple(x)

    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    return Rule(tup(mcore), tup(hf), op, when, if_config, tuple(tup(a) for a in alt),
                tup(local) if local is not None else None)


@dataclass(frozen=True)
class Arch:
    """One architecture: its rules and the config facts that decide which rules apply to which layer."""

    name: str
    model_types: tuple[str, ...]
    causal_lm: str  # HF class for the LM export; the critic swaps ForCausalLM for ForTokenClassification
    rules: tuple[Rule, ...]
    layer_kinds: Callable[[object], list[str]]  # config → "dense" | "moe" per layer
    num_experts: Callable[[object], int] = lambda cfg: 0
    mtp_rules: tuple[Rule, ...] = ()  # rules of a multi-token-prediction block, `{M}` = MTP index
    mtp_kind: str = "dense"
    # megatron stores layers per key (`decoder.layers.<i>.…`) instead of stacked when its config makes them
    # non-homogeneous (moe_layer_freq a list, formats doc §3.3); default: when the layer kinds differ
    per_layer_keys: Callable[[object], bool] | None = None
    # vision-language models: the language model's config, its mcore prefix and HF embedding name, the counts of
    # the other wildcards (`{V}` vision block, `{D}` deepstack merger) and the other stacked layer blocks
    text_config: Callable[[object], object] = lambda cfg: cfg
    lm_prefix: str = ""
    hf_embed: str = "model.embed_tokens.weight"
    counts: Callable[[object], dict[str, int]] = lambda cfg: {}
    other_stacks: Callable[[object], dict[str, int]] = lambda cfg: {}
    # HF → mcore: whether an HF folder holds its fused expert tensors [E, in, out] (Dims.experts_transposed),
    # decided from its tensor shapes (name → shape) and the config
    experts_transposed: Callable[[dict[str, tuple[int, ...]], object], bool] = lambda shapes, cfg: False

    def layer_stacks(self, cfg: object) -> dict[str, int]:
        """Stacked-key prefix → its layer count (the writer's leading axis), language model first."""
        n = len(self.layer_kinds(self.text_config(cfg)))
        return {f"{self.lm_prefix}decoder.layers": n, **self.other_stacks(cfg)}

    def stacked(self, cfg: object) -> bool:
        text = self.text_config(cfg)
        if self.per_layer_keys is not None:
            return not self.per_layer_keys(text)
        return len(set(self.layer_kinds(text))) <= 1


@dataclass(frozen=True)
class Binding:
    """A rule made concrete: actual mcore names (the spelling found) ↔ HF names."""

    mcore: tuple[str, ...]
    hf: tuple[str, ...]
    op: str


@dataclass
class Expansion:
    bindings: list[Binding] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # expected mcore tensors that are absent


def config_flag(cfg: object, flag: str | None) -> bool:
    if flag is None:
        return True
    neg = flag.startswith("!")
    value = bool(getattr(cfg, flag.lstrip("!"), None))
    return not value if neg else value


WILDCARD = re.compile(r"\{([A-Z])\}")


def index_subs(rule: Rule, counts: dict[str, int]) -> list[dict[str, str]]:
    """Every substitution of a rule's wildcards other than layer, expert and MTP (`{V}`, `{D}`...)."""
    subs: list[dict[str, str]] = [{}]
    for w in sorted({w for n in (*rule.mcore, *rule.hf) for w in WILDCARD.findall(n)} - {"L", "E", "M"}):
        subs = [{**s, w: str(i)} for s in subs for i in range(counts[w])]
    return subs


def _fill(names: tuple[str, ...], subs: dict[str, str]) -> tuple[str, ...]:
    out = []
    for n in names:
        for k, v in subs.items():
            n = n.replace("{" + k + "}", v)
        out.append(n)
    return tuple(out)


def _expert_subs(rule: Rule, n_exp: int) -> list[dict[str, str]]:
    """One substitution per expert, or a single one for rules without experts and for fused rules."""
    return [{"E": str(e)} for e in range(n_exp)] if rule.per_expert and not rule.fuses_experts else [{}]


def _all_experts(rule: Rule, names: tuple[str, ...], n_exp: int) -> tuple[str, ...]:
    """A fused rule's mcore side: every expert's tensor, in expert order; other rules' names unchanged."""
    if not rule.fuses_experts:
        return names
    return tuple(n.replace("{E}", str(e)) for n in names for e in range(n_exp))


def _bind(rule: Rule, subs: dict[str, str], present: set[str], exp: Expansion,
          mcore_prefix: tuple[str, str] | None = None, n_exp: int = 0) -> None:
    spellings = [_all_experts(rule, s, n_exp) for s in [rule.mcore, *([rule.local] if rule.local else []), *rule.alt]]
    if mcore_prefix:  # MTP: the same layer rules under another mcore prefix
        spellings = [tuple(n.replace(*mcore_prefix) for n in s) for s in spellings]
    concrete = [_fill(s, subs) for s in spellings]
    for names in concrete:
        if all(n in present for n in names):
            exp.bindings.append(Binding(names, _fill(rule.hf, subs), rule.op))
            return
    exp.missing.extend(n for n in concrete[0] if n not in present)


def expand(arch: Arch, cfg: object, present: set[str]) -> Expansion:
    """Every rule the config implies, bound to the checkpoint's spelling; absent tensors are collected, not raised."""
    exp = Expansion()
    text, counts = arch.text_config(cfg), arch.counts(cfg)
    kinds = arch.layer_kinds(text)
    n_exp = arch.num_experts(text)
    for rule in arch.rules:
        if not config_flag(text, rule.if_config):
            continue
        if not rule.per_layer:
            for subs in index_subs(rule, counts):
                _bind(rule, subs, present, exp)
            continue
        for i, kind in enumerate(kinds):
            if rule.when not in (None, kind):
                continue
            for e in _expert_subs(rule, n_exp):
                _bind(rule, {"L": str(i), **e}, present, exp, n_exp=n_exp)
    mtp = sorted({int(m.group(1)) for n in present if (m := re.match(r"mtp\.layers\.(\d+)\.", n))})
    for rule, subs, prefix in _mtp_rules(arch, text, mtp, n_exp):
        _bind(rule, subs, present, exp, mcore_prefix=prefix, n_exp=n_exp)
    return exp


HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def hf_mtp_layers(arch: Arch, cfg: object, present: set[str]) -> int:
    """How many MTP blocks an HF folder holds: DeepSeek-V3 ships `num_nextn_predict_layers` of them as layers
    L..L+k-1 (`model.layers.61.*`); a folder save_pretrained wrote has none (transformers does not load them)."""
    text = arch.text_config(cfg)
    n = len(arch.layer_kinds(text))
    if not arch.mtp_rules or not any((m := HF_LAYER.match(x)) and int(m.group(1)) >= n for x in present):
        return 0
    return int(getattr(text, "num_nextn_predict_layers", 0) or 0)


def _mtp_rules(arch: Arch, text: object, blocks: Iterable[int],
               n_exp: int) -> Iterator[tuple[Rule, dict[str, str], tuple[str, str] | None]]:
    """(rule, substitution, mcore prefix swap) for every tensor of MTP blocks `blocks`: block m is HF layer L + m
    (DeepSeek-V3 layout): its own rows (`{M}`), then a decoder layer of kind `mtp_kind` under
    `mtp.layers.<m>.transformer_layer.`."""
    n_layers = len(arch.layer_kinds(text))
    for m in blocks:
        hf_layer = str(n_layers + m)
        for rule in arch.mtp_rules:
            if config_flag(text, rule.if_config):
                yield rule, {"M": str(m), "L": hf_layer}, None
        for rule in arch.rules:
            if not rule.per_layer or rule.when not in (None, arch.mtp_kind) or not config_flag(text, rule.if_config):
                continue
            for e in _expert_subs(rule, n_exp):
                yield rule, {"L": hf_layer, **e}, ("decoder.layers.{L}.", f"mtp.layers.{m}.transformer_layer.")


def expand_to_mcore(arch: Arch, cfg: object, present: set[str], *, spec: str = "te", mtp_layers: int = 0) -> Expansion:
    """The same rules read the other way: every rule the config implies, bound to the HF names found and to the
    spec's mcore spelling; `missing` lists the HF tensors the config implies but the folder lacks. `mtp_layers`:
    the MTP blocks to bind (hf_mtp_layers)."""
    exp = Expansion()
    text, counts = arch.text_config(cfg), arch.counts(cfg)
    kinds = arch.layer_kinds(text)
    n_exp = arch.num_experts(text)

    def bind(rule: Rule, subs: dict[str, str], prefix: tuple[str, str] | None = None) -> None:
        hf = _fill(rule.hf, subs)
        absent = [n for n in hf if n not in present]
        if absent:
            exp.missing.extend(absent)
            return
        mcore = _all_experts(rule, rule.spelled(spec), n_exp)
        if prefix:
            mcore = tuple(n.replace(*prefix) for n in mcore)
        exp.bindings.append(Binding(_fill(mcore, subs), hf, rule.op))

    for rule in arch.rules:
        if not config_flag(text, rule.if_config):
            continue
        if rule.per_layer:
            all_subs = [{"L": str(i), **e} for i, kind in enumerate(kinds) if rule.when in (None, kind)
                        for e in _expert_subs(rule, n_exp)]
        else:
            all_subs = index_subs(rule, counts)
        for subs in all_subs:
            bind(rule, subs)
    for rule, subs, prefix in _mtp_rules(arch, text, range(mtp_layers), n_exp):
        bind(rule, subs, prefix)
    return exp


def apply_to_hf(op: str, dims: Dims, inputs: tuple[str, ...], outputs: tuple[str, ...],
                tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pure: the op on the named inputs, results named; contiguous so writers can take raw bytes."""
    results = OPS[op].to_hf(tuple(tensors[n] for n in inputs), dims)
    return {name: t.contiguous() for name, t in zip(outputs, results, strict=True)}


def apply_to_mcore(op: str, dims: Dims, hf_names: tuple[str, ...], mcore_names: tuple[str, ...],
                   tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    results = OPS[op].to_mcore(tuple(tensors[n] for n in hf_names), dims)
    return {name: t.contiguous() for name, t in zip(mcore_names, results, strict=True)}


# The ops whose every output is whole rows (dim-0 slices) of their one input, concatenated: bytes the writer can copy.
ROW_OPS = frozenset({"copy", "qkv", "vision_qkv", "gate_up", "vocab"})
Rows = tuple[tuple[tuple[int, int], ...], ...]  # per output, its (start, stop) ranges of input rows


def _ranges(rows: list[int]) -> tuple[tuple[int, int], ...]:
    """Row numbers in order as (start, stop) ranges of consecutive rows."""
    ranges: list[list[int]] = []
    for r in rows:
        if ranges and ranges[-1][1] == r:
            ranges[-1][1] += 1
        else:
            ranges.append([r, r + 1])
    return tuple((a, b) for a, b in ranges)


def row_plan(op: str, dims: Dims, shape: tuple[int, ...]) -> Rows | None:
    """For a ROW_OPS op on one input of `shape`: each output's input rows as (start, stop) ranges, found by running
    the op itself on the row numbers (so the plan cannot drift from the op); None for any other op."""
    if op not in ROW_OPS or not shape:
        return None
    index = torch.arange(shape[0]).reshape(shape[0], *([1] * (len(shape) - 1)))
    return tuple(_ranges(out.reshape(-1).tolist()) for out in OPS[op].to_hf((index,), dims))


def row_plan_to_mcore(op: str, dims: Dims, shapes: list[tuple[int, ...]]) -> Rows | None:
    """The HF → megatron direction of `row_plan`: each output's rows as (start, stop) ranges of the inputs' rows
    back to back, where rows from the inputs' total on are zeros (a padded vocabulary's new rows, numbered in the
    order they appear). None unless every input has the same row width (rows of different widths do not join)."""
    if op not in ROW_OPS or not shapes or any(not s or s[1:] != shapes[0][1:] for s in shapes):
        return None
    total, base, index = sum(s[0] for s in shapes), 1, []
    for s in shapes:  # 1-based, so that the zeros the op fills in are told apart from row 0
        index.append(torch.arange(base, base + s[0]).reshape(s[0], *([1] * (len(s) - 1))))
        base += s[0]
    plans = []
    for out in OPS[op].to_mcore(tuple(index), dims):
        rows, zeros = [], total
        for r in out.reshape(-1).tolist():
            rows.append(r - 1 if r else zeros)
            zeros += not r
        plans.append(_ranges(rows))
    return tuple(plans)


def plan_op(op: str, dims: Dims, shapes: list[tuple[int, ...]], *,
            to_mcore: bool = False) -> tuple[list[tuple[int, ...]], Rows | None]:
    """The op's output shapes, and its row plan when it is a row gather, without bytes: shape errors surface before
    any read. A row gather's shapes come from its plan (the op run on row numbers); any other op runs on meta tensors
    (whose Python kernels import torch._dynamo, 1.5 s of start-up, so row gathers avoid them)."""
    one = row_plan(op, dims, shapes[0]) if len(shapes) == 1 and not to_mcore else None
    rows = row_plan_to_mcore(op, dims, shapes) if to_mcore else one
    if rows is not None:
        return [(sum(b - a for a, b in ranges), *shapes[0][1:]) for ranges in rows], rows
    metas = tuple(torch.empty(s, device="meta") for s in shapes)
    fn = OPS[op].to_mcore if to_mcore else OPS[op].to_hf
    return [tuple(t.shape) for t in fn(metas, dims)], None
