"""Architecture names, one function for both directions: FSDP2's class prefix stripped (the name taken from a real
fully_shard-ed model), the class inferred from model_type and the head when `architectures` is absent, and an
unknown name still the clear error it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, DeepseekV3Config, Qwen2Config, Qwen2ForCausalLM

from hubexport.core import TensorSpec
from hubexport.errors import ConfigError
from hubexport.mapping.archnames import model_class, strip_fsdp_prefix
from hubexport.mapping.hf_native import architecture_for, meta_model, saved_groups
from hubexport.mapping.hf_to_mcore import hf_to_megatron_plan
from hubexport.mapping.mcore_to_hf import megatron_to_hf_groups
from hubexport.sources.hf import SafetensorsSource

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def fsdp2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 saved the way save_pretrained did on a fully_shard-ed model before transformers stripped the
    prefix: architectures = [the class name FSDP2 gives the model]."""
    from torch.distributed.fsdp import fully_shard

    folder = tmp_path_factory.mktemp("fsdp2") / "model"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    model.save_pretrained(folder)
    assert not torch.distributed.is_initialized()
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder.parent / 'rdzv'}", rank=0, world_size=1)
    try:
        fully_shard(model)
        name = type(model).__name__
    finally:
        torch.distributed.destroy_process_group()
    assert name == "FSDPQwen2ForCausalLM"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": [name]}))
    return folder


def test_fsdp2_prefix_is_stripped_with_a_note(fsdp2_folder: Path) -> None:
    config = AutoConfig.from_pretrained(fsdp2_folder)
    assert config.architectures == ["FSDPQwen2ForCausalLM"]
    name, notes = model_class(config, value_model=False)
    assert name == "Qwen2ForCausalLM"
    assert len(notes) == 1 and "FSDPQwen2ForCausalLM" in notes[0] and "FSDP2" in notes[0]
    assert model_class(config, value_model=True)[0] == "Qwen2ForTokenClassification"


def test_fsdp_direction_builds_the_real_class(fsdp2_folder: Path) -> None:
    config = AutoConfig.from_pretrained(fsdp2_folder)
    name, _ = architecture_for(config, value_model=False)
    model = meta_model(config, name, trust_remote_code=False)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    specs = SafetensorsSource(fsdp2_folder).metas()
    outputs = {o.name for g in saved_groups(model, specs) for o in g.outputs}
    assert outputs == set(specs)


def _mcore_metas(hf: dict[str, TensorSpec], config) -> dict[str, TensorSpec]:
    return {o.name: o for o in hf_to_megatron_plan(hf, config).outputs}


def test_megatron_direction_writes_the_real_class(fsdp2_folder: Path) -> None:
    config = AutoConfig.from_pretrained(fsdp2_folder)
    hf = SafetensorsSource(fsdp2_folder).metas()
    plan = hf_to_megatron_plan(hf, config)
    assert plan.architecture == "Qwen2ForCausalLM" and any("FSDP2" in n for n in plan.notes)
    notes: list[str] = []
    _, updates = megatron_to_hf_groups(_mcore_metas(hf, config), config, notes=notes)
    assert updates["architectures"] == ["Qwen2ForCausalLM"] and any("FSDP2" in n for n in notes)


def test_missing_architectures_inferred_from_model_type_and_head(fsdp2_folder: Path) -> None:
    config = AutoConfig.from_pretrained(fsdp2_folder)
    config.architectures = None
    hf = SafetensorsSource(fsdp2_folder).metas()
    notes: list[str] = []
    _, updates = megatron_to_hf_groups(_mcore_metas(hf, config), config, notes=notes)
    assert updates["architectures"] == ["Qwen2ForCausalLM"]
    assert any("no architectures" in n and "'qwen2'" in n and "language-model head" in n for n in notes)
    critic = {n: s for n, s in hf.items() if n != "lm_head.weight"} | {
        "score.weight": TensorSpec("score.weight", (1, TINY["hidden_size"]), torch.float32)}
    notes = []
    _, updates = megatron_to_hf_groups(_mcore_metas(critic, config), config, notes=notes)
    assert updates["architectures"] == ["Qwen2ForTokenClassification"]
    assert any("score value head" in n for n in notes)
    name, notes = architecture_for(config, value_model=True)
    assert name == "Qwen2ForTokenClassification" and notes
    ds = DeepseekV3Config()
    ds.architectures = None
    assert model_class(ds, value_model=False)[0] == "DeepseekV3ForCausalLM"


def test_unknown_names_stay_unknown() -> None:
    for name in ("FSDPNoSuchModelForCausalLM", "NoSuchModelForCausalLM", "FSDP"):
        assert strip_fsdp_prefix(name) == name
    config = Qwen2Config(**TINY)
    config.architectures = ["FSDPNoSuchModelForCausalLM"]
    name, notes = model_class(config, value_model=False)
    assert (name, notes) == ("FSDPNoSuchModelForCausalLM", [])
    with pytest.raises(ConfigError, match="architecture 'FSDPNoSuchModelForCausalLM' is unknown to transformers"):
        meta_model(config, name, trust_remote_code=False)
    config.architectures = ["Qwen2ForCausalLM"]
    assert model_class(config, value_model=False) == ("Qwen2ForCausalLM", [])
