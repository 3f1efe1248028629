"""Evaluation results on push, against the Hub emulator: a run laid out as verl lays it out (checkpoints/<project>/
<experiment>/global_step_N holding real checkpoints, the file logger's <project>/<experiment>.jsonl in verl's bytes),
`--select best:<metric>` (ties to the latest) or latest, and what reaches the Hub: model-index in the card's
metadata, the card section, `.eval_results/*.yaml` and the validation curve, the step named in the commit title."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from huggingface_hub._eval_results import parse_eval_result_entries

from hubexport.card_metadata import validate_card
from hubexport.cli import cli
from hubexport.evalresults import CURVE_PATH
from hubexport.examples import FsdpCase, make_checkpoints
from hubexport.executor import merge
from hubexport.options import Output
from tests.fakehub import FakeHub
from tests.hub_fixtures import USER
from tests.test_metrics import file_logger_line
from tests.tree import tree_hash

REPO = f"{USER}/evals"
GSM = "val-core/openai/gsm8k/reward/mean@1"
GSM_BY_STEP = {0: 0.1, 10: 0.6, 20: 0.6, 30: 0.5}  # 10 and 20 tie for best; 30 is the latest checkpoint
STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-ckpt")
    make_checkpoints([FsdpCase("eval_w1", fsdp=0, world_size=1, save_base=True)], root)
    return root / "eval_w1"


@pytest.fixture
def run(checkpoint: Path, tmp_path: Path) -> Path:
    """launch/checkpoints/gsm8k_grpo/qwen_run/global_step_{10,20,30} and launch/gsm8k_grpo/qwen_run.jsonl."""
    launch = tmp_path / "launch"
    root = launch / "checkpoints" / "gsm8k_grpo" / "qwen_run"
    for step in STEPS:
        shutil.copytree(checkpoint / "global_step_1", root / f"global_step_{step}")
    (root / "latest_checkpointed_iteration.txt").write_text("30")
    log = launch / "gsm8k_grpo" / "qwen_run.jsonl"
    log.parent.mkdir(parents=True)
    with open(log, "wb") as fp:
        for step in range(31):
            data = {"actor/pg_loss": 0.01 * step} | ({GSM: GSM_BY_STEP[step]} if step in GSM_BY_STEP else {})
            fp.write(file_logger_line(step, data))
    return root


def push(*args: object) -> Result:
    return CliRunner().invoke(cli, ["push", *map(str, args), "--repo-id", REPO, "--license", "mit", "--private"])


def head_title(hub: FakeHub) -> str:
    repo = hub.repos[f"model:{REPO}"]
    return repo.titles[repo.refs["main"]]


def test_select_best_publishes_the_tied_latest_step_with_its_results(fakehub: FakeHub, run: Path,
                                                                     tmp_path: Path) -> None:
    target = tmp_path / "kept"
    r = push(run, "--select", f"best:{GSM}", "--target-dir", target, "--json")
    assert r.exit_code == 0, r.output
    assert f"publishing global_step_20: best {GSM} = 0.6 at step 20" in r.stderr
    assert "(tied with step(s) 10: took the latest)" in r.stderr
    assert head_title(fakehub).startswith(f"Upload global_step_20 with hubexport (best {GSM} = 0.6 at step 20")
    out = json.loads(r.stdout)
    assert out["evaluation"]["step"] == 20 and out["evaluation"]["values"] == {GSM: 0.6}
    files = fakehub.files(REPO)
    card = files["README.md"].data.decode()
    meta = validate_card(card)
    [result] = meta["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == 0.6 and result["dataset"]["type"] == "openai/gsm8k"
    section = card.split("## Evaluation results", 1)[1]
    assert "at step 20, the published checkpoint (best" in section and "| openai/gsm8k | reward | mean@1 | 0.6 |" in section
    entries = parse_eval_result_entries(yaml.safe_load(files[".eval_results/gsm8k.yaml"].data))
    assert [(e.dataset_id, e.value) for e in entries] == [("openai/gsm8k", 0.6)]
    assert files[CURVE_PATH].lfs or files[CURVE_PATH].data.startswith(b"\x89PNG")
    for path in (".eval_results/gsm8k.yaml", CURVE_PATH, "README.md"):  # the merge's own folder holds them too
        assert (target / path).is_file(), path


def test_latest_by_default_with_metrics_given(fakehub: FakeHub, run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere.jsonl"
    shutil.move(run.parents[2] / "gsm8k_grpo" / "qwen_run.jsonl", moved)
    r = push(run, "--metrics", moved)
    assert r.exit_code == 0, r.output
    assert "publishing global_step_30: latest step 30 (latest_checkpointed_iteration.txt)" in r.stderr
    assert head_title(fakehub).startswith("Upload global_step_30 with hubexport (latest step 30")
    card = fakehub.files(REPO)["README.md"].data.decode()
    assert validate_card(card)["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5


def test_unknown_metric_is_one_line_before_any_request(fakehub: FakeHub, run: Path) -> None:
    r = push(run, "--select", "best:val-core/nope/reward/mean@1")
    assert r.exit_code == 2 and r.stderr.startswith("error: val-core/nope/reward/mean@1 in qwen_run.jsonl: never logged")
    assert f"validation metrics of the run: {GSM}" in r.stderr and not fakehub.requests


def test_folder_push_sends_eval_results_from_memory(fakehub: FakeHub, run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "global_step_20" / "model"  # the step is in the path
    merge(run / "global_step_20", Output(folder), log=lambda _: None)
    before = tree_hash(folder)
    r = push(folder, "--metrics", run.parents[2] / "gsm8k_grpo" / "qwen_run.jsonl")
    assert r.exit_code == 0, r.output
    assert ".eval_results/gsm8k.yaml" in fakehub.files(REPO) and CURVE_PATH in fakehub.files(REPO)
    assert tree_hash(folder) == before  # never written into the user's folder
