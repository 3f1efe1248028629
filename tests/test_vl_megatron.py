"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE on the Megatron side, through the CLI: `merge` of a checkpoint saved by
verl's Megatron module tree (tests/fixtures_vl.py) gives exactly what save_pretrained wrote, with the same logits
(text and image); `to-megatron` writes what that model loads, key for key, and the round trip is bit-exact; a
Qwen3-VL-MoE folder with the published expert layout converts to the same checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hubexport.cli import cli
from hubexport.sources.hf import SafetensorsSource
from tests.fixtures_vl import IMAGE, KINDS, run_vl_jobs
from tests.mcore_check import assert_same_tensors
from tests.test_to_megatron import stored

pytestmark = pytest.mark.slow
CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def run(*args: str) -> None:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output


def logits(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-only logits, and logits of a prompt with one image (a 1×4×4 patch grid = one merged image token)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    model = getattr(transformers, cfg["architectures"][0]).from_pretrained(model_dir).eval()
    v = cfg["vision_config"]
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(16, v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2, generator=g)
    ids = torch.tensor([[3, 17, 97, IMAGE, IMAGE, IMAGE, IMAGE, 96, 42, 7]])
    with torch.no_grad():
        text = model(torch.tensor([[3, 17, 42, 90, 7, 64, 23, 5]])).logits
        image = model(ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]),
                      mm_token_type_ids=(ids == IMAGE).long()).logits
    return text, image


@pytest.mark.parametrize("kind", KINDS)
def test_merge_gives_save_pretrained_and_its_logits(vl_checkpoints, tmp_path, kind) -> None:
    hf, actor = vl_checkpoints[kind]
    out = tmp_path / "out"
    run("merge", "--backend", "megatron", "--local-dir", str(actor), "--target-dir", str(out))
    assert_same_tensors(out, hf)  # same names as save_pretrained, bit-exact, vision tower included
    assert json.loads((out / "config.json").read_text())["architectures"] == [CLASSES[kind]]
    for got, want in zip(logits(out), logits(hf), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_to_megatron_round_trip_is_bit_exact(vl_checkpoints, tmp_path, kind) -> None:
    hf, _ = vl_checkpoints[kind]
    actor = tmp_path / "global_step_1" / "actor"
    run("to-megatron", "--hf-model-path", str(hf), "--output-path", str(actor / "dist_ckpt"), "--test")
    keys = stored(actor / "dist_ckpt")
    assert "vision_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys  # TE names, stacked
    assert "language_model.decoder.layers.self_attention.linear_qkv.weight" in keys
    if kind == "qwen3_vl_moe":  # megatron's MoE layout: the TE norm name, experts stacked under a layer and expert axis
        assert "language_model.decoder.layers.pre_mlp_layernorm.weight" in keys
        assert keys["language_model.decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape == (2, 4, 48, 64)
    (actor / "huggingface").mkdir()
    (actor / "huggingface" / "config.json").write_text((hf / "config.json").read_text())
    run("merge", "--backend", "megatron", "--local-dir", str(actor), "--target-dir", str(tmp_path / "back"))
    assert_same_tensors(tmp_path / "back", hf)


def test_to_megatron_output_is_what_the_model_saves_and_loads(vl_checkpoints, tmp_path) -> None:
    """--spec local (the spec the CPU model has): the same keys and values as megatron-core's own save of the model,
    and `dist_checkpointing.load` into that model (default strictness) restores every tensor with nothing unmatched."""
    jobs = []
    for kind in KINDS:
        hf, actor = vl_checkpoints[kind]
        ours = tmp_path / kind / "dist_ckpt"
        run("to-megatron", "--hf-model-path", str(hf), "--output-path", str(ours), "--spec", "local")
        got, want = stored(ours), stored(actor / "dist_ckpt")
        want = {k: v for k, v in want.items() if not k.startswith(("lr_scheduler", "rng_state"))}
        assert sorted(got) == sorted(want), kind
        assert all(torch.equal(got[k], want[k]) for k in want), kind
        jobs.append({"hf": str(hf), "ckpt": str(ours), "out": str(tmp_path / f"{kind}.json")})
    run_vl_jobs(jobs)
    for kind in KINDS:
        report = json.loads((tmp_path / f"{kind}.json").read_text())
        assert report["loaded"] > 40 and report["differ"] == [], (kind, report)
        assert report["checkpoint_only"] == [] and report["model_only"] == [], (kind, report)


def published(hf: Path, out: Path) -> Path:
    """The folder as the Hub publishes Qwen3-VL-MoE (and mbridge reads it): fused experts [E, H, 2I] / [E, I, H]."""
    shutil.copytree(hf, out)
    f = out / "model.safetensors"
    with safe_open(str(f), "pt") as r:
        meta = r.metadata()
    sd = load_file(f)
    save_file({k: v.transpose(1, 2).contiguous() if k.endswith(FUSED) else v for k, v in sd.items()}, f, metadata=meta)
    return out


def test_published_expert_layout_converts_like_save_pretrained(vl_checkpoints, tmp_path) -> None:
    """transformers loads the transposed folder as the same model (the layout it converts from on load); to-megatron
    writes the same checkpoint from it, --test comparing with the folder's own layout, and merge gives
    save_pretrained's layout back."""
    hf, _ = vl_checkpoints["qwen3_vl_moe"]
    pub = published(hf, tmp_path / "hf_published")
    with safe_open(str(pub / "model.safetensors"), "pt") as r:
        assert r.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape() == [4, 64, 48]
    # compared as loaded tensors, not logits: CPU kernels round differently on mmapped and freshly allocated weights
    loaded = [transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(d).state_dict() for d in (pub, hf)]
    assert sorted(loaded[0]) == sorted(loaded[1]) and all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[1])
    for name, folder in (("saved", hf), ("published", pub)):
        run("to-megatron", "--hf-model-path", str(folder), "--output-path", str(tmp_path / name / "dist_ckpt"),
            "--test")
    got, want = stored(tmp_path / "published" / "dist_ckpt"), stored(tmp_path / "saved" / "dist_ckpt")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    actor = tmp_path / "published"
    (actor / "huggingface").mkdir()
    (actor / "huggingface" / "config.json").write_text((hf / "config.json").read_text())
    run("merge", "--backend", "megatron", "--local-dir", str(actor), "--target-dir", str(tmp_path / "back"))
    assert_same_tensors(tmp_path / "back", hf)


def test_to_megatron_reads_each_fused_expert_tensor_once(vl_checkpoints, tmp_path, monkeypatch) -> None:
    """A fused tensor feeds E megatron tensors: the writer gets them from one read, not one read per expert."""
    hf, _ = vl_checkpoints["qwen3_vl_moe"]
    reads: list[str] = []
    read = SafetensorsSource.read
    monkeypatch.setattr(SafetensorsSource, "read", lambda self, name: reads.append(name) or read(self, name))
    run("to-megatron", "--hf-model-path", str(hf), "--output-path", str(tmp_path / "dist_ckpt"))
    fused = [n for n in reads if n.endswith(FUSED)]
    assert len(fused) == 4 and sorted(fused) == sorted(set(fused)), fused  # 2 layers × (gate_up, down), once each
