"""push's publish gate on real checkpoints against the Hub emulator: a full fine-tune trained one step under torch
FSDP2 (its base found through its own huggingface/config.json), PEFT LoRA runs (trained, and never trained so every
lora_B is still zero) saved as verl saves them. What must not be published is refused before anything is sent;
what may is pushed with the weight delta in its card and a compact summary in the result JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from hubexport.cli import cli
from hubexport.diff import diff_models
from hubexport.examples import FsdpCase, LoraSpec, make_checkpoints
from hubexport.executor import merge
from hubexport.options import MergeOptions, Output
from tests.fakehub import FakeHub
from tests.hub_fixtures import USER
from tests.tensors import folder_tensors

REPO = f"{USER}/gated"
SECTION = "## Weight delta vs the base model"


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate")
    make_checkpoints([FsdpCase("ft_fsdp2_w2", save_base=True), FsdpCase("lora_w1", fsdp=0, world_size=1, lora=LoraSpec()),
                      FsdpCase("lora_untrained_w1", fsdp=0, world_size=1, lora=LoraSpec(), reference=False)], root)
    return root


@pytest.fixture(scope="module")
def merged(runs: Path, tmp_path_factory) -> Path:
    """The fine-tune merged (no card): the folder the folder-push tests start from."""
    out = tmp_path_factory.mktemp("merged") / "ft"
    merge(runs / "ft_fsdp2_w2", Output(out), log=quiet)
    return out


def actor(runs: Path, name: str) -> Path:
    return runs / name / "global_step_1" / "actor"


def push(*args: object) -> Result:
    return CliRunner().invoke(cli, ["push", *map(str, args), "--repo-id", REPO, "--license", "mit", "--private"])


def refused(r: Result, hub: FakeHub, message: str) -> None:
    """Exit 2, one error line, and not one request made to the Hub."""
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.output
    assert not hub.repos and not [p for m, p, _ in hub.requests if m in ("POST", "PUT")]


def card_on_hub(hub: FakeHub) -> str:
    return hub.files(REPO)["README.md"].data.decode()


def test_finetune_is_pushed_with_the_delta_section_in_its_card(fakehub: FakeHub, runs: Path, tmp_path: Path) -> None:
    """No base option at all: the checkpoint's huggingface/config.json names the model the run started from."""
    target = tmp_path / "kept"
    r = push(runs / "ft_fsdp2_w2", "--target-dir", target, "--json")
    assert r.exit_code == 0, r.output
    base = runs / "ft_fsdp2_w2" / "base_model"
    assert "publish gate: compared with base_model" in r.stderr and "publishable" in r.stderr
    delta = json.loads(r.stdout)["delta"]
    want = diff_models(target, base, log=quiet)  # recomputed on the kept output, independently of the push
    assert delta["identical"] is False and delta["nonfinite"] == 0 and delta["refused"] is None
    assert delta["rel_change"] == pytest.approx(want.rel_change) and 0 < delta["rel_change"] < 1
    assert delta["compared"] == len(folder_tensors(base)) and "_name_or_path" in delta["base_from"]
    card = card_on_hub(fakehub)
    assert card == (target / "README.md").read_text()
    section = card.split(SECTION, 1)[1].split("\n## ", 1)[0]
    assert "Compared tensor by tensor with `base_model`" in section and str(base) not in card
    assert "| `model.layers.*.mlp.down_proj.weight` | 2 | 0 |" in section


def test_unfused_adapter_published_as_a_merged_model_is_refused(fakehub: FakeHub, runs: Path, tmp_path: Path) -> None:
    """verl #7285: the "merged" folder holds the base weights and no adapter, so it is the base model."""
    folder = tmp_path / "merged"
    merge(actor(runs, "lora_w1"), Output(folder), MergeOptions(lora_mode="adapter"), log=quiet)
    shutil.rmtree(folder / "lora_adapter")
    base = runs / "lora_w1" / "base_model"
    refused(push(folder, "--diff-base", base), fakehub, "is identical to its base")
    assert push(folder, "--diff-base", base, "--allow-unchanged").exit_code == 0
    assert "IDENTICAL to the base" not in card_on_hub(fakehub) and "0 unchanged" not in card_on_hub(fakehub)
    assert "(100%)" in card_on_hub(fakehub)


def test_never_trained_adapter_fused_is_refused_and_the_merge_kept(fakehub: FakeHub, runs: Path,
                                                                     tmp_path: Path) -> None:
    """--lora fuse of an adapter whose lora_B are still zero: the fused model is its base. The card's --base-model,
    a local folder, is the base the gate uses; the merged folder stays for a look or a later push."""
    target = tmp_path / "fused"
    base = runs / "lora_untrained_w1" / "base_model"
    r = push(actor(runs, "lora_untrained_w1"), "--lora", "fuse", "--base-model", base, "--target-dir", target)
    refused(r, fakehub, "is identical to its base")
    assert f"the merged model is in {target}" in r.stderr
    assert diff_models(target, base, log=quiet).identical and SECTION in (target / "README.md").read_text()
    r = push(target, "--base-model", base, "--allow-unchanged")
    assert r.exit_code == 0, r.output
    assert "base_model:" not in card_on_hub(fakehub)  # a local folder is never the card's base_model


def test_adapter_export_is_published_and_a_zero_adapter_is_refused(fakehub: FakeHub, runs: Path) -> None:
    """--lora adapter keeps the base weights as they are: the adapter is the change, and it must change something."""
    r = push(actor(runs, "lora_w1"), "--lora", "adapter", "--base-model", runs / "lora_w1" / "base_model", "--json")
    assert r.exit_code == 0, r.output
    delta = json.loads(r.stdout)["delta"]
    assert delta["identical"] is True and delta["adapter_changes_weights"] is True and delta["refused"] is None
    card = card_on_hub(fakehub)
    assert "The LoRA adapter in `lora_adapter/`" in card and "changes the weights" in card
    assert "lora_adapter/adapter_model.safetensors" in fakehub.files(REPO)
    r = push(actor(runs, "lora_untrained_w1"), "--base-model", runs / "lora_untrained_w1" / "base_model")
    assert r.exit_code == 2 and "lora_adapter changes nothing: every lora_B is zero" in r.stderr
    assert fakehub.commit_count(REPO) == 2  # the seed commit and the first push: nothing more


def test_nan_tensor_is_refused_then_allowed(fakehub: FakeHub, runs: Path, merged: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(merged, tmp_path / "nan"))
    tensors = folder_tensors(folder)
    tensors["model.layers.1.self_attn.v_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), 1e9])
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    base = runs / "ft_fsdp2_w2" / "base_model"
    refused(push(folder, "--diff-base", base), fakehub, "2 NaN/Inf values in 1 tensor(s)")
    r = push(folder, "--diff-base", base, "--allow-nonfinite", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["delta"]["nonfinite"] == 2
    assert "2 NaN/Inf value(s)" in card_on_hub(fakehub)


def test_identical_model_is_refused_then_allowed(fakehub: FakeHub, runs: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(runs / "ft_fsdp2_w2" / "base_model", tmp_path / "copy"))
    refused(push(copy, "--diff-base", runs / "ft_fsdp2_w2" / "base_model"), fakehub, "is identical to its base")
    r = push(copy, "--diff-base", runs / "ft_fsdp2_w2" / "base_model", "--allow-unchanged")
    assert r.exit_code == 0, r.output
    assert "IDENTICAL to the base" not in r.stderr and "(100%)" in card_on_hub(fakehub)


def test_base_model_fully_in_the_hf_cache_is_used_without_a_request(fakehub: FakeHub, runs: Path, hf_home: Path,
                                                                    tmp_path: Path) -> None:
    """--base-model ORG/NAME: the cached snapshot is the gate's base; a snapshot missing a shard is not."""
    base = runs / "ft_fsdp2_w2" / "base_model"
    snapshot = hf_home / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(base, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    copy = Path(shutil.copytree(base, tmp_path / "copy"))
    refused(push(copy, "--base-model", "org/tiny"), fakehub, "is identical to its base")
    for f in snapshot.glob("*.safetensors"):
        f.unlink()
    r = push(copy, "--base-model", "org/tiny")
    assert r.exit_code == 0 and "no base model on this machine" in r.stderr
    # weights never downloaded (the card still reads the base's README.md and config.json, as before the gate)
    assert fakehub.paths(contains="org/tiny") and not [p for p in fakehub.paths("GET") if p.endswith(".safetensors")]


def test_no_base_on_this_machine_is_said_in_one_line(fakehub: FakeHub, merged: Path) -> None:
    r = push(merged)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if "no base model on this machine" in line]
    assert len(lines) == 1 and "--diff-base PATH|ORG/NAME" in lines[0]
    assert SECTION not in card_on_hub(fakehub)
