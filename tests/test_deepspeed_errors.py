"""Bad DeepSpeed input: one line naming the file and the fix, exit code 2, nothing written at the target, and the
input left as it was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubexport.errors import ConfigError
from hubexport.executor import merge
from hubexport.options import Output
from hubexport.sources.deepspeed import load_ds_file
from tests.deepspeed_cases import local_dir
from tests.test_fsdp_errors import assert_clean_failure, merge_cli
from tests.tree import tree_hash

OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


@pytest.fixture
def z3(deepspeed_root, tmp_path) -> Path:
    """A private, damageable copy of the ZeRO-3 Trainer checkpoint (checkpoint-1/ with latest, global_step1/)."""
    dst = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(local_dir(deepspeed_root, "trainer_zero3_qwen2_tied"), dst)
    return dst


@pytest.fixture
def z1(deepspeed_root, tmp_path) -> Path:
    """The ZeRO-1 bf16 Trainer checkpoint (bf16_ optimizer files, one mp_rank_00_model_states.pt)."""
    dst = tmp_path / "run" / "checkpoint-1"
    shutil.copytree(local_dir(deepspeed_root, "trainer_zero1_qwen2_bf16"), dst)
    return dst


def refused(src: Path, target: Path, *needles: str) -> None:
    before = tree_hash(src)
    assert_clean_failure(merge_cli(src, target), target, *needles)
    assert tree_hash(src) == before


def test_missing_optimizer_rank_file(z3, tmp_path):
    (z3 / "global_step1" / OPTIM.format(1)).unlink()
    refused(z3, tmp_path / "o", OPTIM.format(1), "is missing")


def test_missing_model_states_rank_file(z3, tmp_path):
    (z3 / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    refused(z3, tmp_path / "o", "zero_pp_rank_0_mp_rank_00_model_states.pt is missing")


def test_missing_last_optimizer_rank_file_zero1(z1, tmp_path):
    (z1 / "global_step1" / f"bf16_{OPTIM.format(1)}").unlink()  # nothing else names rank 1: the pickle says 2 ranks
    refused(z1, tmp_path / "o", f"bf16_{OPTIM.format(1)} is missing", "2 ranks")


def test_missing_model_states(z1, tmp_path):
    (z1 / "global_step1" / "mp_rank_00_model_states.pt").unlink()
    refused(z1, tmp_path / "o", "has no model states", "mp_rank_00_model_states.pt")


def test_truncated_optimizer_file(z3, tmp_path):
    f = z3 / "global_step1" / OPTIM.format(0)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused(z3, tmp_path / "o", OPTIM.format(0), "truncated")


def test_save_that_never_wrote_latest(z3, tmp_path):
    (z3 / "latest").unlink()  # save_checkpoint writes it after every rank's files
    refused(z3, tmp_path / "o", "latest is missing", "did not finish", "global_step1")


def test_latest_naming_a_missing_step(z3, tmp_path):
    (z3 / "latest").write_text("global_step7")
    refused(z3, tmp_path / "o", "latest names 'global_step7'")


def test_save_that_wrote_no_optimizer_states(z1, tmp_path):
    for f in (z1 / "global_step1").glob("*_optim_states.pt"):
        f.unlink()
    refused(z1, tmp_path / "o", "zero_pp_rank_*_mp_rank_00_optim_states.pt", "did not finish")


def test_mixed_world_sizes(z3, tmp_path):
    """A save of 3 ranks over one of 2: every file count matches, the partition counts saved inside do not."""
    step = z3 / "global_step1"
    shutil.copy(step / OPTIM.format(1), step / OPTIM.format(2))
    shutil.copy(step / "zero_pp_rank_1_mp_rank_00_model_states.pt", step / "zero_pp_rank_2_mp_rank_00_model_states.pt")
    refused(z3, tmp_path / "o", OPTIM.format(0), "2 data-parallel ranks", "3 optimizer files")


def test_mixed_bf16_and_fp32_saves(z1, tmp_path):
    step = z1 / "global_step1"
    shutil.copy(step / f"bf16_{OPTIM.format(1)}", step / OPTIM.format(1))
    refused(z1, tmp_path / "o", "both bf16_zero_pp_rank_* and zero_pp_rank_*")


def _rewrite(path: Path, **changes) -> None:
    """Re-save an optimizer file with changed entries (the DeepSpeed objects replaced by plain data)."""
    sd = load_ds_file(path)
    osd = {k: v for k, v in sd["optimizer_state_dict"].items() if k not in ("loss_scaler", "param_slice_mappings")}
    torch.save({**sd, "optimizer_state_dict": {**osd, **changes}}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # the loaded tensors map the old file: never truncate it under them


def test_unknown_zero_stage(z1, tmp_path):
    for r in range(2):
        _rewrite(z1 / "global_step1" / f"bf16_{OPTIM.format(r)}", zero_stage=5)
    refused(z1, tmp_path / "o", "records ZeRO stage 5")


def test_partition_of_another_size(z1, tmp_path):
    f = z1 / "global_step1" / f"bf16_{OPTIM.format(1)}"
    sd = load_ds_file(f)
    flat = sd["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    _rewrite(f, single_partition_of_fp32_groups=[t[: t.numel() - 8].clone() for t in flat])
    refused(z1, tmp_path / "o", "partitions of different sizes")


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_code_in_a_state_file_is_refused_not_run(z3, tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Evil(sentinel)}, z3 / "global_step1" / OPTIM.format(0))
    refused(z3, tmp_path / "o", OPTIM.format(0), "refused unread")
    assert not sentinel.exists()


def test_model_parallel_save_is_refused(z3, tmp_path):
    step = z3 / "global_step1"
    shutil.copy(step / OPTIM.format(0), step / "zero_pp_rank_0_mp_rank_01_optim_states.pt")
    refused(z3, tmp_path / "o", "model- or pipeline-parallel")


def test_no_config_says_where_it_looked(z3, tmp_path):
    (z3 / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config\.json beside the DeepSpeed checkpoint .*global_step1_hf"):
        merge(z3, Output(tmp_path / "o"), log=lambda _: None)
    assert not (tmp_path / "o").exists()


def _prefixed(obj, prefix: str):
    """Every parameter/buffer name in a model-states structure with `prefix` in front (keys and listed names)."""
    if isinstance(obj, dict):
        return type(obj)((prefix + k if k.startswith("model.") or k == "lm_head.weight" else k, _prefixed(v, prefix))
                         for k, v in obj.items())
    if isinstance(obj, list):
        return [_prefixed(v, prefix) for v in obj]
    return prefix + obj if isinstance(obj, str) and (obj.startswith("model.") or obj == "lm_head.weight") else obj


def test_a_wrapper_prefix_on_every_name_is_removed(z3, tmp_path, deepspeed_root):
    """A model wrapped once more before deepspeed.initialize saves `module.`-prefixed names: the same model."""
    for f in (z3 / "global_step1").glob("*_model_states.pt"):
        sd = load_ds_file(f)
        torch.save({k: _prefixed(v, "module.") if k in ("module", "param_shapes", "shared_params", "buffer_names",
                                                           "frozen_param_shapes", "frozen_param_fragments") else v
                    for k, v in sd.items()}, f.with_suffix(".tmp"))
        os.replace(f.with_suffix(".tmp"), f)
    assert "module.model.embed_tokens.weight" in load_ds_file(z3 / "global_step1" / OPTIM.format(0).replace(
        "optim", "model"))["param_shapes"][0]
    result = merge(z3, Output(tmp_path / "o"), log=lambda _: None)
    assert any("'module.'" in n for n in result.notes)
    want = load_file(deepspeed_root / "trainer_zero3_qwen2_tied" / "expected" / "state_dict.safetensors")
    got = load_file(tmp_path / "o" / "model.safetensors")
    assert set(got) == set(want) - {"lm_head.weight"} and all(torch.equal(got[k], want[k]) for k in got)
