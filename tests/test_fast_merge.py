"""The fast paths of a merge, each against the slow one it replaces: FSDP2 Shard(0) tensors copied file to file
equal the assembled tensors, the sha256 of a file written from copied slices and from memory is the file's real
digest, the cached save_pretrained names give the groups the meta model gives, and a cached merge never imports
transformers' modeling code."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from hubexport.core import FileSlices, TensorSpec
from hubexport.mapping import native_cache
from hubexport.mapping.hf_native import meta_model, native_groups, saved_groups
from hubexport.sources.fsdp import FsdpSource
from hubexport.writers.safetensors import copy_slices, tensor_bytes, write_file
from tests.fsdp_cases import CASES, actor_dir


def _rank_files(actor: Path) -> list[Path]:
    return sorted(actor.glob("model_world_size_*_rank_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def _slice_bytes(slices: FileSlices) -> bytes:
    return b"".join(os.pread(fd, n, off) for fd, off, n in slices.parts)


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_slices_appends_exactly_those_bytes(tmp_path, kernel):
    data = os.urandom(3 << 20)
    (tmp_path / "src").write_bytes(data)
    parts = [(5, 1 << 20), (2 << 20, 7), (0, 0), (100, (2 << 20) + 11)]
    src = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        with open(tmp_path / "dst", "wb") as f:
            f.write(b"head")
            f.flush()
            copy_slices(FileSlices(tuple((src, o, n) for o, n in parts)), f.fileno(), kernel=kernel)
    finally:
        os.close(src)
    assert (tmp_path / "dst").read_bytes() == b"head" + b"".join(data[o:o + n] for o, n in parts)


def test_sha256_is_the_files_digest_with_copied_and_written_tensors(tmp_path):
    """Tensors from memory and tensors copied from another file, interleaved: the digest hashed alongside (memory)
    and read back (copies) is the digest of the file as it lies on disk, and safetensors reads every tensor."""
    tensors = {f"t{i}": torch.randn(64 + i, 33).to(torch.bfloat16) for i in range(6)}
    blob = b"".join(tensor_bytes(t).tobytes() for t in tensors.values())
    (tmp_path / "blob").write_bytes(b"xx" + blob)
    fd = os.open(tmp_path / "blob", os.O_RDONLY)
    offsets, at = {}, 2
    for k, t in tensors.items():
        offsets[k], at = at, at + t.numel() * 2
    specs = [TensorSpec(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    try:
        sha = write_file(tmp_path / "x.safetensors", specs,
                         lambda s: FileSlices(((fd, offsets[s.name], s.nbytes),)) if int(s.name[1:]) % 2 else tensors[s.name])
    finally:
        os.close(fd)
    assert sha == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_writer_refuses_slices_unlike_the_plan(tmp_path):
    (tmp_path / "blob").write_bytes(bytes(100))
    fd = os.open(tmp_path / "blob", os.O_RDONLY)
    try:
        with pytest.raises(AssertionError, match="planned"):
            write_file(tmp_path / "x.safetensors", [TensorSpec("w", (4, 4), torch.float32)],
                       lambda s: FileSlices(((fd, 0, 60),)))
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["qwen2_fsdp2_w2_dim1", "qwen2_fsdp2_w3", "qwen2_hsdp_fsdp2_w4",
                                  "llama_fsdp1_w2_tied_bf16", "qwen3moe_fsdp2_w2"])
def test_file_slices_hold_the_assembled_tensor(name, fsdp_root):
    """Wherever the source offers slices, their bytes are the assembled tensor's; FSDP2's Shard(0) tensors (even
    uneven ones, and HSDP's replicated groups) all have them, a dim-1 shard never."""
    src = FsdpSource(_rank_files(actor_dir(fsdp_root, name)))
    try:
        offered = {}
        for tensor, spec in src.metas().items():
            slices = src.slices(tensor)
            if slices is not None:
                assert _slice_bytes(slices) == tensor_bytes(src.read(tensor)).tobytes(), tensor
                offered[tensor] = spec
    finally:
        src.close()
    if CASES[name].fsdp == 2:
        assert len(offered) == len(src.metas()) - (name == "qwen2_fsdp2_w2_dim1") * 2  # embed_tokens, lm_head
    if name == "qwen2_fsdp2_w2_dim1":
        assert "model.embed_tokens.weight" not in offered and "lm_head.weight" not in offered


CONFIGS = ["qwen2_fsdp2_w2_dim1", "qwen3_fsdp2_w2_tied", "qwen2_critic_fsdp2_w2", "llama_legacy_w1"]


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_names_give_the_meta_models_groups(name, fsdp_root, tmp_path, monkeypatch):
    """A cache hit builds no model, yet gives the same groups (names, outputs, tied checks) as the meta model."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    actor = actor_dir(fsdp_root, name)
    config = AutoConfig.from_pretrained(actor if CASES[name].legacy else actor / "huggingface")
    arch = "Qwen2ForTokenClassification" if CASES[name].critic else config.architectures[0]
    if CASES[name].critic:
        config.num_labels = 1
    src = FsdpSource(_rank_files(actor)) if CASES[name].fsdp else None
    specs = src.metas() if src else {k: TensorSpec(k, tuple(v.shape), v.dtype)
                                     for k, v in torch.load(_rank_files(actor)[0], weights_only=True).items()}
    reference = saved_groups(meta_model(config, arch, trust_remote_code=False), specs)
    first = native_groups(config, arch, specs, trust_remote_code=False)  # builds, stores
    assert len(list((tmp_path / "hubexport" / "native").glob("*.json"))) == 1
    second = native_groups(config, arch, specs, trust_remote_code=False)  # from the cache
    for groups in (first, second):
        assert [(g.inputs, g.outputs, g.passthrough) for g in groups] == [
            (g.inputs, g.outputs, g.passthrough) for g in reference]
    assert any(not g.outputs for g in second) == CASES[name].tied  # the tied alias is checked, not written
    if src:
        src.close()


def test_conversions_are_never_cached(fsdp_root, tmp_path, monkeypatch):
    """Qwen3-MoE's experts are fused in memory and split on saving: its groups need the model, every time."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    actor = actor_dir(fsdp_root, "qwen3moe_fsdp2_w2")
    config = AutoConfig.from_pretrained(actor / "huggingface")
    src = FsdpSource(_rank_files(actor))
    groups = native_groups(config, config.architectures[0], src.metas(), trust_remote_code=False)
    src.close()
    assert not (tmp_path / "hubexport" / "native").exists()
    assert any(not g.passthrough and g.outputs and len(g.outputs) != len(g.inputs) for g in groups)


def test_an_unreadable_cache_entry_is_rebuilt(fsdp_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    actor = actor_dir(fsdp_root, "qwen2_fsdp2_w3")
    config = AutoConfig.from_pretrained(actor / "huggingface")
    src = FsdpSource(_rank_files(actor))
    arch = config.architectures[0]
    reference = native_groups(config, arch, src.metas(), trust_remote_code=False)
    [entry] = (tmp_path / "hubexport" / "native").glob("*.json")
    for broken in ("{not json", json.dumps({"key": entry.stem, "shapes": {"x": "y"}, "tied": {}})):
        entry.write_text(broken)
        again = native_groups(config, arch, src.metas(), trust_remote_code=False)
        assert [(g.inputs, g.outputs) for g in again] == [(g.inputs, g.outputs) for g in reference]
        assert native_cache.load(entry.stem) is not None  # rewritten whole
    src.close()


MODULES = """
import json, sys
from pathlib import Path
from hubexport.executor import merge
from hubexport.options import Output
r = merge(Path(sys.argv[1]), Output(Path(sys.argv[2])), log=lambda _: None)
print(json.dumps({"modeling": "transformers.modeling_utils" in sys.modules,
                  "dcp": "torch.distributed.checkpoint" in sys.modules, "bytes_per_s": r.throughput.bytes_per_s}))
"""


def test_a_cached_merge_imports_no_modeling_code(fsdp_root, tmp_path):
    """The first merge of a config builds the meta model; the next one reads the cache and leaves transformers'
    modeling code and torch.distributed.checkpoint unimported; both write the same bytes. (The torch-free path,
    which would take the second run, is tested in test_fast_merge_path.py.)"""
    actor = actor_dir(fsdp_root, "qwen2_fsdp2_w4")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "HUBEXPORT_NO_FAST_PATH": "1"}
    seen = []
    for run in ("cold", "warm"):
        out = subprocess.run([sys.executable, "-c", MODULES, str(actor), str(tmp_path / run)], env=env, check=True,
                             capture_output=True, text=True).stdout
        seen.append(json.loads(out.strip().splitlines()[-1]))
    assert [s["modeling"] for s in seen] == [True, False]
    assert not seen[1]["dcp"]  # (transformers' modeling code imports it on the cold run)
    assert all(s["bytes_per_s"] > 0 for s in seen)
    for f in (tmp_path / "cold").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "warm" / f.name).read_bytes()
