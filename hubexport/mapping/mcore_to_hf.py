"""megatron-core checkpoint tensors → Hugging Face plan Groups: the architecture table, the heads (tied, untied,
critic), and strict coverage both ways."""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from hubexport.core import Group, TensorSpec
from hubexport.errors import ConfigError, MappingError
from hubexport.mapping.archnames import model_class
from hubexport.mapping.archs import arch_for
from hubexport.mapping.registry import Binding, Dims, apply_to_hf, expand, plan_op

OUTPUT = "output_layer.weight"
EMBED = "embedding.word_embeddings.weight"
SHOW = 5  # names listed in an error


def dims_from_config(config) -> Dims:
    text = arch_for(config).text_config(config)
    nq = text.num_attention_heads
    ng = getattr(text, "num_key_value_heads", None) or nq
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // nq
    if nq % ng:
        raise ConfigError(f"num_attention_heads={nq} is not a multiple of num_key_value_heads={ng}",
                          hint="fix config.json in the checkpoint's huggingface/ folder")
    vision_heads = getattr(getattr(config, "vision_config", None), "num_heads", 0)
    return Dims(num_query_groups=ng, heads_per_group=nq // ng, head_dim=head_dim, vocab_size=text.vocab_size,
                vision_heads=vision_heads)


def _heads(metas: dict[str, TensorSpec], config, *, tie_word_embedding: bool,
           value_model: bool) -> tuple[list[Binding], dict, list[str]]:
    """Which head to write. The checkpoint's keys decide; a flag that contradicts them is an error, never a drop."""
    arch = arch_for(config)
    output = arch.lm_prefix + OUTPUT
    out = metas.get(output)
    value = value_model or (out is not None and out.shape[0] == 1)
    notes: list[str] = []
    if value and arch.lm_prefix:
        raise MappingError(f"{output} is a [1, hidden] value head: critics of {arch.name} models are not supported",
                           hint="export the actor checkpoint, or drop --is-value-model")
    if value:
        if out is None or out.shape[0] != 1:
            got = "no output_layer.weight" if out is None else f"output_layer.weight {list(out.shape)}"
            raise MappingError(f"--is-value-model was given but the checkpoint has {got}, not a [1, hidden] value head",
                               hint="drop --is-value-model for an actor checkpoint, or point at the critic directory")
        cls, arch_notes = model_class(config, value_model=True)
        notes.extend(arch_notes)
        updates = {"architectures": [cls], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
        if tie_word_embedding:
            notes.append("--tie-word-embedding ignored: a critic's value head is never tied to the embedding")
        return [Binding((OUTPUT,), ("score.weight",), "copy")], updates, notes
    cfg_tied = bool(getattr(config, "tie_word_embeddings", False))
    base, arch_notes = model_class(config, value_model=False)
    notes.extend(arch_notes)
    if not base.endswith(("ForCausalLM", "ForConditionalGeneration")):
        base = arch.causal_lm
    updates: dict = {"architectures": [base]}
    if out is not None:
        if tie_word_embedding:
            raise MappingError(
                "--tie-word-embedding was given but the checkpoint has its own output_layer.weight (untied head)",
                hint="drop --tie-word-embedding: dropping output_layer would leave lm_head random",
            )
        if cfg_tied:
            notes.append("config says tie_word_embeddings=true but the checkpoint holds a separate output_layer: "
                         "writing lm_head.weight and tie_word_embeddings=false")
        updates["tie_word_embeddings"] = False
        return [Binding((output,), ("lm_head.weight",), "vocab")], updates, notes
    if not cfg_tied:
        notes.append("the checkpoint has no output_layer (trained with tied embeddings): "
                     "writing tie_word_embeddings=true")
    updates["tie_word_embeddings"] = True
    return [], updates, notes


def _mtp_heads(metas: dict[str, TensorSpec], n_layers: int, tied: bool) -> list[Binding]:
    """DeepSeek-V3's HF MTP layers carry their own copies of the (shared) embedding and output head."""
    mtp = sorted({int(n.split(".")[2]) for n in metas if n.startswith("mtp.layers.")})
    out = []
    for m in mtp:
        hf = f"model.layers.{n_layers + m}."
        out.append(Binding((EMBED,), (hf + "embed_tokens.weight",), "vocab"))
        out.append(Binding((EMBED if tied else OUTPUT,), (hf + "shared_head.head.weight",), "vocab"))
    return out


def _zeros(spec: TensorSpec, tensors: dict) -> dict:
    return {spec.name: torch.zeros(spec.shape, dtype=spec.dtype)}


def _first(names, n: int = SHOW) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def megatron_to_hf_groups(metas: dict[str, TensorSpec], config, *, tie_word_embedding: bool = False,
                          value_model: bool = False, notes: list[str] | None = None,
                          experts_transposed: bool = False) -> tuple[list[Group], dict]:
    """Plan groups turning megatron tensors (the Source's logical names) into HF tensors, plus config.json updates.

    Strict: every checkpoint tensor must be consumed and every tensor the config implies must be found. Decisions the
    user should hear about (a head tied by the checkpoint against the config...) are appended to `notes`. Fused
    expert tensors are written as save_pretrained writes them, or [E, in, out] with `experts_transposed` (to compare
    with a published folder)."""
    arch = arch_for(config)
    dims = replace(dims_from_config(config), experts_transposed=experts_transposed)
    present = set(metas)
    exp = expand(arch, config, present)
    if exp.missing:
        raise MappingError(
            f"{len(exp.missing)} tensor(s) the {arch.name} config implies are not in the checkpoint: "
            f"{_first(exp.missing)}",
            hint="check that config.json (num_hidden_layers, experts, biases, q_lora_rank...) belongs to this "
                 "checkpoint",
        )
    n_layers = len(arch.layer_kinds(arch.text_config(config)))
    heads, updates, head_notes = _heads(metas, config, tie_word_embedding=tie_word_embedding,
                                        value_model=value_model)
    bindings = exp.bindings + heads + _mtp_heads(metas, n_layers, updates.get("tie_word_embeddings", False))
    used = {n for b in bindings for n in b.mcore}
    unused = present - used
    if unused:
        raise MappingError(
            f"{len(unused)} checkpoint tensor(s) have no {arch.name} mapping: {_first(unused)}",
            hint="the checkpoint and config.json disagree (another architecture or layer count?), or the model "
                 "has parts hubexport does not export yet (vision tower...)",
        )
    groups = []
    for b in bindings:
        try:
            shapes, rows = plan_op(b.op, dims, [metas[n].shape for n in b.mcore])
        except (RuntimeError, ValueError) as e:
            raise MappingError(
                f"{b.mcore[0]} {list(metas[b.mcore[0]].shape)} does not fit the config for {b.op}: {e}",
                hint="config.json (heads, head_dim, vocab_size) does not match the checkpoint",
            ) from e
        dtype = metas[b.mcore[0]].dtype
        outputs = tuple(TensorSpec(n, s, dtype) for n, s in zip(b.hf, shapes, strict=True))
        groups.append(Group(inputs=b.mcore, outputs=outputs,
                            convert=functools.partial(apply_to_hf, b.op, dims, b.mcore, b.hf), rows=rows))
    if "score.weight" in {n for b in heads for n in b.hf}:
        # HF's score head has a bias; verl's value head has none, so the exact equivalent is a zero bias
        spec = TensorSpec("score.bias", (1,), metas[OUTPUT].dtype)
        groups.append(Group(inputs=(), outputs=(spec,), convert=functools.partial(_zeros, spec),
                            rows=(((0, 1),),)))  # rows past the (no) inputs: zeros
    if notes is not None:
        notes.extend(head_notes)
    return groups, updates
