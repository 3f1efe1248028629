"""The first merge of a model, written while the full path plans it in a second process (`hubexport/first_merge.py`).
Run as users run it (a fresh interpreter, an empty cache), a first FSDP merge imports neither torch nor transformers
itself, writes the full path's folder byte for byte with the same facts, and leaves the recipe the next merge repeats.
Where planning does not confirm the guess (a guess that differs, a checkpoint that does not match its config),
nothing guessed is kept or uploaded: the full path merges again, or says what is wrong, and the target holds nothing
half-written. Weights transformers converts on saving are not guessed."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import snapshot_download

from hubexport import fast_merge, first_merge
from hubexport.cli import cli
from hubexport.dist import Dist
from hubexport.executor import execute, merge
from hubexport.options import MergeOptions, Output
from tests.fastpath import facts, folder_bytes, run_cli
from tests.fsdp_cases import actor_dir
from tests.hub_fixtures import TOKEN, USER
from tests.tree import tree_hash

# (case, extra merge options): untied and tied, FSDP1 and FSDP2, world sizes 1 to 4, HSDP, a critic, sharded output.
CONFIRMED = [
    ("qwen2_plain_w1", []),
    ("llama_fsdp1_w2_tied_bf16", []),
    ("qwen3_fsdp2_w2_tied", ["--max-shard-size", "30KB"]),
    ("qwen2_critic_fsdp2_w2", []),
    ("llama_hsdp_fsdp1_w4_tied", []),
]


def _silent(_: str) -> None:
    pass


def _full(actor: Path, target: Path, mp: pytest.MonkeyPatch, **options) -> object:
    """The full path's merge of `actor` (its own empty cache), as the reference."""
    with mp.context() as m:
        m.setenv("HF_HOME", str(target.parent / "hf-full"))
        m.setenv("HUBEXPORT_NO_FAST_PATH", "1")
        return merge(actor, Output(target), MergeOptions(**options), log=_silent)


@pytest.mark.parametrize(("name", "extra"), CONFIRMED, ids=[c for c, _ in CONFIRMED])
def test_a_first_merge_planned_beside_writes_the_full_paths_folder(name, extra, fsdp_root, tmp_path, monkeypatch):
    actor = actor_dir(fsdp_root, name)
    before = tree_hash(actor.parent)
    code, out, err, heavy = run_cli(["merge", "--local-dir", actor, "--target-dir", tmp_path / "first", *extra,
                                     "--json"], tmp_path / "hf")
    assert code == 0, err
    assert not {"torch", "transformers", "safetensors"} & set(heavy)  # planned in a second process
    shard = {"max_shard_size": extra[1]} if extra else {}
    full = _full(actor, tmp_path / "full", monkeypatch, **shard)
    assert folder_bytes(tmp_path / "first") == folder_bytes(tmp_path / "full")
    assert facts(json.loads(out)) == facts(full)
    assert (len(full.files) > 1) == bool(extra)  # the sharded case has an index to guess
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    job = fast_merge.job(actor, MergeOptions(**shard))
    assert job is not None and job.planning is None  # planning recorded the recipe: the next merge repeats it
    job.close()
    assert tree_hash(actor.parent) == before  # nothing under the checkpoint was written, renamed or deleted


def test_a_cache_that_cannot_be_written_still_confirms_the_guess(fsdp_root, tmp_path, monkeypatch):
    """A shared read-only HF_HOME (here: one under a file): planning answers the merge directly, so the guess is
    confirmed and kept, as with a cache."""
    actor = actor_dir(fsdp_root, "qwen3_fsdp2_w2_tied")
    (tmp_path / "a-file").write_text("")
    code, _, err, heavy = run_cli(["merge", "--local-dir", actor, "--target-dir", tmp_path / "first"],
                                  tmp_path / "a-file" / "hf")
    assert code == 0, err
    assert not any("planning" in line for line in err.splitlines()), err
    assert not {"torch", "transformers"} & set(heavy)
    _full(actor, tmp_path / "full", monkeypatch)
    assert folder_bytes(tmp_path / "first") == folder_bytes(tmp_path / "full")


def test_weights_transformers_converts_on_saving_are_planned_first(fsdp_root, tmp_path, monkeypatch):
    """Qwen3-MoE's fused experts ([E, 2I, H]: split per expert on saving) are never guessed: one plan, the full
    path's, and its folder."""
    actor = actor_dir(fsdp_root, "qwen3moe_fsdp2_w2")
    code, _, err, heavy = run_cli(["merge", "--local-dir", actor, "--target-dir", tmp_path / "first"], tmp_path / "hf")
    assert code == 0, err
    assert [line for line in err.splitlines() if "parameters →" in line or "planning" in line] == [
        "fsdp fsdp2 checkpoint, world_size=2: Qwen3MoeForCausalLM, 27,072 parameters → 1 file(s), 0.00 GB, at most "
        "0 MB of tensors in flight"]
    assert "torch" in heavy
    _full(actor, tmp_path / "full", monkeypatch)
    assert folder_bytes(tmp_path / "first") == folder_bytes(tmp_path / "full")


@pytest.mark.parametrize(("field", "says"), [
    ("intermediate_size", "gate_proj.weight has shape [64, 32] in the checkpoint but Qwen3ForCausalLM expects [72, 32]"),
    ("num_hidden_layers", "is not a valid config: ValueError: `num_hidden_layers` (3) must be equal to the number of "
                          "`layer_types` (2)"),
])
def test_a_checkpoint_its_config_does_not_describe_is_refused_and_nothing_is_left(field, says, fsdp_root, tmp_path):
    step = tmp_path / "ckpt" / "global_step_1"
    shutil.copytree(actor_dir(fsdp_root, "qwen3_fsdp2_w2_tied").parent, step)
    config = step / "actor" / "huggingface" / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, field: data[field] + (8 if field == "intermediate_size" else 1)}))
    before = tree_hash(step)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err, _ = run_cli(["merge", "--local-dir", step / "actor", "--target-dir", out_dir / "model"],
                              tmp_path / "hf")
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # nothing half-written, no staging folder, no lock
    assert tree_hash(step) == before


@pytest.fixture
def guessing(monkeypatch, tmp_path):
    """This process guesses as a fresh one would (it has imported transformers), with an empty cache."""
    monkeypatch.setattr(first_merge, "worth_guessing", lambda: True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_a_guess_planning_contradicts_is_dropped_and_merged_again(guessing, fsdp_root, tmp_path, monkeypatch):
    """A guess that differs from the plan in any field (here the parameter count) is never what the merge keeps."""
    actor = actor_dir(fsdp_root, "llama_fsdp1_w2_tied_bf16")
    real = first_merge.guess

    def wrong(*args):
        r = real(*args)
        return dataclasses.replace(r, num_parameters=r.num_parameters + 1)

    monkeypatch.setattr(first_merge, "guess", wrong)
    lines: list[str] = []
    result = merge(actor, Output(tmp_path / "first"), log=lines.append)
    assert "planning did not confirm the plan above (num_parameters differ): merging again by the full plan" in lines
    full = _full(actor, tmp_path / "full", monkeypatch)
    assert facts(result) == facts(full)
    assert folder_bytes(tmp_path / "first") == folder_bytes(tmp_path / "full")


def test_no_file_leaves_a_guessed_merge_before_planning_confirmed_it(guessing, fsdp_root, tmp_path):
    """`on_file` (what `push` streams from) hears of each file only once the guess is the plan."""
    actor = actor_dir(fsdp_root, "qwen3_fsdp2_w2_tied")
    job = fast_merge.job(actor, MergeOptions(max_shard_size="30KB"), plan_beside=True)
    assert job is not None and job.planning is not None
    confirmed: list[bool] = []
    try:
        execute(job, Output(tmp_path / "m"), "merge", Dist.from_env(), _silent,
                on_file=lambda f, path: confirmed.append(job.planning is None))
    finally:
        job.close()
    assert len(confirmed) == len(job.files) > 1 and all(confirmed)


def test_a_guess_stops_being_copied_once_planning_ended_without_confirming_it(guessing, fsdp_root, tmp_path,
                                                                              monkeypatch):
    actor = actor_dir(fsdp_root, "llama_fsdp1_w2_tied_bf16")
    real = first_merge.guess
    monkeypatch.setattr(first_merge, "guess", lambda *a: dataclasses.replace(real(*a), dtype="float16"))
    job = fast_merge.job(actor, MergeOptions(), plan_beside=True)
    assert job is not None
    try:
        deadline = time.monotonic() + 120
        while not job.planning.done() and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(first_merge.Unconfirmed, match=r"\(dtype differ\)"):
            job.write(tmp_path, Dist.from_env())
    finally:
        job.close()
    [f] = job.files
    assert (tmp_path / f.name).stat().st_size == len(f.header)  # stopped before its first tensor


def test_a_process_that_imported_transformers_plans_in_process(fsdp_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert fast_merge.job(actor_dir(fsdp_root, "qwen3_fsdp2_w2_tied"), MergeOptions(), plan_beside=True) is None


@pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # huggingface_hub's own PUTs
def test_a_first_push_publishes_the_full_paths_weights(guessing, fakehub, fsdp_root, tmp_path, monkeypatch):
    """`push CHECKPOINT` of a guessed first merge: the Hub gets the full path's weights."""
    actor = actor_dir(fsdp_root, "qwen3_fsdp2_w2_tied")
    job = fast_merge.job(actor, MergeOptions(), plan_beside=True)
    assert job is not None and job.planning is not None  # this push guesses
    job.close()
    r = CliRunner().invoke(cli, ["push", str(actor), "--repo-id", f"{USER}/first", "--private", "--license", "mit"])
    assert r.exit_code == 0, r.output
    folder = Path(snapshot_download(f"{USER}/first", endpoint=fakehub.url, token=TOKEN, cache_dir=tmp_path / "dl"))
    _full(actor, tmp_path / "full", monkeypatch)
    got = {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}
    assert got == {n: b for n, b in folder_bytes(tmp_path / "full").items() if n.endswith(".safetensors")} != {}
