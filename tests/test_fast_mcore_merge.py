"""The torch-free merge of megatron-core torch_dist checkpoints (`hubexport/fast_merge.py` on `sources/mcore` with
dtypes by name) against the full path it repeats, on checkpoints megatron-core saved (GPTModel at TP1/TP2/PP2/
TP2×PP2/EP2, dist_checkpointing.save of DeepSeek-V3 and Mixtral): a second merge of the same checkpoint writes the
first merge's folder byte for byte and reports the same result, imports neither torch nor transformers, pastes
what TP split along columns in memory, writes a critic's missing bias as zeros, and whatever it cannot vouch for (a
changed config or option, a cut-short .distcp) goes to the full path, whose checks and errors stay as they were. A
push of the next checkpoint takes it too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import snapshot_download

from hubexport import fast_merge
from hubexport.cli import cli
from hubexport.detect import detect
from hubexport.errors import CheckpointError
from hubexport.executor import merge
from hubexport.options import MergeOptions, Output
from hubexport.sources.mcore import TorchDistSource
from tests.fastpath import (
    assert_a_repeated_merge_is_torch_free,
    assert_other_options_and_config_miss,
    assert_the_second_merge_is_the_first,
    fast_and_full_after_a_change,
    folder_bytes,
    merge_each_twice,
)
from tests.hub_fixtures import TOKEN, USER
from tests.tree import tree_hash

# Every checkpoint of the matrix: TP=2's o_proj and down_proj (split along their columns) are pasted in memory, a
# critic's score.bias (which megatron has not) is written as zeros, all without torch.
FULL_PATH_ONLY: set[str] = set()


def _silent(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def cases(mcore_tp1, mcore_tp2, mcore_pp2, mcore_tp2pp2, mcore_moe_ep2, mcore_synthetic) -> dict[str, Path]:
    return {"tp1_untied": mcore_tp1["untied"].actor, "tp1_tied": mcore_tp1["tied"].actor,
            "tp1_critic": mcore_tp1["critic"].actor, "pp2_tied_v2": mcore_pp2["tied_v2"].actor,
            "ep2_moe": mcore_moe_ep2["ep2"].actor, "tp2_untied": mcore_tp2["untied"].actor,
            "tp2_tied": mcore_tp2["tied"].actor, "tp2pp2": mcore_tp2pp2["v1"].actor,
            "mixtral": mcore_synthetic["mixtral"].actor, "deepseek_v3": mcore_synthetic["deepseek_v3"].actor}


@pytest.fixture(scope="module")
def runs(cases, tmp_path_factory):
    return merge_each_twice({name: (actor, actor) for name, actor in cases.items()}, tmp_path_factory.mktemp("fast-mcore"))


def test_the_checkpoints_that_take_the_fast_path(runs):
    assert {name for name, (took, *_) in runs.items() if not took} == FULL_PATH_ONLY


@pytest.mark.parametrize("name", ["tp1_untied", "tp1_tied", "tp1_critic", "pp2_tied_v2", "ep2_moe", "tp2_untied",
                                  "tp2_tied", "tp2pp2", "mixtral", "deepseek_v3"])
def test_the_second_merge_writes_the_first_ones_folder_byte_for_byte(name, runs):
    assert_the_second_merge_is_the_first(runs[name])


def test_the_recipe_records_row_copies(cases, runs, monkeypatch):
    """q/k/v and gate/up are byte ranges of megatron's fused tensors, named in the recipe; plain tensors are not."""
    monkeypatch.setenv("HF_HOME", str(runs["tp1_untied"][3].parent / "hf-home"))
    job = fast_merge.job(cases["tp1_untied"], MergeOptions())
    try:
        copies = {out: (src, ranges) for out, src, ranges in job.recipe.copies}
    finally:
        job.close()
    q, k = copies["model.layers.0.self_attn.q_proj.weight"], copies["model.layers.0.self_attn.k_proj.weight"]
    assert q[0] == k[0] == "decoder.layers.0.self_attention.linear_qkv.weight"
    assert q[1] and k[1] and set(q[1]).isdisjoint(k[1])
    assert copies["model.layers.0.mlp.up_proj.weight"][0] == "decoder.layers.0.mlp.linear_fc1.weight"


def test_columns_split_by_tp_are_pasted_in_memory(cases, runs, monkeypatch):
    """TP=2: o_proj and down_proj (row-parallel, split along their columns) are pasted from the two chunks' rows
    when the writer reaches them; everything else is copied file to file."""
    monkeypatch.setenv("HF_HOME", str(runs["tp2_untied"][3].parent / "hf-home"))
    job = fast_merge.job(cases["tp2_untied"], MergeOptions())
    try:
        outputs = [output for f in job.files for output in job.outputs(f)]
        pasted = {t for t, found in outputs if isinstance(found, fast_merge.Assembled)}
        every = {t for t, _ in outputs}
    finally:
        job.close()
    assert pasted == {t for t in every if ".o_proj." in t or ".down_proj." in t} != set()


def test_a_repeated_merge_imports_neither_torch_nor_transformers(cases, tmp_path):
    assert_a_repeated_merge_is_torch_free(cases["tp1_tied"], tmp_path)


@pytest.fixture(params=["tp1_untied", "tp2_untied"])
def primed(request, cases, tmp_path, monkeypatch):
    """An untied checkpoint (TP=1, TP=2) copied into tmp_path, merged once (its recipe recorded in a fresh cache)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    actor = tmp_path / "ckpt" / "global_step_3" / "actor"
    shutil.copytree(cases[request.param], actor)
    merge(actor, Output(tmp_path / "first"), log=_silent)
    return actor


def _overwrite(actor: Path, name: str, data: bytes) -> None:
    """Replace the first bytes of the logical tensor `name`'s first stored piece."""
    source = TorchDistSource(detect(actor).files[0], dtype_names=True)
    try:
        piece = source.pieces(name)[0]
    finally:
        source.close()
    with open(source.dir / piece.file, "r+b") as f:
        f.seek(piece.start)
        f.write(data[:16])


def test_changed_weights_are_copied_as_they_are_now(primed, tmp_path):
    """The recipe holds names, shapes and headers, never bytes: a later step of the same run is merged fast."""
    _overwrite(primed, "decoder.layers.1.self_attention.linear_qkv.weight", bytes(range(16)))
    _overwrite(primed, "decoder.layers.0.self_attention.linear_proj.weight", bytes(range(16, 32)))  # TP=2: pasted
    _overwrite(primed, "decoder.final_layernorm.weight", b"\x3f\x80" * 8)
    second, full = fast_and_full_after_a_change(primed, tmp_path)
    assert second == full != folder_bytes(tmp_path / "first")


def test_another_config_or_option_is_not_the_recorded_merge(primed, tmp_path):
    assert_other_options_and_config_miss(primed)
    merge(primed, Output(tmp_path / "second"), log=_silent)
    assert json.loads((tmp_path / "second" / "config.json").read_text())["rms_norm_eps"] == 1e-5


def test_a_cut_short_distcp_goes_to_the_full_path_which_names_it(primed, tmp_path):
    data = max((primed / "dist_ckpt").glob("*.distcp"), key=lambda f: f.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 100)
    assert fast_merge.job(primed, MergeOptions()) is None
    with pytest.raises(CheckpointError, match=rf"{data.name} is truncated"):
        merge(primed, Output(tmp_path / "second"), log=_silent)
    assert not (tmp_path / "second").exists()


@pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # huggingface_hub's own PUTs
def test_a_push_of_the_next_checkpoint_merges_it_without_torch(fakehub, cases, tmp_path):
    """What the Action does after each run: `push CHECKPOINT`. The first push records the merge; the next one (here:
    the same step into another repo) takes the fast path, and the Hub gets the same weight files."""
    actor = cases["tp2_untied"]
    before = tree_hash(actor)
    got = {}
    for repo in ("first", "second"):
        if repo == "second":
            job = fast_merge.job(actor, MergeOptions())
            assert job is not None  # recorded by the first push
            job.close()
        r = CliRunner().invoke(cli, ["push", str(actor), "--repo-id", f"{USER}/{repo}", "--private", "--license", "mit"])
        assert r.exit_code == 0, r.output
        folder = Path(snapshot_download(f"{USER}/{repo}", endpoint=fakehub.url, token=TOKEN, cache_dir=tmp_path / repo))
        got[repo] = {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}
    assert got["second"] == got["first"] != {}
    assert tree_hash(actor) == before
