"""End-to-end `merge` of verl's mbridge layout: the model weights are already HF safetensors in huggingface/ (sharded,
with the source model's index), the torch_dist archive next to them holds optimizer/RNG state and no model tensor
(written here by megatron-core's own dist_checkpointing.save)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubexport.executor import merge
from hubexport.options import Output
from tests.fixtures_mcore import run_torchrun, tiny_hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory) -> Path:
    hf = tiny_hf("qwen2", tmp_path_factory.mktemp("hf") / "qwen2")
    # re-save sharded, as real models and mbridge's output are
    from transformers import AutoModelForCausalLM

    out = hf.parent / "qwen2_sharded"
    AutoModelForCausalLM.from_pretrained(hf).save_pretrained(out, max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def model_less(tmp_path_factory) -> dict[str, Path]:
    """Model-less archives written by megatron-core's own dist_checkpointing.save (torchrun, CPU patches)."""
    root = tmp_path_factory.mktemp("model_less")
    dirs = {"v1": root / "v1" / "dist_ckpt", "v2": root / "v2" / "optimizer" / "dist_ckpt"}
    run_torchrun(1, [{"model_less": True, "out": str(d)} for d in dirs.values()])
    return dirs


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_merge_mbridge_checkpoint(hf_sharded, model_less, tmp_path, layout) -> None:
    actor = tmp_path / "global_step_7" / "actor"
    hf_dir = actor / ("model/huggingface" if layout == "v2" else "huggingface")
    shutil.copytree(hf_sharded, hf_dir)
    shutil.copytree(model_less[layout], actor / ("optimizer/dist_ckpt" if layout == "v2" else "dist_ckpt"))
    if layout == "v2":
        (actor / "ckpt_contents.json").write_text(json.dumps({
            "schema_version": 2, "framework": "megatron", "world_size": 2,
            "contents": {"model": {"path": "model/huggingface", "format": "huggingface", "backend": "mbridge"}}}))
    notes: list[str] = []
    result = merge(actor, Output(tmp_path / "out"), log=notes.append)
    assert result.source_format == "megatron" and result.source_version == "mbridge"
    # v1: dist_ckpt/ is complete but model-less; v2: model/dist_ckpt/ is absent (the optimizer has its own archive)
    why = "holds no model tensors" if layout == "v1" else "is absent"
    assert result.global_step == 7 and any("mbridge" in n and why in n for n in notes)
    got: dict[str, torch.Tensor] = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(f))
    want: dict[str, torch.Tensor] = {}
    for f in hf_sharded.glob("*.safetensors"):
        want.update(load_file(f))
    assert sorted(got) == sorted(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
