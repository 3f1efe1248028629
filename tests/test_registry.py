"""The mapping registry, table-driven: each row is an input (config, tensor names present) and the bindings and
missing names it must give. A toy table exercises the mechanics (wildcards, `when`, `if_config`, `alt`, `local`,
MTP); the real llama table checks the coverage errors both directions raise."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import transformers

from hubexport.core import FileSlices, TensorSpec
from hubexport.errors import MappingError
from hubexport.mapping.hf_to_mcore import hf_to_megatron_plan
from hubexport.mapping.mcore_to_hf import megatron_to_hf_groups
from hubexport.mapping.registry import (
    OPS,
    ROW_OPS,
    Arch,
    Dims,
    R,
    config_flag,
    expand,
    expand_to_mcore,
    row_plan,
    row_plan_to_mcore,
)

M, H = "decoder.layers.{L}.", "model.layers.{L}."
TOY = Arch(
    name="toy",
    model_types=("toy",),
    causal_lm="ToyForCausalLM",
    rules=(
        R("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab"),
        R(M + "norm.weight", H + "norm.weight", alt=(M + "input_layernorm.weight",)),
        R(M + "qkv.weight", (H + "q.weight", H + "k.weight", H + "v.weight"), "qkv"),
        R(M + "qkv.bias", (H + "q.bias", H + "k.bias", H + "v.bias"), "qkv", if_config="bias"),
        R(M + "fc1.weight", (H + "gate.weight", H + "up.weight"), "gate_up", when="dense"),
        R(M + "pre_mlp_layernorm.weight", H + "post_norm.weight", when="moe", local=M + "fc1.layer_norm_weight"),
        R(M + "experts.{E}.fc2.weight", H + "experts.{E}.down.weight", when="moe"),
        R(M + "experts.{E}.fc1.weight", H + "experts.gate_up", "experts", when="moe"),  # fused: {E} on mcore only
    ),
    layer_kinds=lambda cfg: list(cfg.kinds),
    num_experts=lambda cfg: cfg.experts,
    mtp_rules=(R("mtp.layers.{M}.enorm.weight", H + "enorm.weight"),),
)


def cfg(*kinds: str, experts: int = 0, bias: bool = False) -> SimpleNamespace:
    return SimpleNamespace(kinds=kinds, experts=experts, bias=bias)


EMB = (("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), "vocab")
QKV0 = (("decoder.layers.0.qkv.weight",), ("model.layers.0.q.weight", "model.layers.0.k.weight",
                                            "model.layers.0.v.weight"), "qkv")
NORM0 = (("decoder.layers.0.norm.weight",), ("model.layers.0.norm.weight",), "copy")
FC1_0 = (("decoder.layers.0.fc1.weight",), ("model.layers.0.gate.weight", "model.layers.0.up.weight"), "gate_up")
MOE1 = [  # layer 1 as an MoE layer with two experts, TE spelling
    (("decoder.layers.1.norm.weight",), ("model.layers.1.norm.weight",), "copy"),
    (("decoder.layers.1.qkv.weight",), ("model.layers.1.q.weight", "model.layers.1.k.weight",
                                        "model.layers.1.v.weight"), "qkv"),
    (("decoder.layers.1.pre_mlp_layernorm.weight",), ("model.layers.1.post_norm.weight",), "copy"),
    (("decoder.layers.1.experts.0.fc2.weight",), ("model.layers.1.experts.0.down.weight",), "copy"),
    (("decoder.layers.1.experts.1.fc2.weight",), ("model.layers.1.experts.1.down.weight",), "copy"),
    (("decoder.layers.1.experts.0.fc1.weight", "decoder.layers.1.experts.1.fc1.weight"),
     ("model.layers.1.experts.gate_up",), "experts"),
]


def mcore_names(bindings) -> set[str]:
    return {n for b in bindings for n in b[0]}


def hf_names(bindings) -> set[str]:
    return {n for b in bindings for n in b[1]}


def swap(bindings, old: str, new: str, side: int = 0) -> list:
    return [tuple(tuple(new if n == old else n for n in part) if i == side else part for i, part in enumerate(b))
            for b in bindings]


DENSE0 = [EMB, NORM0, QKV0, FC1_0]
MTP0 = [  # MTP block 0 of a one-layer model, bound as HF layer 1 (DeepSeek-V3 layout)
    (("mtp.layers.0.enorm.weight",), ("model.layers.1.enorm.weight",), "copy"),
    (("mtp.layers.0.transformer_layer.norm.weight",), ("model.layers.1.norm.weight",), "copy"),
    (("mtp.layers.0.transformer_layer.qkv.weight",),
     ("model.layers.1.q.weight", "model.layers.1.k.weight", "model.layers.1.v.weight"), "qkv"),
    (("mtp.layers.0.transformer_layer.fc1.weight",), ("model.layers.1.gate.weight", "model.layers.1.up.weight"),
     "gate_up"),
]

# (id, config, mcore names present, expected bindings, expected missing)
EXPAND_ROWS = [
    ("dense layer, TE spelling", cfg("dense"), mcore_names(DENSE0), DENSE0, []),
    ("alt spelling is accepted", cfg("dense"),
     mcore_names(DENSE0) - {"decoder.layers.0.norm.weight"} | {"decoder.layers.0.input_layernorm.weight"},
     swap(DENSE0, "decoder.layers.0.norm.weight", "decoder.layers.0.input_layernorm.weight"), []),
    ("`when` picks the layer kind; {E} expands per expert", cfg("dense", "moe", experts=2),
     mcore_names(DENSE0 + MOE1), DENSE0 + MOE1, []),
    ("local spelling is accepted", cfg("dense", "moe", experts=2),
     mcore_names(DENSE0 + MOE1) - {"decoder.layers.1.pre_mlp_layernorm.weight"}
     | {"decoder.layers.1.fc1.layer_norm_weight"},
     swap(DENSE0 + MOE1, "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.fc1.layer_norm_weight"), []),
    ("absent tensor is missing under its first spelling", cfg("dense"),
     mcore_names(DENSE0) - {"decoder.layers.0.norm.weight"}, [EMB, QKV0, FC1_0], ["decoder.layers.0.norm.weight"]),
    ("missing expert", cfg("dense", "moe", experts=2),
     mcore_names(DENSE0 + MOE1) - {"decoder.layers.1.experts.1.fc2.weight"}, DENSE0 + MOE1[:4] + MOE1[5:],
     ["decoder.layers.1.experts.1.fc2.weight"]),
    ("a fused rule binds every expert at once, or nothing", cfg("dense", "moe", experts=2),
     mcore_names(DENSE0 + MOE1) - {"decoder.layers.1.experts.1.fc1.weight"}, DENSE0 + MOE1[:5],
     ["decoder.layers.1.experts.1.fc1.weight"]),
    ("if_config true requires the bias", cfg("dense", bias=True), mcore_names(DENSE0), DENSE0,
     ["decoder.layers.0.qkv.bias"]),
    ("if_config false ignores the bias rule", cfg("dense"), mcore_names(DENSE0) | {"decoder.layers.0.qkv.bias"},
     DENSE0, []),
    ("an MTP block becomes the next HF layer", cfg("dense"),
     mcore_names(DENSE0 + MTP0),
     [*DENSE0, *MTP0], []),
]


@pytest.mark.parametrize(("config", "present", "bindings", "missing"), [r[1:] for r in EXPAND_ROWS],
                         ids=[r[0] for r in EXPAND_ROWS])
def test_expand(config, present, bindings, missing) -> None:
    exp = expand(TOY, config, set(present))
    assert sorted((b.mcore, b.hf, b.op) for b in exp.bindings) == sorted(bindings)
    assert sorted(exp.missing) == sorted(missing)


# (id, config, HF names present, spec, expected bindings, expected missing)
TO_MCORE_ROWS = [
    ("dense layer", cfg("dense"), hf_names(DENSE0), "te", DENSE0, []),
    ("local spec falls back to the TE spelling, never to alt", cfg("dense"), hf_names(DENSE0), "local", DENSE0, []),
    ("TE spec spells the MoE norm pre_mlp_layernorm", cfg("dense", "moe", experts=2), hf_names(DENSE0 + MOE1), "te",
     DENSE0 + MOE1, []),
    ("local spec spells it fc1.layer_norm_weight", cfg("dense", "moe", experts=2), hf_names(DENSE0 + MOE1), "local",
     swap(DENSE0 + MOE1, "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.layers.1.fc1.layer_norm_weight"), []),
    ("an absent HF tensor is missing; its rule binds nothing", cfg("dense"),
     hf_names(DENSE0) - {"model.layers.0.k.weight"}, "te", [EMB, NORM0, FC1_0], ["model.layers.0.k.weight"]),
    ("if_config true requires every bias", cfg("dense", bias=True),
     hf_names(DENSE0) | {"model.layers.0.q.bias", "model.layers.0.v.bias"}, "te", DENSE0, ["model.layers.0.k.bias"]),
    ("if_config false leaves biases to the caller's coverage check", cfg("dense"),
     hf_names(DENSE0) | {"model.layers.0.q.bias", "model.layers.0.k.bias", "model.layers.0.v.bias"}, "te", DENSE0, []),
]


@pytest.mark.parametrize(("config", "present", "spec", "bindings", "missing"), [r[1:] for r in TO_MCORE_ROWS],
                         ids=[r[0] for r in TO_MCORE_ROWS])
def test_expand_to_mcore(config, present, spec, bindings, missing) -> None:
    exp = expand_to_mcore(TOY, config, set(present), spec=spec)
    assert sorted((b.mcore, b.hf, b.op) for b in exp.bindings) == sorted(bindings)
    assert sorted(exp.missing) == sorted(missing)


@pytest.mark.parametrize(("flag", "value", "expected"), [
    (None, None, True), ("bias", True, True), ("bias", False, False), ("bias", None, False),
    ("!bias", True, False), ("!bias", False, True), ("!bias", None, True),
])
def test_config_flag(flag, value, expected) -> None:
    assert config_flag(SimpleNamespace(bias=value), flag) is expected


def test_rule_constructor_refuses_an_unknown_op() -> None:
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        R("a", "b", "nope")


# ---- coverage errors with a real table ------------------------------------------------------------------------------
def llama(**kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_attention_heads=4,
                                    num_key_value_heads=2, num_hidden_layers=kw.pop("layers", 1), **kw)


def hf_specs(config) -> dict[str, TensorSpec]:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def mcore_specs(config) -> dict[str, TensorSpec]:
    return {o.name: o for o in hf_to_megatron_plan(hf_specs(config), config).outputs}


def extra(specs: dict[str, TensorSpec], name: str) -> dict[str, TensorSpec]:
    return {**specs, name: TensorSpec(name, (4,), torch.float32)}


def drop(specs: dict[str, TensorSpec], name: str) -> dict[str, TensorSpec]:
    assert name in specs
    return {k: v for k, v in specs.items() if k != name}


# (id, direction, specs, config, error message or None)
COVERAGE_ROWS = [
    ("to_hf complete", "to_hf", lambda: mcore_specs(llama()), llama, None),
    ("to_hf missing fc2", "to_hf", lambda: drop(mcore_specs(llama()), "decoder.layers.0.mlp.linear_fc2.weight"),
     llama, r"1 tensor\(s\) the llama config implies are not in the checkpoint: "
            r"decoder\.layers\.0\.mlp\.linear_fc2\.weight"),
    ("to_hf unmapped router", "to_hf", lambda: extra(mcore_specs(llama()), "decoder.layers.0.mlp.router.weight"),
     llama, r"1 checkpoint tensor\(s\) have no llama mapping: decoder\.layers\.0\.mlp\.router\.weight"),
    ("to_hf config with more layers", "to_hf", lambda: mcore_specs(llama()), lambda: llama(layers=2),
     r"6 tensor\(s\) the llama config implies are not in the checkpoint: decoder\.layers\.1\."),
    ("to_hf bias the config implies", "to_hf", lambda: mcore_specs(llama()), lambda: llama(attention_bias=True),
     r"2 tensor\(s\) .* decoder\.layers\.0\.self_attention\.linear_proj\.bias, "
     r"decoder\.layers\.0\.self_attention\.linear_qkv\.bias"),
    ("to_mcore complete", "to_mcore", lambda: hf_specs(llama()), llama, None),
    ("to_mcore missing k_proj", "to_mcore", lambda: drop(hf_specs(llama()), "model.layers.0.self_attn.k_proj.weight"),
     llama, r"1 tensor\(s\) the llama config implies are not in the HF folder: model\.layers\.0\.self_attn\.k_proj"),
    ("to_mcore unmapped vision tower", "to_mcore", lambda: extra(hf_specs(llama()), "model.vision_tower.weight"),
     llama, r"1 HF tensor\(s\) have no llama mapping: model\.vision_tower\.weight"),
    ("to_mcore bias outside the config", "to_mcore", lambda: hf_specs(llama(attention_bias=True)), llama,
     r"4 HF tensor\(s\) have no llama mapping: model\.layers\.0\.self_attn\.k_proj\.bias"),
]


@pytest.mark.parametrize(("direction", "make_specs", "make_config", "error"), [r[1:] for r in COVERAGE_ROWS],
                         ids=[r[0] for r in COVERAGE_ROWS])
def test_coverage(direction, make_specs, make_config, error) -> None:
    specs, config = make_specs(), make_config()
    convert = megatron_to_hf_groups if direction == "to_hf" else hf_to_megatron_plan
    if error is None:
        out = convert(specs, config)
        groups = out[0] if direction == "to_hf" else out.groups
        assert {n for g in groups for n in g.inputs} == set(specs)  # strict: every tensor consumed
        if direction == "to_hf":  # and the round trip names exactly what save_pretrained writes
            assert {o.name for g in groups for o in g.outputs} == set(hf_specs(config))
        return
    with pytest.raises(MappingError, match=error):
        convert(specs, config)


# ---- Qwen3-VL-MoE's fused experts: save_pretrained's [E, 2I, H] / [E, H, I] or the published [E, H, 2I] / [E, I, H]
def vl_moe(hidden: int, inter: int) -> transformers.Qwen3VLMoeConfig:
    text = dict(vocab_size=64, hidden_size=hidden, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, num_hidden_layers=2, num_experts=3, num_experts_per_tok=1, moe_intermediate_size=inter)
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=hidden,
                  deepstack_visual_indexes=[0])
    return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)


def vl_moe_specs(config, published: tuple[int, ...] = ()) -> dict[str, TensorSpec]:
    """What save_pretrained writes (the in-memory names and shapes), the given layers' experts published instead."""
    with torch.device("meta"):
        model = transformers.Qwen3VLMoeForConditionalGeneration(config)
    specs = {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    for i in published:
        for w in ("gate_up_proj", "down_proj"):
            k = f"model.language_model.layers.{i}.mlp.experts.{w}"
            e, a, b = specs[k].shape
            specs[k] = TensorSpec(k, (e, b, a), specs[k].dtype)
    return specs


# (id, hidden, moe_intermediate_size of the weights / of the config, layers published, transposed or error)
LAYOUT_ROWS = [
    ("H = 2I, save_pretrained", 16, 8, 8, (), False),
    ("H = 2I, published: down_proj tells", 16, 8, 8, (0, 1), True),
    ("H = I, save_pretrained", 16, 16, 16, (), False),
    ("H = I, published: gate_up_proj tells", 16, 16, 16, (0, 1), True),
    ("layers disagree", 16, 8, 8, (1,), r"layers\.1\.mlp\.experts\.\* is in the published layout but .*layers\.0"),
    ("neither layout", 16, 8, 12, (), r"gate_up_proj \[3, 16, 16\] and down_proj \[3, 16, 8\] are neither"),
]


@pytest.mark.parametrize(("hidden", "inter", "cfg_inter", "published", "want"), [r[1:] for r in LAYOUT_ROWS],
                         ids=[r[0] for r in LAYOUT_ROWS])
def test_qwen3_vl_moe_expert_layout(hidden, inter, cfg_inter, published, want) -> None:
    specs, config = vl_moe_specs(vl_moe(hidden, inter), published), vl_moe(hidden, cfg_inter)
    if isinstance(want, str):
        with pytest.raises(MappingError, match=want):
            hf_to_megatron_plan(specs, config)
        return
    plan = hf_to_megatron_plan(specs, config)
    assert plan.experts_transposed is want
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    (group,) = [g for g in plan.groups if g.inputs == (name,)]
    fused = torch.randn(specs[name].shape)
    out = group.convert({name: fused})
    assert [o.name for o in group.outputs] == [
        f"language_model.decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(3)]
    for e, o in enumerate(group.outputs):  # mcore fc1 [2I, H] = [gate; up], whichever layout the folder had
        assert out[o.name].shape == (2 * inter, hidden)
        assert torch.equal(out[o.name], fused[e].T if want else fused[e])
    groups, _ = megatron_to_hf_groups({o.name: o for o in plan.outputs}, config, experts_transposed=want)
    assert {o.name: o.shape for g in groups for o in g.outputs} == {k: v.shape for k, v in specs.items()}


ROW_CASES = [  # (op, dims, input shape)
    ("copy", Dims(2, 3, 4, 10), (7, 5)),
    ("copy", Dims(2, 3, 4, 10), (7,)),
    ("qkv", Dims(2, 3, 4, 10), (2 * (3 + 2) * 4, 5)),  # GQA: 2 groups of 3 query heads, head_dim 4
    ("qkv", Dims(2, 3, 4, 10), (2 * (3 + 2) * 4,)),  # its bias
    ("qkv", Dims(4, 1, 2, 10), (4 * 3 * 2, 6)),  # MHA
    ("vision_qkv", Dims(1, 1, 1, 10, vision_heads=3), (3 * 3 * 4, 5)),
    ("gate_up", Dims(2, 3, 4, 10), (12, 5)),
    ("vocab", Dims(2, 3, 4, 10), (16, 5)),  # padded vocabulary trimmed to 10 rows
]


@pytest.mark.parametrize(("op", "dims", "shape"), ROW_CASES)
def test_a_row_plan_is_the_op_itself(op, dims, shape):
    """The rows the writer copies for each output are the op's own output, bit for bit, on random weights."""
    x = torch.randn(shape).to(torch.bfloat16)
    outputs = OPS[op].to_hf((x,), dims)
    plan = row_plan(op, dims, shape)
    assert len(plan) == len(outputs)
    for out, ranges in zip(outputs, plan, strict=True):
        gathered = torch.cat([x[a:b] for a, b in ranges])
        assert gathered.shape == out.shape and torch.equal(gathered, out)


@pytest.mark.parametrize(("op", "dims", "shape"), ROW_CASES)
def test_a_row_plan_to_mcore_is_the_op_itself(op, dims, shape):
    """The other direction: the HF inputs (the op's to_hf outputs) joined again, padding rows taken from past the
    inputs' rows as zeros, equal the op's to_mcore output on random weights."""
    if op == "vocab":  # padded back to the rows it had
        dims = dataclasses.replace(dims, padded_vocab=shape[0])
    inputs = OPS[op].to_hf((torch.randn(shape).to(torch.bfloat16),), dims)
    outputs = OPS[op].to_mcore(inputs, dims)
    plan = row_plan_to_mcore(op, dims, [tuple(x.shape) for x in inputs])
    rows = torch.cat([*inputs, torch.zeros((dims.padded_vocab or 0) + 16, *inputs[0].shape[1:], dtype=torch.bfloat16)])
    assert len(plan) == len(outputs)
    for out, ranges in zip(outputs, plan, strict=True):
        gathered = torch.cat([rows[a:b] for a, b in ranges])
        assert gathered.shape == out.shape and torch.equal(gathered, out)


def test_a_row_plan_to_mcore_needs_rows_of_one_width():
    assert row_plan_to_mcore("gate_up", Dims(2, 3, 4, 10), [(6, 5), (6, 4)]) is None
    assert row_plan_to_mcore("experts", Dims(2, 3, 4, 10), [(4, 5, 6)]) is None


def test_ops_that_are_not_row_gathers_have_no_plan():
    assert row_plan("experts", Dims(2, 3, 4, 10), (4, 5, 6)) is None
    assert {"copy", "qkv", "gate_up", "vocab"} <= ROW_OPS


def test_file_slices_take_byte_ranges_across_parts():
    parts = FileSlices(((3, 100, 10), (4, 0, 5), (3, 50, 20)))  # 35 bytes back to back
    flat = [(fd, off + i) for fd, off, n in parts.parts for i in range(n)]
    ranges = ((0, 3), (8, 17), (34, 35), (20, 20))
    taken = parts.take(ranges)
    assert [(fd, off + i) for fd, off, n in taken.parts for i in range(n)] == [x for a, b in ranges for x in flat[a:b]]
    assert taken.nbytes == 3 + 9 + 1
