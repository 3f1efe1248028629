"""Megatron-FSDP `fsdp_dtensor` checkpoints (made by megatron-core's Megatron-FSDP on CPU, tests/fixtures_mfsdp.py)
exported to HF: bit-exact against the model's weights and save_pretrained's key set, the same output as the torch_dist
path for the same model, transformers' logits and megatron's own forward; inspect and verify take them; bad input is
refused in one line."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from hubexport.cli import cli
from hubexport.detect import detect
from hubexport.errors import CheckpointError
from hubexport.executor import merge
from hubexport.inspection import inspect, render_text
from hubexport.options import MergeOptions, Output
from hubexport.sources.mcore_fsdp import logical_name
from hubexport.verify import verify
from tests.fixtures_mfsdp import MODELS
from tests.mcore_check import assert_same_tensors, load_logits
from tests.test_fsdp_errors import assert_clean_failure, merge_cli

pytestmark = pytest.mark.slow


def _options(name: str, backend: str = "auto") -> MergeOptions:
    """Megatron-FSDP saves its fp32 main weights even for a bf16 model: --dtype gives the bf16 it trained in."""
    return MergeOptions(backend=backend, dtype="bfloat16" if MODELS[name][2] else None)


@pytest.fixture(scope="module")
def merged(mfsdp_cases, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("mfsdp_merged")
    for name, case in mfsdp_cases.items():
        merge(case.actor, Output(out / name), _options(name), log=lambda _: None)
    return {name: out / name for name in mfsdp_cases}


@pytest.mark.parametrize("name", list(MODELS))
def test_bit_exact_key_set_and_logits(name, mfsdp_cases, merged):
    case, folder = mfsdp_cases[name], merged[name]
    layout = detect(case.actor)
    assert (layout.format, layout.version, layout.parallel["world_size"]) == ("megatron", "fsdp_dtensor", 2)
    assert_same_tensors(folder, case.hf_ref)  # names and bits of save_pretrained's own output
    logits = load_logits(folder)
    assert torch.equal(logits, load_logits(case.hf_ref))
    if case.mcore_logits is not None:  # megatron's forward of the model that was saved
        torch.testing.assert_close(torch.load(case.mcore_logits), logits, atol=2e-4, rtol=1e-4)
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is (name == "qwen2_tied_bf16")
    assert any("fp32 main weights" in n for n in layout.notes) is MODELS[name][2]


@pytest.mark.parametrize("name", list(MODELS))
def test_same_output_as_torch_dist_of_the_same_model(name, mfsdp_cases, merged, tmp_path):
    merge(mfsdp_cases[name].twin, Output(tmp_path / "td"), _options(name, "megatron"), log=lambda _: None)
    assert (tmp_path / "td" / "model.safetensors").read_bytes() == (merged[name] / "model.safetensors").read_bytes()


def test_the_checkpoint_is_what_megatron_fsdp_writes(mfsdp_cases):
    """The producer's naming, as the source undoes it: MegatronFSDP's `module.` level under the `model` entry, SwiGLU
    halves, global expert numbers, rows of each parameter split unevenly across the two ranks; a bf16 model's
    checkpoint holds Megatron-FSDP's fp32 main weights."""
    from torch.distributed.checkpoint import FileSystemReader

    bf16 = FileSystemReader(str(_dist(mfsdp_cases["qwen2_tied_bf16"].actor))).read_metadata()
    assert {t.properties.dtype for k, t in bf16.state_dict_metadata.items() if k.startswith("model.")} == {torch.float32}
    assert "model.module.output_layer.weight" not in bf16.state_dict_metadata  # tied: no output layer of its own
    md = FileSystemReader(str(_dist(mfsdp_cases["qwen2_moe_ep2"].actor))).read_metadata()
    keys = set(md.state_dict_metadata)
    assert "model.module.decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight_v" in keys
    assert "model.module.decoder.layers.1.mlp.shared_experts.linear_fc1.weight_w" in keys
    assert not any(k.endswith("linear_fc1.weight") for k in keys)
    assert any(k.startswith("rng_state.") for k in keys)
    qkv = md.state_dict_metadata["model.module.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert len(qkv.chunks) == 2 and qkv.chunks[0].sizes[0] != qkv.chunks[1].sizes[0]


def test_grouped_expert_and_wrapper_names():
    """TEGroupedMLP's `weight<j>` (Transformer Engine, not on CPU) as megatron-core's own handler renumbers them
    across EP ranks, and newer wrappers (Float16Module, megatron-core >= 0.17's stripped `model.` levels)."""
    from megatron.core.transformer.fsdp_dtensor_checkpoint import get_expert_index_from_key

    grouped = "module.decoder.layers.2.mlp.experts.linear_fc1.weight5_w"
    assert get_expert_index_from_key(grouped) == 5
    assert logical_name(grouped) == ("decoder.layers.2.mlp.experts.local_experts.5.linear_fc1.weight", "_w")
    assert logical_name("module.decoder.layers.2.mlp.experts.linear_fc2.weight5") == (
        "decoder.layers.2.mlp.experts.local_experts.5.linear_fc2.weight", None)
    assert logical_name("module.module.embedding.word_embeddings.weight") == ("embedding.word_embeddings.weight", None)
    assert logical_name("decoder.layers.0.mlp.linear_fc1.bias_v") == ("decoder.layers.0.mlp.linear_fc1.bias", "_v")


def test_inspect_and_verify_take_it(mfsdp_cases, merged):
    case = mfsdp_cases["qwen2_moe_ep2"]
    info = inspect(case.actor, backend="megatron-fsdp")
    assert (info["format"], info["version"], info["parallel"]["world_size"]) == ("megatron", "fsdp_dtensor", 2)
    assert info["num_tensors"] == len(load_file(merged["qwen2_moe_ep2"] / "model.safetensors"))
    assert "megatron fsdp_dtensor" in render_text(info)
    report = verify(merged["qwen2_moe_ep2"], case.actor, log=lambda _: None)
    assert report.ok and report.compared == info["num_tensors"]
    r = CliRunner().invoke(cli, ["verify", str(merged["qwen2_moe_ep2"]), "--reference", str(case.actor),
                                 "--backend", "megatron-fsdp"])
    assert r.exit_code == 0, r.output


@pytest.fixture
def ckpt(mfsdp_cases, tmp_path) -> Path:
    """A private, damageable copy of the Qwen3 actor dir."""
    dst = tmp_path / "run" / "global_step_3" / "actor"
    shutil.copytree(mfsdp_cases["qwen3"].actor, dst)
    return dst


def _dist(actor: Path) -> Path:
    return actor / "model" / "dist_ckpt"


def test_missing_distcp(ckpt, tmp_path):
    (_dist(ckpt) / "__1_0.distcp").unlink()
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "__1_0.distcp is missing", ".metadata")


def test_truncated_distcp(ckpt, tmp_path):
    f = _dist(ckpt) / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-1000])
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "__0_0.distcp is truncated")


def _edit_metadata(actor: Path, edit) -> None:
    with open(_dist(actor) / ".metadata", "rb") as f:
        md = pickle.load(f)  # the test's own fixture: trusted
    edit(md)
    with open(_dist(actor) / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_metadata_naming_a_missing_file(ckpt, tmp_path):
    def edit(md):
        idx = next(iter(md.storage_data))
        md.storage_data[idx] = dataclasses.replace(md.storage_data[idx], relative_path="__5_0.distcp")

    _edit_metadata(ckpt, edit)
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "__5_0.distcp is missing")


def test_save_that_never_finished(ckpt, tmp_path):
    (_dist(ckpt) / ".metadata").unlink()  # torch DCP writes .metadata last, after every rank's data
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", ".metadata is missing",
                         "Megatron-FSDP save did not finish")


def test_a_lost_swiglu_half_is_named(ckpt, tmp_path):
    def edit(md):
        del md.state_dict_metadata["model.module.decoder.layers.1.mlp.linear_fc1.weight_v"]

    _edit_metadata(ckpt, edit)
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "decoder.layers.1.mlp.linear_fc1.weight_v",
                         "SwiGLU halves")


def test_optimizer_only_save_is_refused(ckpt, tmp_path):
    def edit(md):
        for key in [k for k in md.state_dict_metadata if k.startswith("model.")]:
            del md.state_dict_metadata[key]

    _edit_metadata(ckpt, edit)
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "holds no model weights", "save_contents")


def test_pipeline_parallel_is_refused(ckpt, tmp_path):
    cfg = json.loads((ckpt / "transformer_config.json").read_text())
    (ckpt / "transformer_config.json").write_text(json.dumps({**cfg, "pipeline_model_parallel_size": 2}))
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "pipeline_model_parallel_size=2")


def test_backends(mfsdp_cases, tmp_path):
    """--backend megatron takes it too (it is a Megatron checkpoint); --backend megatron-fsdp takes nothing else."""
    assert detect(mfsdp_cases["qwen3"].actor, backend="megatron").version == "fsdp_dtensor"
    with pytest.raises(CheckpointError, match="is not a Megatron-FSDP fsdp_dtensor checkpoint"):
        detect(mfsdp_cases["qwen3"].twin, backend="megatron-fsdp")
    assert detect(mfsdp_cases["qwen3"].twin).version == "v1"  # torch_dist (common.pt, metadata.json) is not taken
