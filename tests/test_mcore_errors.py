"""Layouts and failures: incomplete or model-less dist_ckpt, mbridge detection, contradicting head flags, coverage
errors, and the restricted metadata unpickler. Built from copies of the real fixtures."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hubexport.core import TensorSpec
from hubexport.detect import detect
from hubexport.errors import CheckpointError, MappingError
from hubexport.mapping.mcore_to_hf import megatron_to_hf_groups
from hubexport.sources.dcp import read_metadata
from hubexport.sources.mcore import TorchDistSource
from tests.mcore_check import export_megatron

pytestmark = pytest.mark.slow


def _copy(case, tmp_path: Path) -> Path:
    dst = tmp_path / "global_step_3" / "actor"
    shutil.copytree(case.actor, dst)
    return dst


def test_incomplete_dist_ckpt_is_a_clear_error(mcore_tp1, tmp_path) -> None:
    actor = _copy(mcore_tp1["untied"], tmp_path)
    (actor / "dist_ckpt" / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match=r"metadata\.json is missing"):
        detect(actor, backend="megatron")


def test_missing_data_file_is_a_clear_error(mcore_tp1, tmp_path) -> None:
    actor = _copy(mcore_tp1["untied"], tmp_path)
    for f in (actor / "dist_ckpt").glob("*.distcp"):
        f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        export_megatron(actor, tmp_path / "out")


def test_model_less_dist_ckpt_is_a_clear_error(mcore_tp1, tmp_path) -> None:
    actor = _copy(mcore_tp1["untied"], tmp_path)
    shutil.rmtree(actor / "dist_ckpt")
    # an optimizer-only archive, as verl's mbridge default writes (no model keys)
    import torch.distributed.checkpoint as dcp

    dcp.save({"optimizer.state.exp_avg.x": torch.zeros(4)}, checkpoint_id=str(actor / "dist_ckpt"), no_dist=True)
    (actor / "dist_ckpt" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    with pytest.raises(CheckpointError, match="no model tensors"):
        detect(actor, backend="megatron")


def test_mbridge_layout_detected(mcore_tp1, tmp_path) -> None:
    actor = _copy(mcore_tp1["untied"], tmp_path)
    shutil.rmtree(actor / "dist_ckpt")
    (actor / "dist_ckpt").mkdir()  # optimizer dir without metadata.json; weights already HF
    shutil.copy(mcore_tp1["untied"].hf_ref / "model.safetensors", actor / "huggingface" / "model.safetensors")
    layout = detect(actor, backend="auto")
    assert layout.version == "mbridge" and any("mbridge" in n for n in layout.notes)
    from hubexport.sources.mcore import open_megatron_source

    src = open_megatron_source(layout)
    assert "model.embed_tokens.weight" in src.metas()


def test_tie_flag_on_untied_checkpoint_is_an_error(mcore_tp1, tmp_path) -> None:
    with pytest.raises(MappingError, match="--tie-word-embedding"):
        export_megatron(mcore_tp1["untied"].actor, tmp_path / "out", tie_word_embedding=True)


def test_value_flag_on_actor_is_an_error(mcore_tp1, tmp_path) -> None:
    with pytest.raises(MappingError, match="value"):
        export_megatron(mcore_tp1["untied"].actor, tmp_path / "out", value_model=True)


def test_coverage_errors_name_the_tensors(mcore_tp1) -> None:
    import transformers

    src = TorchDistSource(mcore_tp1["untied"].actor / "dist_ckpt")
    config = transformers.AutoConfig.from_pretrained(mcore_tp1["untied"].actor / "huggingface")
    metas = src.metas()
    extra = dict(metas, **{"decoder.layers.0.foo.weight": TensorSpec("decoder.layers.0.foo.weight", (2,),
                                                                     torch.float32)})
    with pytest.raises(MappingError, match=r"no qwen3 mapping: decoder\.layers\.0\.foo\.weight"):
        megatron_to_hf_groups(extra, config, tie_word_embedding=False, value_model=False)
    fewer = {k: v for k, v in metas.items() if k != "decoder.layers.2.mlp.linear_fc2.weight"}
    with pytest.raises(MappingError, match=r"decoder\.layers\.2\.mlp\.linear_fc2\.weight"):
        megatron_to_hf_groups(fewer, config, tie_word_embedding=False, value_model=False)
    config.num_hidden_layers = 5
    with pytest.raises(MappingError, match="not in the checkpoint"):
        megatron_to_hf_groups(metas, config, tie_word_embedding=False, value_model=False)


def test_metadata_unpickler_refuses_code(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "dist_ckpt"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=r"refusing to load builtins\.print"):
        read_metadata(d)


def test_unknown_safetensors_source_shard_missing(tmp_path) -> None:
    from hubexport.sources.hf import SafetensorsSource

    save_file({"a": torch.zeros(1)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(CheckpointError, match="missing"):
        SafetensorsSource(tmp_path)
