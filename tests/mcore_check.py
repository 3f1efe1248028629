"""Test helpers: export a Megatron checkpoint with hubexport's source + groups (until convert.merge is wired) and
compare the result with the HF model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from hubexport.detect import detect
from hubexport.mapping.mcore import megatron_to_hf_groups
from hubexport.sources.mcore import open_megatron_source

IDS = torch.tensor([[3, 17, 42, 99, 7, 64, 23, 5], [1, 2, 3, 4, 5, 6, 7, 8]])


def export_megatron(local_dir: Path, target: Path, *, tie_word_embedding: bool = False,
                    value_model: bool = False) -> tuple[dict, list[str]]:
    layout = detect(local_dir, backend="megatron")
    source = open_megatron_source(layout)
    config = transformers.AutoConfig.from_pretrained(layout.hf_dir)
    notes: list[str] = list(layout.notes)
    groups, updates = megatron_to_hf_groups(source.metas(), config, tie_word_embedding=tie_word_embedding,
                                            value_model=value_model, notes=notes)
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        produced = g.convert({n: source.read(n) for n in g.inputs})
        for spec in g.outputs:  # the plan's promise: names, shapes and dtypes known before bytes
            t = produced[spec.name]
            assert (tuple(t.shape), t.dtype) == (spec.shape, spec.dtype), spec
        out.update(produced)
    source.close()
    target.mkdir(parents=True, exist_ok=True)
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})
    config.update(updates)
    config.save_pretrained(target)
    return {"layout": layout, "updates": updates, "tensors": sorted(out)}, notes


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
