"""The torch-free to-megatron (`hubexport/fast_to_mcore.py`) against the full path it repeats: a second conversion of
a folder with the same headers writes the first one's checkpoint byte for byte and reports the same result, without
importing torch, transformers or megatron-core; whatever it cannot vouch for (weights made in memory, --test, a tied
alias or a critic's bias that changed, a truncated file) goes to the full path, with its checks and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubexport import fast_to_mcore
from hubexport.errors import CheckpointError, MappingError
from hubexport.executor import to_megatron
from hubexport.options import MegatronOptions, Output
from hubexport.resolve import ResolvedModel
from tests.fastpath import facts, folder_bytes, full_then_fast, run_twice
from tests.fixtures_mcore import tiny_hf
from tests.fixtures_vl import tiny_vl

CASES = {  # name: (how to make the HF folder, spec)
    "qwen3_te": (lambda out: tiny_hf("qwen3", out), "te"),
    "qwen2_padded_vocab_local": (lambda out: tiny_hf("qwen2", out, vocab_size=200), "local"),
    "qwen2_tied": (lambda out: tiny_hf("qwen2", out, tie=True), "te"),
    "qwen2_critic": (lambda out: tiny_hf("qwen2", out, value=True), "local"),  # score.bias must stay zero
    "qwen3_moe_te": (lambda out: tiny_hf("qwen3_moe", out), "te"),
    "deepseek_v3_te": (lambda out: tiny_hf("deepseek_v3", out), "te"),  # MLA, MTP-free, per-layer keys
    "qwen2_5_vl_te": (lambda out: tiny_vl("qwen2_5_vl", out), "te"),  # the vision tower's fused qkv: rows too
    "qwen3_vl_moe_te": (lambda out: tiny_vl("qwen3_vl_moe", out), "te"),  # fused experts: made in memory
}
FULL_PATH_ONLY = {"qwen3_vl_moe_te"}


def _silent(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case converted by the full path (which records the recipe), then again with the fast path allowed."""
    out = tmp_path_factory.mktemp("fast-to-mcore")
    done = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(out / "hf-home"))
        for name, (make, spec) in CASES.items():
            hf = make(out / "hf" / name)
            options = MegatronOptions(spec=spec)
            took, full, again, untouched = full_then_fast(
                mp, lambda run, h=hf, n=name, o=options: to_megatron(h, Output(out / n / run), o, log=_silent),
                lambda h=hf, o=options: fast_to_mcore.job(ResolvedModel(h), o), hf)
            done[name] = (took, full, again, out / name, untouched)
    return done


def test_the_models_that_take_the_fast_path(runs):
    assert {name for name, (took, *_) in runs.items() if not took} == FULL_PATH_ONLY


@pytest.mark.parametrize("name", list(CASES))
def test_the_second_conversion_writes_the_first_ones_checkpoint_byte_for_byte(name, runs):
    _, full, again, folder, untouched = runs[name]
    assert folder_bytes(folder / "again") == folder_bytes(folder / "full")
    assert facts(again) == facts(full)
    assert untouched  # nothing under the HF folder was written, renamed or deleted


def test_a_repeated_conversion_imports_neither_torch_nor_transformers(tmp_path):
    hf = tiny_hf("qwen2", tmp_path / "hf")
    seen = run_twice(lambda out: ["to-megatron", "--hf-model-path", str(hf), "--output-path", str(out)], tmp_path)
    assert {"torch", "transformers"} <= set(seen[0][0])
    assert seen[1][0] == []
    assert seen[1][1]["megatron"] == seen[0][1]["megatron"]
    assert folder_bytes(tmp_path / "second") == folder_bytes(tmp_path / "first")


@pytest.fixture
def primed(tmp_path, monkeypatch):
    """A tied model that keeps its `lm_head` alias (equal to the embedding), converted once into a fresh cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    hf = tiny_hf("qwen2", tmp_path / "hf", tie=True)
    tensors = load_file(hf / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    to_megatron(hf, Output(tmp_path / "first"), log=_silent)
    job = fast_to_mcore.job(ResolvedModel(hf), MegatronOptions())
    assert job is not None and [kind for kind, *_ in job.recipe.checks] == ["equal"]
    job.close()
    return hf


def _rewrite(hf: Path, change) -> None:
    """The same header (names, shapes, dtypes, order), other bytes."""
    tensors = load_file(hf / "model.safetensors")
    change(tensors)
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})


def test_new_weights_of_the_same_shapes_are_repeated_and_equal_the_full_path(primed, tmp_path, monkeypatch):
    def train(t):
        t["model.layers.0.self_attn.q_proj.weight"] += 1
        t["model.embed_tokens.weight"] *= 2
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()

    _rewrite(primed, train)
    assert fast_to_mcore.job(ResolvedModel(primed), MegatronOptions()) is not None
    to_megatron(primed, Output(tmp_path / "fast"), log=_silent)
    monkeypatch.setenv("HUBEXPORT_NO_FAST_PATH", "1")
    to_megatron(primed, Output(tmp_path / "full"), log=_silent)
    assert folder_bytes(tmp_path / "fast") == folder_bytes(tmp_path / "full") != folder_bytes(tmp_path / "first")


def test_a_tied_alias_that_differs_gets_the_full_paths_error(primed, tmp_path):
    def untie(t):
        t["lm_head.weight"] = t["lm_head.weight"] + 1

    _rewrite(primed, untie)
    assert fast_to_mcore.job(ResolvedModel(primed), MegatronOptions()) is None
    with pytest.raises(MappingError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        to_megatron(primed, Output(tmp_path / "out"), log=_silent)
    assert not (tmp_path / "out").exists()


def test_a_critic_whose_bias_is_no_longer_zero_gets_the_full_paths_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    hf = tiny_hf("qwen2", tmp_path / "hf", value=True)
    to_megatron(hf, Output(tmp_path / "first"), log=_silent)
    assert fast_to_mcore.job(ResolvedModel(hf), MegatronOptions()) is not None

    def bias(t):
        t["score.bias"] = torch.ones_like(t["score.bias"])

    _rewrite(hf, bias)
    assert fast_to_mcore.job(ResolvedModel(hf), MegatronOptions()) is None
    with pytest.raises(MappingError, match=r"score\.bias is not zero"):
        to_megatron(hf, Output(tmp_path / "out"), log=_silent)


def test_a_truncated_file_gets_the_full_paths_error(primed, tmp_path):
    path = primed / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 64)
    assert fast_to_mcore.job(ResolvedModel(primed), MegatronOptions()) is None
    with pytest.raises(CheckpointError, match="truncated"):
        to_megatron(primed, Output(tmp_path / "out"), log=_silent)


def test_test_and_changed_options_take_the_full_path(primed, tmp_path):
    assert fast_to_mcore.job(ResolvedModel(primed), MegatronOptions(test=True)) is None
    assert fast_to_mcore.job(ResolvedModel(primed), MegatronOptions(spec="local")) is None
    r = to_megatron(primed, Output(tmp_path / "tested"), MegatronOptions(test=True), log=_silent)
    assert r.megatron.tested and folder_bytes(tmp_path / "tested") == folder_bytes(tmp_path / "first")


def test_a_changed_config_takes_the_full_path(primed, tmp_path):
    config = json.loads((primed / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (primed / "config.json").write_text(json.dumps(config))
    assert fast_to_mcore.job(ResolvedModel(primed), MegatronOptions()) is None
    to_megatron(primed, Output(tmp_path / "second"), log=_silent)  # records the new config's recipe
    job = fast_to_mcore.job(ResolvedModel(primed), MegatronOptions())
    assert job is not None
    job.close()
