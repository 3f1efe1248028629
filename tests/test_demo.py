"""`hubexport demo` shows the whole product with no token and no network: merge, bit-exact check, the card it would
publish (weight delta vs the demo's initial model, evaluation results from the validation it logged in verl's
format) and an offline dry run listing every file push would send."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from hubexport.card_metadata import validate_card
from hubexport.cli import cli
from hubexport.demo import METRIC
from hubexport.metrics import read_metrics


def test_demo_shows_card_delta_eval_results_and_an_offline_dry_run(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login either
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: any request would fail
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--world-size", "1"])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    model = tmp_path / "demo" / "model"
    assert f"card:       {model / 'README.md'} (weight delta vs the initial model, evaluation results)" in lines
    assert any(line.startswith("verified:   ") and "bit-exact" in line for line in lines)
    listed = [line.split()[1] for line in lines if line.startswith("  + ")]
    assert sorted(listed) == sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    assert {"model.safetensors", "README.md", "assets/validation_curve.png"} <= set(listed)
    assert any(line.startswith(f"dry run, offline: would upload {len(listed)} files") and "nothing was sent" in line
               for line in lines)
    assert lines[-1].startswith("push it for real: HF_TOKEN=<a write token> hubexport push ")
    card = (model / "README.md").read_text()
    assert "## Weight delta vs the base model" in card and "with `base_model`: 27 of 27 tensors compared, 0 unchanged" in card
    logged = read_metrics(tmp_path / "demo" / "demo" / "metrics.jsonl")
    assert logged.steps[1][METRIC] > logged.steps[0][METRIC]  # the training step lowered the loss on its prompt
    [result] = validate_card(card)["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == logged.steps[1][METRIC]
    assert "## Evaluation results" in card and "publish gate: compared with base_model" in r.stderr


def test_offline_dry_run_needs_no_token_and_offline_alone_is_refused(model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["push", str(model_dir), "--repo-id", "me/tiny", "--license", "mit"]
    r = CliRunner().invoke(cli, [*args, "--dry-run", "--offline", "--json"])
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in model_dir.iterdir())
    assert sorted(line.split()[1] for line in r.stderr.splitlines() if line.startswith("  + ")) == \
        sorted([*files, "README.md"])
    assert '"dry_run": true' in r.stdout and "authenticated" not in r.stderr
    r = CliRunner().invoke(cli, [*args, "--offline"])
    assert r.exit_code == 2 and "error: --offline only applies to --dry-run" in r.stderr
