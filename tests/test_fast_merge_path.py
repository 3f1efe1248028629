"""The torch-free merge (`hubexport/fast_merge.py`) against the full path it repeats: for every FSDP layout of the
test matrix, a second merge of the same checkpoint writes the first merge's folder byte for byte and reports the
same result; it imports neither torch nor transformers; and whatever it cannot vouch for (a changed tensor, config
or rank file, a pickle naming anything else) goes to the full path, whose checks and errors stay as they were. The
full path itself reads such rank files without torch's unpickler (`sources/fsdp_located.py`), bit for bit as the
DTensor source does."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from hubexport import fast_merge
from hubexport.detect import detect
from hubexport.dist import Dist
from hubexport.errors import CheckpointError, ConfigError
from hubexport.executor import execute, merge
from hubexport.mapping.ops import same_bytes
from hubexport.options import MergeOptions, Output
from hubexport.sources.fsdp import FsdpSource
from hubexport.sources.fsdp_files import locate
from hubexport.sources.fsdp_located import LocatedFsdpSource
from hubexport.sources.torchsave import Unreadable, read_archive
from tests.fastpath import (
    assert_a_repeated_merge_is_torch_free,
    assert_other_options_and_config_miss,
    assert_the_second_merge_is_the_first,
    fast_and_full_after_a_change,
    folder_bytes,
    merge_each_twice,
)
from tests.fsdp_cases import CASES, actor_dir

# Dim-1 sharding (odd vocab) and the MoE models whose experts transformers converts on saving take the full path;
# every other layout verl writes (world size 1, FSDP1 and FSDP2, uneven shards, HSDP, critics) is repeated without
# torch.
FULL_PATH_ONLY = {"qwen2_fsdp2_w2_dim1", "qwen3moe_fsdp2_w2", "qwen3moe_fsdp1_w4_bf16", "dsv3_fsdp2_w2"}


def _silent(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(fsdp_root, tmp_path_factory):
    actors = {name: (actor_dir(fsdp_root, name), actor_dir(fsdp_root, name).parent) for name in CASES}
    return merge_each_twice(actors, tmp_path_factory.mktemp("fastpath"))


def test_the_layouts_that_take_the_fast_path(runs):
    assert {name for name, (took, *_) in runs.items() if not took} == FULL_PATH_ONLY


@pytest.mark.parametrize("name", list(CASES))
def test_the_second_merge_writes_the_first_ones_folder_byte_for_byte(name, runs):
    assert_the_second_merge_is_the_first(runs[name])


def test_a_repeated_merge_imports_neither_torch_nor_transformers(fsdp_root, tmp_path):
    assert_a_repeated_merge_is_torch_free(actor_dir(fsdp_root, "qwen3_fsdp2_w2_tied"), tmp_path, planned_beside=True)


@pytest.fixture
def primed(fsdp_root, tmp_path, monkeypatch):
    """A tied FSDP1 checkpoint copied into tmp_path, merged once (its recipe recorded in a fresh cache)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    step = tmp_path / "ckpt" / "global_step_1"
    shutil.copytree(actor_dir(fsdp_root, "llama_fsdp1_w2_tied_bf16").parent, step)
    actor = step / "actor"
    merge(actor, Output(tmp_path / "first"), log=_silent)
    job = fast_merge.job(actor, MergeOptions())
    assert job is not None and job.recipe.checks == (("lm_head.weight", "model.embed_tokens.weight"),)
    job.close()
    return actor


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch hubexport-pwned",))


def _flip_byte(actor: Path, name: str) -> None:
    rank, offset, _ = locate(sorted(actor.glob("model_world_size_*_rank_*.pt")))[name].runs[0]
    path = sorted(actor.glob("model_world_size_*_rank_*.pt"))[rank]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_an_untied_lm_head_goes_to_the_full_path_which_refuses_it(primed, tmp_path):
    _flip_byte(primed, "lm_head.weight")
    assert fast_merge.job(primed, MergeOptions()) is None
    with pytest.raises(ConfigError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        merge(primed, Output(tmp_path / "second"), log=_silent)
    assert not (tmp_path / "second").exists()


def test_changed_weights_are_copied_as_they_are_now(primed, tmp_path):
    """The recipe holds names, shapes and headers, never bytes: a later step of the same run is merged fast."""
    _flip_byte(primed, "model.norm.weight")
    second, full = fast_and_full_after_a_change(primed, tmp_path)
    assert second == full != folder_bytes(tmp_path / "first")


def test_another_config_or_option_is_not_the_recorded_merge(primed, tmp_path):
    assert_other_options_and_config_miss(primed)
    result = merge(primed, Output(tmp_path / "second"), log=_silent)
    assert json.loads((tmp_path / "second" / "config.json").read_text())["rms_norm_eps"] == 1e-5
    assert result.architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("writers", [1, 3])
def test_files_written_side_by_side_are_the_same_files(primed, writers, tmp_path):
    """However many files are written at a time, each is the one-at-a-time file, and reaches `on_file` in order."""
    options = MergeOptions(max_shard_size="4KB")
    merge(primed, Output(tmp_path / "full"), options, log=_silent)  # records this shard size's merge
    job = fast_merge.job(primed, options, writers=writers)
    assert job is not None and len(job.files) > 3 and job.writers == writers
    heard: list[str] = []
    try:
        execute(job, Output(tmp_path / "fast"), "merge", Dist.from_env(), _silent,
                on_file=lambda f, path: heard.append(f.name))
    finally:
        job.close()
    assert heard == [f.name for f in job.files]
    assert folder_bytes(tmp_path / "fast") == folder_bytes(tmp_path / "full")


def test_a_failed_file_is_the_error_and_every_writer_has_stopped(primed, tmp_path):
    """The failing file's own error is raised (not another writer's stop), once no writer writes any more."""
    options = MergeOptions(max_shard_size="4KB")
    merge(primed, Output(tmp_path / "full"), options, log=_silent)
    job = fast_merge.job(primed, options, writers=2)
    assert job is not None and len(job.files) > 4
    second = job.files[1].name
    (tmp_path / "out" / second).mkdir(parents=True)  # it cannot be opened for writing
    try:
        with pytest.raises(IsADirectoryError, match=second):
            job.write(tmp_path / "out", Dist.from_env())
    finally:
        job.close()
    left = {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir()}
    time.sleep(0.2)
    assert {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir()} == left


def test_a_rank_file_the_reader_does_not_know_goes_to_the_full_path(primed, tmp_path):
    """A rank file torch's weights-only loader refuses: the fast path never opens it as a checkpoint, and the full
    path's error names the file."""
    evil = primed / "model_world_size_2_rank_1.pt"
    torch.save({"x": torch.zeros(2), "why": _Payload()}, evil)
    assert fast_merge.job(primed, MergeOptions()) is None
    with pytest.raises(CheckpointError, match=r"model_world_size_2_rank_1\.pt contains objects other than tensors"):
        merge(primed, Output(tmp_path / "second"), log=_silent)
    assert not Path("hubexport-pwned").exists()


def test_the_reader_calls_nothing_the_file_names(tmp_path):
    """A pickle that would run a command when unpickled is refused by the allowlist before anything runs."""
    torch.save({"w": torch.ones(3), "x": _Payload()}, tmp_path / "model_world_size_1_rank_0.pt")
    with pytest.raises(Unreadable, match="system"):
        read_archive(tmp_path / "model_world_size_1_rank_0.pt")
    assert not (tmp_path / "hubexport-pwned").exists() and not Path("hubexport-pwned").exists()


def test_the_reader_finds_each_storage_where_torch_maps_it(tmp_path):
    """Byte ranges from the zip's local headers hold exactly the tensor bytes torch itself loads."""
    tensors = {"a": torch.randn(5, 7), "b": torch.arange(12, dtype=torch.int64)[3:9], "c": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(tensors, tmp_path / "t.pt")
    archive = read_archive(tmp_path / "t.pt")
    raw = (tmp_path / "t.pt").read_bytes()
    for name, t in tensors.items():
        offset, length = archive.byte_range(archive.obj[name])
        assert raw[offset:offset + length] == t.contiguous().view(torch.uint8).numpy().tobytes(), name
    assert archive.byte_range(archive.obj["a"]) is not None
    assert read_archive(tmp_path / "t.pt").obj["b"].offset == 3


@pytest.mark.parametrize("name", list(CASES))
def test_the_located_source_reads_what_torch_reads(name, fsdp_root):
    """The full path reads rank files without torch's unpickler when every tensor is byte runs: the same specs and
    the same bits as the DTensor source, tensor by tensor (only dim-1 sharding is left to the DTensor source)."""
    files = detect(actor_dir(fsdp_root, name)).files
    located = locate(files)
    assert (located is None) == (name == "qwen2_fsdp2_w2_dim1")
    if located is None:
        return
    ours, torchs = LocatedFsdpSource(files, located), FsdpSource(files)
    try:
        assert ours.metas() == torchs.metas()
        for n in ours.metas():
            assert same_bytes(ours.read(n), torchs.read(n)), n
    finally:
        ours.close()
        torchs.close()


def test_a_buffer_that_differs_between_ranks_is_refused(fsdp_root, tmp_path):
    """A plain tensor every rank holds must be the same on every rank, whichever source reads it."""
    shutil.copytree(actor_dir(fsdp_root, "dsv3_fsdp2_w2"), tmp_path / "actor")
    files = detect(tmp_path / "actor").files
    name, t = next((n, t) for n, t in locate(files).items() if t.replicas)
    rank, offset, _ = t.replicas[0]
    with open(files[rank], "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    for source in (LocatedFsdpSource(files, locate(files)), FsdpSource(files)):
        try:
            with pytest.raises(CheckpointError, match=re.escape(f"{name} differs between {files[0].name} and "
                                                                f"{files[rank].name}")):
                source.read(name)
        finally:
            source.close()
