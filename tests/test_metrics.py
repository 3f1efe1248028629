"""Evaluation results from verl's metrics: a run laid out as verl lays it out (checkpoints/<project>/<experiment>/
global_step_N, the file logger's <project>/<experiment>.jsonl under the launch directory), the JSONL written line by
line the way verl's FileLogger writes it (verl/utils/tracking.py: orjson.dumps({"step": step, "data": data}) + b"\\n",
compact, numpy scalars as numbers, NaN/Inf as null; newer verl adds "elapsed_seconds"). verl is not installed here,
so `file_logger_line` reproduces those bytes."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub._eval_results import parse_eval_result_entries

from hubexport.card import render_card
from hubexport.card_metadata import validate_card
from hubexport.errors import MetricsError
from hubexport.evalresults import CURVE_PATH, eval_results_for
from hubexport.examples import FsdpCase, build_model
from hubexport.metrics import find_metrics_file, parse_val_key, pick_best, read_metrics, select_step
from hubexport.options import CardOptions

GSM = "val-core/openai/gsm8k/reward/mean@1"
DAPO = "val-core/math_dapo/acc/mean@4"
CHECKPOINTS = (10, 20, 25, 30, 40)
GSM_BY_STEP = {0: 0.1, 10: 0.4, 20: 0.6, 30: 0.6, 40: 0.5}  # 20 and 30 tie for best
DAPO_BY_STEP = {0: 0.05, 10: 0.2, 20: 0.35, 30: 0.3, 40: 0.25}


def quiet(_: str) -> None:
    pass


def _orjson_like(value):
    if isinstance(value, dict):
        return {k: _orjson_like(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def file_logger_line(step: int, data: dict, elapsed: float | None = None) -> bytes:
    record = {"step": step, **({"elapsed_seconds": elapsed} if elapsed is not None else {}), "data": _orjson_like(data)}
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"


def step_data(step: int) -> dict:
    """What verl logs at a step: training metrics always, validation every 10 steps (and before training, step 0)."""
    data = {"training/global_step": step, "actor/pg_loss": np.float32(0.01 * step), "critic/score/mean":
            np.float64(0.02 * step), "actor/grad_norm": float("nan") if step == 20 else 1.5, "timing_s/step": 3.25}
    if step in GSM_BY_STEP:
        data |= {GSM: np.float64(GSM_BY_STEP[step]), DAPO: DAPO_BY_STEP[step],
                 "val-core/math_dapo/acc/best@4/mean": DAPO_BY_STEP[step] + 0.1,
                 "val-core/math_dapo/acc/maj@4/mean": DAPO_BY_STEP[step] + 0.05,
                 "val-aux/math_dapo/acc/std@4": 0.2, "val-aux/math_dapo/reward/mean@4": DAPO_BY_STEP[step],
                 "val-aux/num_turns/mean": 1.0}
    return data


@pytest.fixture
def run(tmp_path):
    """launch/checkpoints/gsm8k_grpo/qwen_run/global_step_N and launch/gsm8k_grpo/qwen_run.jsonl."""
    launch = tmp_path / "launch"
    root = launch / "checkpoints" / "gsm8k_grpo" / "qwen_run"
    for step in CHECKPOINTS:
        (root / f"global_step_{step}" / "actor").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("40")
    log = launch / "gsm8k_grpo" / "qwen_run.jsonl"
    log.parent.mkdir(parents=True)
    with open(log, "wb", buffering=0) as fp:
        for step in range(41):
            fp.write(file_logger_line(step, step_data(step), elapsed=1.5 * step if step > 30 else None))
    return root


# ---------------------------------------------------------------------------------------------- reading the log
def test_reads_verl_file_logger_lines(run):
    log = read_metrics(find_metrics_file(run, env={}))
    assert sorted(log.steps) == list(range(41))
    assert log.steps[30][GSM] == 0.6 and log.steps[7]["actor/pg_loss"] == pytest.approx(0.07)
    assert "actor/grad_norm" not in log.steps[20] and log.steps[21]["actor/grad_norm"] == 1.5  # null (NaN) left out
    assert log.validation_steps() == [0, 10, 20, 30, 40]
    assert set(log.validation(10)) == {k for k in step_data(10) if k.startswith("val-")}
    assert log.series(GSM) == sorted(GSM_BY_STEP.items())


def test_torn_last_line_is_skipped_and_a_bad_line_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(file_logger_line(1, {GSM: 0.5}) + b'{"step":2,"data":{"val-co')
    log = read_metrics(path)
    assert list(log.steps) == [1] and "line 2 is incomplete" in log.notes[0]
    path.write_bytes(b'{"step":1}\n' + file_logger_line(2, {GSM: 0.5}))
    with pytest.raises(MetricsError, match=r"m\.jsonl:1 is not a verl file-logger record"):
        read_metrics(path)
    path.write_bytes(b"not json\n\n")
    with pytest.raises(MetricsError, match=":1 "):
        read_metrics(path)


def test_finding_the_metrics_file(run, tmp_path):
    default = run.parents[2] / "gsm8k_grpo" / "qwen_run.jsonl"
    assert find_metrics_file(run, env={}) == default
    # the names from the run's saved config win over the path's
    (run / "config.yaml").write_text(yaml.safe_dump({"trainer": {"project_name": "p", "experiment_name": "e"}}))
    named = run.parents[2] / "p" / "e.jsonl"
    named.parent.mkdir()
    named.write_bytes(file_logger_line(1, {}))
    assert find_metrics_file(run, env={}) == named
    # VERL_FILE_LOGGER_ROOT, then a metrics.jsonl next to the run, then VERL_FILE_LOGGER_PATH
    other_root = tmp_path / "logs"
    (other_root / "p").mkdir(parents=True)
    (other_root / "p" / "e.jsonl").write_bytes(file_logger_line(1, {}))
    assert find_metrics_file(run, env={"VERL_FILE_LOGGER_ROOT": str(other_root)}) == other_root / "p" / "e.jsonl"
    named.unlink()
    default.unlink()
    explicit = tmp_path / "somewhere.jsonl"
    explicit.write_bytes(file_logger_line(1, {}))
    assert find_metrics_file(run, env={"VERL_FILE_LOGGER_PATH": str(explicit)}) == explicit
    (run / "metrics.jsonl").write_bytes(file_logger_line(1, {}))
    assert find_metrics_file(run, env={"VERL_FILE_LOGGER_PATH": str(explicit)}) == run / "metrics.jsonl"
    (run / "metrics.jsonl").unlink()
    assert find_metrics_file(run, env={}) is None


# ---------------------------------------------------------------------------------------------- --select
def test_select_latest(run):
    assert select_step(run, "latest", env={}) == (run / "global_step_40",
                                                  "latest step 40 (latest_checkpointed_iteration.txt)")
    (run / "latest_checkpointed_iteration.txt").unlink()
    (run / "global_step_45").mkdir()
    assert select_step(run, env={}) == (run / "global_step_45", "latest step 45 (highest global_step_N)")


def test_select_best_takes_the_latest_of_a_tie_and_says_so(run):
    step_dir, reason = select_step(run, f"best:{GSM}", env={})
    assert step_dir == run / "global_step_30"
    assert reason.startswith(f"best {GSM} = 0.6 at step 30, among 4 checkpointed step(s)")
    assert "tied with step(s) 20: took the latest" in reason and "1 checkpoint(s) without a logged value" in reason
    assert select_step(run, f"best:{DAPO}", env={})[0] == run / "global_step_20"
    # any logged metric, not only validation: critic/score/mean grows every step, so the last checkpoint wins
    assert select_step(run, "best:critic/score/mean", env={})[0] == run / "global_step_40"


def test_select_errors_are_one_line(run, tmp_path):
    with pytest.raises(MetricsError, match="never logged") as e:
        select_step(run, "best:val-core/openai/gsm8k/reward/mean@8", env={})
    assert GSM in e.value.hint
    only_step_5 = tmp_path / "five.jsonl"
    only_step_5.write_bytes(file_logger_line(5, {GSM: 0.3}))
    with pytest.raises(MetricsError, match="logged at steps 5, none checkpointed"):
        select_step(run, f"best:{GSM}", metrics_file=only_step_5)
    with pytest.raises(MetricsError, match="unknown --select 'top'"):
        select_step(run, "top", env={})
    (run.parents[2] / "gsm8k_grpo" / "qwen_run.jsonl").unlink()
    with pytest.raises(MetricsError, match="none were found"):
        select_step(run, f"best:{GSM}", env={})


def test_pick_best_and_key_parsing():
    assert pick_best({10: 0.5, 20: 0.7, 30: 0.7, 40: 0.1}) == (30, [20, 30])
    assert pick_best({5: -1.0}) == (5, [5])
    k = parse_val_key("val-core/openai/gsm8k/reward/best@4/mean")
    assert (k.core, k.data_source, k.var, k.metric) == (True, "openai/gsm8k", "reward", "best@4/mean")
    k = parse_val_key("val-aux/lighteval/MATH/acc/std@16")
    assert (k.core, k.data_source, k.var, k.metric) == (False, "lighteval/MATH", "acc", "std@16")
    assert parse_val_key("val/test_score/openai/gsm8k").data_source == "openai/gsm8k"
    assert parse_val_key("val-aux/num_turns/mean") is None and parse_val_key("actor/pg_loss") is None


# ---------------------------------------------------------------------------------------------- Hub evaluation results
def test_model_index_at_the_published_step(run):
    results = eval_results_for(run / "global_step_30" / "actor", log=quiet, env={})
    assert results.step == 30 and results.values[GSM] == 0.6
    meta = results.card_metadata("qwen-grpo")
    parsed = ModelCardData(**meta)  # huggingface_hub's own parser of model-index
    got = {(r.dataset_type, r.metric_type, r.metric_config): r.metric_value for r in parsed.eval_results}
    assert parsed.model_name == "qwen-grpo"
    assert got == {("openai/gsm8k", "reward", "mean@1"): 0.6, ("math_dapo", "acc", "mean@4"): 0.3,
                   ("math_dapo", "acc", "best@4/mean"): 0.4, ("math_dapo", "acc", "maj@4/mean"): 0.35}
    assert all(r.task_type == "text-generation" and "step 30" in r.metric_name for r in parsed.eval_results)
    text = f"---\n{yaml.safe_dump(meta)}---\n"
    assert len(ModelCard(text).data.eval_results) == 4 and validate_card(text)["model-index"] == meta["model-index"]


def test_model_index_passes_the_card_renderer(run, tmp_path):
    """The metadata goes through today's card path (--card-data) and comes out in the front matter as it went in."""
    _, model = build_model(FsdpCase("card", layers=1))
    model.save_pretrained(tmp_path / "model")
    meta = eval_results_for(run / "global_step_30", log=quiet, env={}).card_metadata("qwen-grpo")
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(meta))
    card = render_card(tmp_path / "model", CardOptions(card_data=tmp_path / "card.yaml", license="mit"), log=quiet)
    assert validate_card(card)["model-index"] == meta["model-index"]


def test_eval_results_yaml_entries(run):
    results = eval_results_for(run / "global_step_30", log=quiet, env={})
    files = results.files()
    assert sorted(files) == [".eval_results/gsm8k.yaml", CURVE_PATH]
    entries = parse_eval_result_entries(yaml.safe_load(files[".eval_results/gsm8k.yaml"]))
    assert [(e.dataset_id, e.task_id, e.value) for e in entries] == [("openai/gsm8k", "default", 0.6)]
    assert GSM in entries[0].notes and "step 30" in entries[0].notes
    assert any("'math_dapo' is not a Hub dataset id" in n for n in results.notes)  # model-index only
    assert files[CURVE_PATH].startswith(b"\x89PNG\r\n\x1a\n") and files == results.files()  # deterministic


def test_selection_metric_is_reported_and_plotted_alone(run):
    step_dir, reason = select_step(run, f"best:{DAPO}", env={})
    results = eval_results_for(step_dir, selector=f"best:{DAPO}", selection=reason, log=quiet, env={})
    md = results.markdown()
    assert f"at step 20, the published checkpoint ({reason})" in md
    assert "| openai/gsm8k | reward | mean@1 | 0.6 |" in md and "| math_dapo | acc | mean@4 | 0.35 |" in md
    assert f"![Validation metrics over training steps]({CURVE_PATH})" in md
    all_curves = eval_results_for(step_dir, log=quiet, env={}).curve_png
    assert results.curve_png != all_curves  # one line instead of every val-core metric


def test_step_without_validation_says_so(run):
    lines = []
    results = eval_results_for(run / "global_step_25", log=lines.append, env={})
    assert results.values == {} and results.card_metadata("m") == {}
    assert ".eval_results/gsm8k.yaml" not in results.files()
    assert any("no validation values at step 25 (validation ran at steps 0, 10, 20, 30, 40)" in line for line in lines)
    assert "No val-core validation values were logged at step 25" in results.markdown()


def test_no_metrics_file_and_a_single_step(run, tmp_path):
    (run.parents[2] / "gsm8k_grpo" / "qwen_run.jsonl").unlink()
    lines = []
    assert eval_results_for(run / "global_step_30", log=lines.append, env={}) is None
    assert "no verl metrics file found" in lines[0]
    one = tmp_path / "one.jsonl"
    one.write_bytes(file_logger_line(30, {GSM: 0.6}))
    results = eval_results_for(run / "global_step_30", metrics_file=one, log=quiet, env={})
    assert results.curve_png is None and CURVE_PATH not in results.files() and "![" not in results.markdown()


def test_without_matplotlib_the_curve_is_skipped_with_a_note(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    lines = []
    results = eval_results_for(run / "global_step_30", log=lines.append, env={})
    assert results.curve_png is None and CURVE_PATH not in results.files()
    assert any("matplotlib is not installed" in line for line in lines)
    assert ".eval_results/gsm8k.yaml" in results.files()

