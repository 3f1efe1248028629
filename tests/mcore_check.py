"""Test helpers: export a Megatron checkpoint through hubexport.executor.merge and compare the result with the HF
model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from hubexport.detect import detect
from hubexport.executor import merge
from hubexport.options import MergeOptions, Output

IDS = torch.tensor([[3, 17, 42, 99, 7, 64, 23, 5], [1, 2, 3, 4, 5, 6, 7, 8]])


def export_megatron(local_dir: Path, target: Path, *, tie_word_embedding: bool = False,
                    value_model: bool = False) -> tuple[dict, list[str]]:
    """hubexport.executor.merge with the megatron backend; returns what the tests inspect."""
    notes: list[str] = []
    options = MergeOptions(backend="megatron", tie_word_embedding=tie_word_embedding, is_value_model=value_model)
    result = merge(local_dir, Output(target), options, log=notes.append)
    config = json.loads((target / "config.json").read_text())
    names = sorted(load_file(target / "model.safetensors"))
    updates = {k: config.get(k) for k in ("architectures", "tie_word_embeddings")}
    updates["num_labels"] = len(config["id2label"]) if "id2label" in config else None  # transformers 5 drops num_labels
    return {"layout": detect(local_dir, backend="megatron"), "result": result, "updates": updates,
            "tensors": names}, notes


def assert_same_tensors(out_dir: Path, ref_dir: Path) -> None:
    """Bit-exact, same names: the export must be what save_pretrained wrote for the source model."""
    got, ref = load_file(out_dir / "model.safetensors"), load_file(ref_dir / "model.safetensors")
    assert sorted(got) == sorted(ref), (sorted(set(got) - set(ref))[:5], sorted(set(ref) - set(got))[:5])
    bad = [k for k in ref if got[k].dtype != ref[k].dtype or not torch.equal(got[k], ref[k])]
    assert not bad, bad[:5]


def load_logits(model_dir: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():
        return model(ids).logits
