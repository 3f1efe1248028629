"""verl <= 0.8's Megatron LoRA rank files (`adapter_checkpoint/mp_rank_*_adapter.pt`): what is detected, and the bad
input — a missing rank file, rank files of mixed TP sizes, a file that is not an adapter state dict — as one-line
errors naming the file, nothing written. The exports themselves are checked in test_mcore_lora (LAYOUTS)."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from hubexport.cli import cli
from hubexport.detect import detect
from hubexport.sources.mcore_adapter import AdapterSource
from tests.fixtures_mcore_lora import ALPHA
from tests.tensors import folder_tensors

RANK1 = "mp_rank_01_adapter.pt"


def copy_actor(src, tmp_path):
    return shutil.copytree(src, tmp_path / "actor")


def merge_fails(actor, tmp_path) -> str:
    """The CLI's one-line error (exit 2, no traceback, no target folder)."""
    target = tmp_path / "o"
    r = CliRunner().invoke(cli, ["merge", "--local-dir", str(actor), "--target-dir", str(target),
                                 "--lora-alpha", str(ALPHA)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.stderr.startswith("error: ")
    assert not target.exists()
    return r.stderr.splitlines()[0]


@pytest.mark.parametrize("layout, files", [("v1_adapter", ["mp_rank_00_adapter.pt", RANK1]),
                                           ("pp2_adapter", ["mp_rank_00_000_adapter.pt", "mp_rank_00_001_adapter.pt"])])
def test_rank_files_are_detected_with_global_layer_numbers(layout, files, mcore_lora):
    actor = getattr(mcore_lora, layout)
    found = detect(actor)
    assert (found.format, found.version) == ("megatron", "v1-adapter")
    assert [f.name for f in found.files] == files
    source = AdapterSource(found.root, found.files, found.parallel)
    layers = {int(n.split(".")[2]) for n in source.metas()}
    assert layers == {0, 1}  # PP=2: each stage's local layer 0, made global
    for name, spec in source.metas().items():  # global shapes: what the torch_dist LoRA path sees
        assert spec.shape == source.read(name).shape
    # the same LoRA saved with TP=2 and with TP=1 PP=2 gives the same global tensors
    other = detect(mcore_lora.tp1_adapter)
    reference = AdapterSource(other.root, other.files, other.parallel)
    assert source.metas().keys() == reference.metas().keys()
    for name in reference.metas():
        assert torch.equal(source.read(name), reference.read(name)), name


@pytest.mark.parametrize("layout, missing", [("v1_adapter", RANK1), ("pp2_adapter", "mp_rank_00_001_adapter.pt")])
def test_missing_rank_file_is_a_one_line_error(layout, missing, mcore_lora, tmp_path):
    actor = copy_actor(getattr(mcore_lora, layout), tmp_path)
    (actor / "adapter_checkpoint" / missing).unlink()
    line = merge_fails(actor, tmp_path)
    assert f"{actor / 'adapter_checkpoint' / missing} is missing" in line


def test_rank_files_of_mixed_tp_sizes_are_a_one_line_error(mcore_lora, tmp_path):
    """A TP=1 run's file next to a TP=2 run's: the shards do not fit together, whichever file says what."""
    actor = copy_actor(mcore_lora.v1_adapter, tmp_path)
    (actor / "transformer_config.json").unlink()  # nothing to check the rank names against: the shapes tell
    shutil.copy(mcore_lora.tp1_adapter / "adapter_checkpoint" / "mp_rank_00_adapter.pt", actor / "adapter_checkpoint" / RANK1)
    line = merge_fails(actor, tmp_path)
    assert line.endswith(f"in {actor / 'adapter_checkpoint' / RANK1}")


def test_rank_file_beyond_the_recorded_tp_size_is_a_one_line_error(mcore_lora, tmp_path):
    actor = copy_actor(mcore_lora.v1_adapter, tmp_path)
    stray = actor / "adapter_checkpoint" / "mp_rank_02_adapter.pt"
    shutil.copy(actor / "adapter_checkpoint" / RANK1, stray)
    line = merge_fails(actor, tmp_path)
    assert str(stray) in line and "tensor_model_parallel_size=2" in line


@pytest.mark.parametrize("content", [{"model": {"decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(2, 2)}},
                                     {"adapter_state_dict": {}},
                                     {"adapter_state_dict": {"decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(2)}},
                                     [torch.zeros(2)]])
def test_rank_file_that_is_not_an_adapter_state_dict_is_a_one_line_error(content, mcore_lora, tmp_path):
    actor = copy_actor(mcore_lora.v1_adapter, tmp_path)
    torch.save(content, actor / "adapter_checkpoint" / RANK1)
    line = merge_fails(actor, tmp_path)
    assert f"{actor / 'adapter_checkpoint' / RANK1} is not a Megatron adapter state dict" in line


def test_fusing_rank_files_without_base_model_is_a_one_line_error(mcore_lora, tmp_path):
    r = CliRunner().invoke(cli, ["merge", "--local-dir", str(mcore_lora.v1_adapter), "--target-dir",
                                 str(tmp_path / "o"), "--lora-alpha", str(ALPHA), "--lora", "fuse"])
    assert r.exit_code == 2 and "--base-model" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_base_in_dist_ckpt_is_combined_with_the_rank_files(mcore_lora, tmp_path):
    """dist_ckpt/ holds the base, adapter_checkpoint/ the LoRA: the export is the same as from the full torch_dist."""
    outs = {}
    for layout in ("v1_base", "v1_full"):
        target = tmp_path / layout
        r = CliRunner().invoke(cli, ["merge", "--local-dir", str(getattr(mcore_lora, layout)), "--target-dir",
                                     str(target), "--lora-alpha", str(ALPHA), "--lora", "both"])
        assert r.exit_code == 0, r.output
        outs[layout] = folder_tensors(target) | {f"adapter/{k}": v for k, v in folder_tensors(target / "lora_adapter").items()}
    assert outs["v1_base"].keys() == outs["v1_full"].keys()
    for name, value in outs["v1_full"].items():
        assert torch.equal(outs["v1_base"][name], value), name


@pytest.mark.parametrize("layers, pp, first, last", [(8, 2, None, None), (10, 3, 2, None), (7, 3, None, 1),
                                                     (10, 4, 2, 2)])
def test_stage_offsets_are_megatron_cores(layers, pp, first, last, tmp_path):
    """Each stage's first global layer, as megatron-core's own get_transformer_layer_offset places it."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from hubexport.sources.mcore_adapter import stage_sizes

    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=pp,
                               pipeline_dtype=torch.float32, num_layers_in_first_pipeline_stage=first,
                               num_layers_in_last_pipeline_stage=last)
    tc = {"num_layers": layers, "num_layers_in_first_pipeline_stage": first, "num_layers_in_last_pipeline_stage": last}
    sizes = stage_sizes(tc, pp, tmp_path / "transformer_config.json")
    assert sum(sizes) == layers
    assert [sum(sizes[:p]) for p in range(pp)] == [get_transformer_layer_offset(config, pp_rank=p) for p in range(pp)]
