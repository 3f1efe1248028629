"""HF → Megatron torch_dist on CPU, in-process: the stored layout against the formats doc's formulas (written in the
test fixtures, independent of hubexport), and HF → Megatron → HF round trips through `merge` that must be bit-exact
for every architecture table (which exercises each table in both directions)."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig

from hubexport.errors import MappingError, TargetError
from hubexport.executor import to_megatron
from hubexport.options import MegatronOptions, Output
from tests.fixtures_mcore import hf_to_mcore_global, tiny_hf
from tests.mcore_check import assert_same_tensors, export_megatron

CASES = {  # name: (tiny_hf kind, options)
    "qwen2": ("qwen2", {}),  # GQA + qkv bias
    "qwen2_tied": ("qwen2", {"tie": True}),
    "qwen2_critic": ("qwen2", {"value": True}),
    "qwen3": ("qwen3", {}),  # q/k norm
    "llama_bf16": ("llama", {"dtype": torch.bfloat16}),
    "qwen2_moe": ("qwen2_moe", {}),  # shared expert + its gate
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe_mixed": ("qwen3_moe", {"mlp_only_layers": [1]}),  # dense and MoE layers: per-layer keys
    "mixtral": ("mixtral", {}),
    "deepseek_v3": ("deepseek_v3", {}),  # MLA, dense first layer, router bias, per-layer keys
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: tiny_hf(kind, root / name, **opts) for name, (kind, opts) in CASES.items()}


def stored(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist directory, read by torch's own DCP reader (not hubexport's)."""
    md = FileSystemReader(str(d)).read_metadata()
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
           if isinstance(m, TensorStorageMetadata)}
    dcp_load(out, storage_reader=FileSystemReader(str(d)), no_dist=True)
    return out


def stored_objects(d: Path) -> set[str]:
    md = FileSystemReader(str(d)).read_metadata()
    return {k for k, m in md.state_dict_metadata.items() if not isinstance(m, TensorStorageMetadata)}


def expected_layout(hf_dir: Path, spec: str) -> dict[str, torch.Tensor]:
    """The stored keys and values megatron-core's own save gives for homogeneous layers (formats doc §3.3): the
    fixtures' HF → mcore formulas, layers (and experts) stacked, norms under the names each spec saves."""
    cfg = AutoConfig.from_pretrained(hf_dir)
    sd = load_file(hf_dir / "model.safetensors")
    flat = hf_to_mcore_global(sd, cfg, 128, value=False)
    moe = "model.layers.0.mlp.gate.weight" in sd
    rename = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
              "pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight" if moe and spec == "te"
              else "mlp.linear_fc1.layer_norm_weight"}
    out: dict[str, list] = {}
    for name, t in flat.items():
        if not name.startswith("decoder.layers."):
            out[name] = t
            continue
        layer, suffix = name.removeprefix("decoder.layers.").split(".", 1)
        suffix = rename.get(suffix, suffix)
        if "local_experts." in suffix:
            pre, rest = suffix.split("local_experts.")
            e, w = rest.split(".", 1)
            out.setdefault(f"decoder.layers.{pre}experts.{w}", {}).setdefault(int(layer), {})[int(e)] = t
        else:
            out.setdefault(f"decoder.layers.{suffix}", {})[int(layer)] = t
    if cfg.tie_word_embeddings:
        out.pop("output_layer.weight")  # tied: megatron stores the embedding once (formats doc §2.8)

    def stack(v):
        return torch.stack([stack(v[i]) for i in sorted(v)]) if isinstance(v, dict) else v

    return {k: stack(v) for k, v in out.items()}


def convert(hf_dir: Path, out: Path, *, overwrite: bool = False, **kw) -> dict:
    notes: list[str] = []
    result = to_megatron(hf_dir, Output(out, overwrite), MegatronOptions(**kw), log=notes.append)
    return {"result": result, "notes": notes}


@pytest.mark.parametrize("case,spec", [("qwen2", "te"), ("qwen3", "te"), ("qwen2_moe", "te"), ("qwen2_moe", "local"),
                                       ("qwen2_tied", "local")])
def test_layout_matches_megatron_formulas(hf_models, tmp_path, case, spec) -> None:
    out = tmp_path / "ckpt"
    convert(hf_models[case], out, spec=spec)
    got, want = stored(out), expected_layout(hf_models[case], spec)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), k
    assert json.loads((out / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert (out / "common.pt").is_file() and list(out.glob("__0_*.distcp"))
    objects = stored_objects(out)
    assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_3_4" in objects
    assert ("decoder.final_layernorm._extra_state/shard_0_1" in objects) == (spec == "te")
    if case == "qwen2_moe":
        assert "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_2.3_4.4" in objects


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact(hf_models, tmp_path, case) -> None:
    """HF → Megatron (hubexport) → HF (hubexport merge) gives back exactly what save_pretrained wrote."""
    actor = tmp_path / "global_step_1" / "actor"
    info = convert(hf_models[case], actor / "dist_ckpt", test=True)
    (actor / "huggingface").mkdir()
    shutil.copy(hf_models[case] / "config.json", actor / "huggingface" / "config.json")
    export_megatron(actor, tmp_path / "back")
    assert_same_tensors(tmp_path / "back", hf_models[case])
    r = info["result"]
    assert r.megatron.tested and any("bit-exact" in n for n in info["notes"])
    assert r.megatron.layer_keys == ("per-layer" if case in ("deepseek_v3", "qwen3_moe_mixed") else "stacked")
    assert r.tied_embeddings == (case == "qwen2_tied") and r.value_model == (case == "qwen2_critic")


def test_local_spec_round_trip_moe_and_mla(hf_models, tmp_path) -> None:
    for case in ("qwen3_moe", "deepseek_v3"):
        actor = tmp_path / case / "actor"
        convert(hf_models[case], actor / "dist_ckpt", spec="local")
        (actor / "huggingface").mkdir()
        shutil.copy(hf_models[case] / "config.json", actor / "huggingface" / "config.json")
        export_megatron(actor, tmp_path / case / "back")
        assert_same_tensors(tmp_path / case / "back", hf_models[case])
    keys = set(stored(tmp_path / "deepseek_v3" / "actor" / "dist_ckpt"))
    # the local MLA spec keeps separate latent norms and mcore's own pre-MLP norm name (no key map)
    assert "decoder.layers.1.self_attention.q_layernorm.weight" in keys
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1.weight" in keys


def test_deepseek_per_layer_keys_and_shapes(hf_models, tmp_path) -> None:
    convert(hf_models["deepseek_v3"], tmp_path / "ckpt")
    got = stored(tmp_path / "ckpt")
    sd = load_file(hf_models["deepseek_v3"] / "model.safetensors")
    h = "model.layers.1."
    assert torch.equal(got["decoder.layers.1.mlp.router.expert_bias"], sd[h + "mlp.gate.e_score_correction_bias"])
    fc1 = got["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
    assert fc1.shape == (4, 64, 64)  # [E, 2 × moe_intermediate, hidden]
    assert torch.equal(fc1[2], torch.cat([sd[h + "mlp.experts.2.gate_proj.weight"], sd[h + "mlp.experts.2.up_proj.weight"]]))
    assert torch.equal(got["decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight"],
                       sd["model.layers.0.self_attn.q_a_layernorm.weight"])
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in got  # dense first layer, TE fused norm
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in got
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1._extra_state/shard_3_4" in stored_objects(tmp_path / "ckpt")


def test_refuses_non_empty_output_and_overwrites_on_request(hf_models, tmp_path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TargetError, match="not empty"):
        convert(hf_models["qwen2"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert(hf_models["qwen2"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "metadata.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging or old copy left behind


def test_missing_tensor_is_refused_before_anything_is_written(hf_models, tmp_path) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(hf_models["qwen3"], hf)
    sd = load_file(hf / "model.safetensors")
    del sd["model.layers.2.self_attn.k_norm.weight"]
    from safetensors.torch import save_file

    save_file(sd, hf / "model.safetensors")
    with pytest.raises(MappingError, match=r"model\.layers\.2\.self_attn\.k_norm\.weight"):
        convert(hf, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_unknown_tensor_and_tied_alias_mismatch_are_errors(hf_models, tmp_path) -> None:
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    shutil.copytree(hf_models["qwen2"], hf)
    sd = load_file(hf / "model.safetensors")
    save_file({**sd, "model.vision_tower.proj.weight": torch.zeros(2, 2)}, hf / "model.safetensors")
    with pytest.raises(MappingError, match="vision_tower"):
        convert(hf, tmp_path / "a")
    tied = tmp_path / "tied"
    shutil.copytree(hf_models["qwen2_tied"], tied)
    sd = load_file(tied / "model.safetensors")
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1}, tied / "model.safetensors")
    with pytest.raises(MappingError, match=r"lm_head\.weight differs"):
        convert(tied, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tied"]


def test_tied_alias_equal_to_embedding_is_accepted(hf_models, tmp_path) -> None:
    from safetensors.torch import save_file

    tied = tmp_path / "tied"
    shutil.copytree(hf_models["qwen2_tied"], tied)
    sd = load_file(tied / "model.safetensors")
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, tied / "model.safetensors")
    convert(tied, tmp_path / "ckpt")
    assert "output_layer.weight" not in stored(tmp_path / "ckpt")


def test_memory_is_bounded_by_the_group(hf_models, tmp_path) -> None:
    """The planned peak is one group (in this tiny model gate + up in, fc1 out), not the model."""
    r = convert(hf_models["qwen2"], tmp_path / "ckpt")["result"]
    sd = load_file(hf_models["qwen2"] / "model.safetensors")
    total = sum(t.nbytes for t in sd.values())
    fc1 = sd["model.layers.0.mlp.gate_proj.weight"].nbytes + sd["model.layers.0.mlp.up_proj.weight"].nbytes
    assert r.peak_tensor_bytes == 2 * fc1
    assert r.peak_tensor_bytes < total / 4



def _live_cpu_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage alive in this process (each storage once)."""
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu" and type(o) is torch.Tensor:
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_writer_holds_one_group_at_a_time(tmp_path) -> None:
    """The file writer asks for chunks one by one: at any moment the live tensors are about one group, far below the
    bytes written (megatron's own writer stages every tensor of the rank before writing). Every chunk goes through
    memory here (the job itself copies row groups file to file)."""
    from hubexport.mapping.hf_to_mcore import hf_to_megatron_plan
    from hubexport.sources.hf import SafetensorsSource
    from hubexport.writers.mcore import Chunk, placement, plan_files, write_rank

    hf = tiny_hf("qwen2", tmp_path / "hf", num_hidden_layers=12)
    src = SafetensorsSource(hf)
    plan = hf_to_megatron_plan(src.metas(), AutoConfig.from_pretrained(hf))
    where = {"num_layers": plan.num_layers, "num_experts": plan.num_experts, "stacked": plan.stacked}
    chunks = [Chunk(o, placement(o.name, **where)) for o in plan.outputs]
    group_of = {g.outputs[0].name: g for g in plan.groups if g.outputs}
    gc.collect()
    base, peak, calls = _live_cpu_tensor_bytes(), 0, 0

    def produce(entry) -> torch.Tensor:
        nonlocal peak, calls
        calls += 1
        g = group_of[entry.name]
        out = g.convert({n: src.read(n) for n in g.inputs})[entry.name]
        if calls % 4 == 0:  # scanning every object is slow; a writer that kept chunks would show at any sample
            peak = max(peak, _live_cpu_tensor_bytes() - base)  # this group's tensors, and whatever the writer kept
        return out

    (tmp_path / "ckpt").mkdir()
    (entries,) = plan_files(chunks, [0] * len(chunks), 1, [], b"")
    write_rank(tmp_path / "ckpt" / "__0_0.distcp", entries, produce)
    written = sum(c.spec.nbytes for c in chunks)
    largest = max(c.spec.nbytes for c in chunks)
    assert calls == len(chunks)
    assert 0 < peak <= 4 * largest and 8 * peak < written, (peak, largest, written)
