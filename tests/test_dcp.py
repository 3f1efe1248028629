"""torch DCP model checkpoints (plain dcp.save, accelerate, NeMo RL; safetensors DCP of NeMo Automodel and torch's
HuggingFaceStorageWriter) made by real FSDP2: merged bit-exact, with save_pretrained's key set and equal logits;
shown by inspect, taken by verify --reference; bad input refused."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hubexport.cli import cli
from hubexport.errors import CheckpointError, ConfigError
from hubexport.examples import PROMPT
from hubexport.executor import merge
from hubexport.inspection import inspect, render_text
from hubexport.options import MergeOptions, Output
from hubexport.verify import verify
from tests.dcp_cases import CASES, local_dir
from tests.test_fsdp_errors import assert_clean_failure, merge_cli

VERSIONS = {"plain": "dcp", "accelerate": "accelerate", "nemo_rl": "nemo-rl", "automodel": "automodel-safetensors",
            "torch_hf": "safetensors"}


@pytest.fixture(scope="module")
def merged(dcp_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp_merged")
    return {name: (merge(local_dir(dcp_root, name), Output(out / name), log=lambda _: None), out / name) for name in CASES}


def auto_class(name):
    return transformers.AutoModelForTokenClassification if CASES[name].model.critic else transformers.AutoModelForCausalLM


def header_specs(folder: Path) -> dict[str, tuple]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            out.update({k: (tuple(sf.get_slice(k).get_shape()), sf.get_slice(k).get_dtype()) for k in sf.keys()})
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bit_exact_key_set_and_logits(name, merged, dcp_root, tmp_path):
    result, folder = merged[name]
    assert (result.source_format, result.source_version) == ("dcp", VERSIONS[CASES[name].writer])
    assert result.parallel == {"world_size": 2} and result.global_step == 1
    reference = load_file(dcp_root / name / "expected" / "state_dict.safetensors")
    model = auto_class(name).from_pretrained(folder, dtype="auto").eval()
    loaded = model.state_dict()
    assert set(loaded) == set(reference)
    for key, value in reference.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    fresh = auto_class(name).from_config(model.config, dtype=model.config.dtype)
    fresh.save_pretrained(tmp_path / "fresh")
    assert header_specs(folder) == header_specs(tmp_path / "fresh")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROMPT)).logits.float()
    tol = 2e-2 if CASES[name].model.dtype == "bfloat16" else 1e-5
    torch.testing.assert_close(logits, torch.load(dcp_root / name / "expected" / "logits.pt"), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_and_verify_take_it(name, dcp_root, merged):
    info = inspect(local_dir(dcp_root, name))
    assert (info["format"], info["version"], info["parallel"]) == ("dcp", VERSIONS[CASES[name].writer], {"world_size": 2})
    assert info["num_tensors"] == len(header_specs(merged[name][1]))
    assert f"dcp {info['version']}" in render_text(info)
    assert any("consolidated copy" in n for n in info["notes"]) == (CASES[name].writer in ("automodel", "torch_hf"))
    report = verify(merged[name][1], local_dir(dcp_root, name), log=lambda _: None)
    assert report.ok and report.compared == info["num_tensors"]


def test_verify_finds_one_ulp_against_it(dcp_root, merged, tmp_path):
    name = "accelerate_llama_tied"
    src, folder = local_dir(dcp_root, name), merged[name][1]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(bad / "model.safetensors")
    w = tensors["model.layers.1.mlp.down_proj.weight"]
    w.view(torch.int32)[0, 0] += 1  # one ulp
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    report = verify(bad, src, log=lambda _: None)
    assert [d.name for d in report.differences] == ["model.layers.1.mlp.down_proj.weight"]
    r = CliRunner().invoke(cli, ["verify", str(folder), "--reference", str(src), "--backend", "dcp"])
    assert r.exit_code == 0, r.output


@pytest.fixture
def ckpt(dcp_root, tmp_path) -> Path:
    """A private, damageable copy of the plain W=2 DCP checkpoint (actor dir with huggingface/)."""
    dst = tmp_path / "run" / "global_step_1" / "actor"
    shutil.copytree(local_dir(dcp_root, "plain_qwen2_dim1"), dst)
    return dst


def test_missing_distcp(ckpt, tmp_path):
    (ckpt / "__1_0.distcp").unlink()
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "__1_0.distcp is missing", ".metadata")


def test_truncated_distcp(ckpt, tmp_path):
    data = (ckpt / "__0_0.distcp").read_bytes()
    (ckpt / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "__0_0.distcp is truncated")


def test_metadata_naming_a_missing_file(ckpt, tmp_path):
    with open(ckpt / ".metadata", "rb") as f:
        md = pickle.load(f)  # the test's own fixture: trusted
    idx = next(iter(md.storage_data))
    md.storage_data[idx] = dataclasses.replace(md.storage_data[idx], relative_path="__7_0.distcp")
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "__7_0.distcp is missing")


def test_save_that_never_finished(ckpt, tmp_path):
    (ckpt / ".metadata").unlink()  # DCP writes .metadata last, after every rank's data
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", ".metadata is missing", "did not finish")


def test_corrupt_metadata(ckpt, tmp_path):
    (ckpt / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", ".metadata cannot be read")


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_code_in_metadata_is_refused_not_run(ckpt, tmp_path):
    sentinel = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(sentinel)))
    assert_clean_failure(merge_cli(ckpt, tmp_path / "o"), tmp_path / "o", "refusing to load")
    assert not sentinel.exists()


def test_no_config_says_where_it_looked(ckpt, tmp_path):
    shutil.rmtree(ckpt / "huggingface")
    with pytest.raises(ConfigError, match=r"no config\.json beside the DCP checkpoint .*huggingface"):
        merge(ckpt, Output(tmp_path / "o"), log=lambda _: None)
    assert not (tmp_path / "o").exists()


def test_megatron_dist_ckpt_passed_directly(ckpt, tmp_path):
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    with pytest.raises(CheckpointError, match="Megatron torch_dist folder"):
        merge(ckpt, Output(tmp_path / "o"), MergeOptions(backend="dcp"), log=lambda _: None)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_torchtitan_names_are_refused(ckpt, tmp_path):
    """torchtitan's own module names (its q/k are RoPE-permuted): refused with the way out, never half-mapped."""
    import torch.distributed.checkpoint as dcp

    step = tmp_path / "outputs" / "checkpoint" / "step-10"
    sd = {"tok_embeddings.weight": torch.randn(8, 4), "layers.0.attention.wq.weight": torch.randn(4, 4)}
    dcp.save(sd, checkpoint_id=step, no_dist=True)
    shutil.copytree(ckpt / "huggingface", step / "huggingface")
    proc = merge_cli(step, tmp_path / "o")
    assert_clean_failure(proc, tmp_path / "o", "torchtitan's own parameter names", "last_save_in_hf")


def test_fsdp_backend_does_not_take_it(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="is not a verl FSDP checkpoint"):
        merge(ckpt, Output(tmp_path / "o"), MergeOptions(backend="fsdp"), log=lambda _: None)


@pytest.fixture
def st_ckpt(dcp_root, tmp_path) -> Path:
    """A private, damageable copy of the Automodel safetensors-DCP checkpoint (epoch_0_step_1/)."""
    dst = tmp_path / "ckpts" / "epoch_0_step_1"
    shutil.copytree(local_dir(dcp_root, "automodel_qwen3_tied"), dst)
    return dst


def test_safetensors_missing_rank_file(st_ckpt, tmp_path):
    (st_ckpt / "model" / "shard-00002-model-00001-of-00002.safetensors").unlink()
    assert_clean_failure(merge_cli(st_ckpt, tmp_path / "o"), tmp_path / "o", "shard-00002-model-00001-of-00002",
                         "is missing")


def test_safetensors_missing_first_writer(st_ckpt, tmp_path):
    for f in (st_ckpt / "model").glob("shard-00001-*"):
        f.unlink()
    assert_clean_failure(merge_cli(st_ckpt, tmp_path / "o"), tmp_path / "o", "shard-00001-model-00001-of-00002",
                         "is missing")


def test_safetensors_truncated_shard(st_ckpt, tmp_path):
    f = st_ckpt / "model" / "shard-00001-model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_clean_failure(merge_cli(st_ckpt, tmp_path / "o"), tmp_path / "o", f.name, "truncated")


def test_safetensors_without_dcp_offsets(st_ckpt, tmp_path):
    f = st_ckpt / "model" / "shard-00001-model-00002-of-00002.safetensors"
    save_file(load_file(f), f)  # same tensors, no DCP_SHARDING_INFO
    assert_clean_failure(merge_cli(st_ckpt, tmp_path / "o"), tmp_path / "o", "DCP_SHARDING_INFO")
