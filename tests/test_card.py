"""Model cards: golden files for both templates, redaction of the training config, license inheritance, metadata
validation, and the `card` command. Set HUBEXPORT_UPDATE_GOLDEN=1 to rewrite the golden files after a wanted change."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from hubexport import card as card_module
from hubexport import gate
from hubexport.card import CardEvidence, redact, render_card
from hubexport.card_metadata import validate_card, validate_metadata
from hubexport.cli import cli
from hubexport.errors import CardError
from hubexport.evalresults import eval_results_for
from hubexport.options import CardOptions, GateOptions
from hubexport.result import Result, WrittenFile

GOLDEN = Path(__file__).parent / "golden"
BASE = "Qwen/Qwen2.5-0.5B-Instruct"
TRAINING_CONFIG = """
actor_rollout_ref:
  model: {path: Qwen/Qwen2.5-0.5B-Instruct}
  actor:
    strategy: fsdp2
    use_kl_loss: true
    kl_loss_coef: 0.001
    kl_loss_type: low_var_kl
    optim: {lr: 1.0e-06}
    ppo_mini_batch_size: 64
  rollout: {name: vllm, n: 5, temperature: 1.0}
algorithm: {adv_estimator: grpo, use_kl_in_reward: false}
data:
  train_files: [/home/alice/data/gsm8k/train.parquet]
  max_prompt_length: 512
  max_response_length: 1024
  train_batch_size: 256
custom_reward_function: {path: /home/alice/rewards/gsm8k.py, name: compute_score}
trainer:
  project_name: qwen-grpo
  nnodes: 1
  n_gpus_per_node: 8
  total_training_steps: 500
  wandb_api_key: abc123supersecret
  default_local_dir: /mnt/shared/alice/ckpts/qwen-grpo
env:
  HF_TOKEN: hf_abcdefghijklmnopqrstuvwxyz
  NOTE: launched with hf_ABCDEFGHIJKLMNOPQRSTUVWX in the environment
"""
SECRETS = ("abc123supersecret", "hf_abcdefghijklmnopqrstuvwxyz", "hf_ABCDEFGHIJKLMNOPQRSTUVWX", "/home/alice", "/mnt")


@pytest.fixture(autouse=True)
def fixed_version(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """Goldens must not change with the release number, nor with what this machine's HF cache holds."""
    monkeypatch.setattr(card_module, "__version__", "0.0.0-test")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A deterministic HF folder: fixed config, two shards of arange tensors (same bytes on every machine)."""
    out = tmp_path / "qwen-grpo-step200"
    out.mkdir()
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8, "vocab_size": 16,
              "tie_word_embeddings": True}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({"model.embed_tokens.weight": torch.arange(128, dtype=torch.bfloat16).reshape(16, 8)},
              out / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"model.norm.weight": torch.ones(8, dtype=torch.bfloat16)},
              out / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    return out


def delta_vs_base(folder: Path, tmp_path: Path) -> str:
    """The gate's card section for `folder` against a base whose embeddings were one less everywhere."""
    base = tmp_path / "base"
    shutil.copytree(folder, base)
    save_file({"model.embed_tokens.weight": torch.arange(128, dtype=torch.bfloat16).reshape(16, 8) - 1},
              base / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    found = gate.check(folder, gate.Base(base, BASE, "--diff-base"), GateOptions(), name=folder, log=lambda _: None)
    assert found is not None and found.refusal is None
    return found.markdown()


def eval_results(tmp_path: Path):
    """verl's file logger at steps 100 and 200 (validation each time), read for step 200."""
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "data": {"val-core/openai/gsm8k/reward/mean@1": v, "val-aux/openai/gsm8k/reward/std@1": 0.2,
                                 "actor/pg_loss": 0.01}} for s, v in ((100, 0.41), (200, 0.55))]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return eval_results_for(tmp_path / "global_step_200", 200, path, log=lambda _: None)


@pytest.fixture
def training_config(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    path.write_text(TRAINING_CONFIG)
    return path


def merge_result(folder: Path) -> Result:
    files = [WrittenFile("model-00001-of-00002.safetensors", 4_000_000_000, "a" * 64),
             WrittenFile("model-00002-of-00002.safetensors", 1_234_567, "b" * 64),
             WrittenFile("model.safetensors.index.json", 900, "c" * 64)]
    return Result(command="merge", target_dir=folder, source_format="fsdp", source_version="fsdp2", parallel={"world_size": 8},
                       architecture="Qwen2ForCausalLM", dtype="bfloat16", num_parameters=494_032_768,
                       tied_embeddings=True, value_model=False, global_step=200, files=files)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HUBEXPORT_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; HUBEXPORT_UPDATE_GOLDEN=1 rewrites it if that is wanted"


def test_default_card_from_a_merge_with_training_config(folder: Path, training_config: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    options = CardOptions(license="apache-2.0", training_config=training_config,
                          variables={"reward": "exact match on the final answer", "wandb_run": "qwen-grpo/7x2k"})
    evidence = CardEvidence(delta_vs_base(folder, tmp_path), eval_results(tmp_path))
    text = render_card(folder, options, merge_result=merge_result(folder), log=logs.append, evidence=evidence)
    assert_golden("card_default_merge.md", text)
    assert validate_card(text)["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.55
    assert any(f"base model {BASE} taken from the training config" in line for line in logs)
    assert not any(secret in text for secret in SECRETS)
    assert "…/gsm8k/train.parquet" in text and "<redacted>" in text


def test_minimal_card_from_a_folder_alone(folder: Path, tmp_path: Path) -> None:
    text = render_card(folder, CardOptions(base_model=BASE, license="mit", template="minimal"), log=lambda _: None,
                       evidence=CardEvidence(delta_vs_base(folder, tmp_path)))
    assert_golden("card_minimal_folder.md", text)


def test_rendering_does_not_depend_on_where_the_folder_is(folder: Path, tmp_path: Path) -> None:
    elsewhere = Path(shutil.copytree(folder, tmp_path / "a" / "b" / folder.name))
    mit = CardOptions(license="mit")
    assert render_card(folder, mit, log=lambda _: None) == render_card(elsewhere, mit, log=lambda _: None)


def test_redaction_by_key_and_value_and_path_shortening() -> None:
    out = redact(yaml.safe_load(TRAINING_CONFIG))
    assert out["trainer"]["wandb_api_key"] == "<redacted>" and out["env"]["HF_TOKEN"] == "<redacted>"
    assert out["env"]["NOTE"] == "<redacted>"  # a token-like value under an innocent key
    assert out["trainer"]["default_local_dir"] == "…/ckpts/qwen-grpo"
    assert out["actor_rollout_ref"]["model"]["path"] == BASE  # hub ids are not paths


def _cache_base_model_card(hf_home: Path, license_yaml: str) -> str:
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{BASE.replace('/', '--')}"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha / "README.md").write_text(f"---\n{license_yaml}\n---\n# base\n")
    return sha


def test_license_and_revision_come_from_the_cached_base_model_card(folder: Path, hf_home: Path) -> None:
    sha = _cache_base_model_card(hf_home, "license: other\nlicense_name: qwen\nlicense_link: https://x.test/LICENSE")
    logs: list[str] = []
    meta = validate_card(text := render_card(folder, CardOptions(base_model=BASE), log=logs.append))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "qwen", "https://x.test/LICENSE")
    assert f"`{sha}`" in text and any("inherited from the base model" in line for line in logs)


def test_license_from_a_local_base_model_dir(folder: Path, tmp_path: Path) -> None:
    base_dir = tmp_path / "models" / "llama"
    base_dir.mkdir(parents=True)
    (base_dir / "README.md").write_text("---\nlicense: llama3.1\n---\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"actor_rollout_ref": {"model": {"path": str(base_dir)}}}))
    meta = validate_card(render_card(folder, CardOptions(training_config=config), log=lambda _: None))
    assert meta["license"] == "llama3.1" and "base_model" not in meta  # a local path is never a base_model


def test_no_license_is_left_out_with_a_warning(folder: Path) -> None:
    logs: list[str] = []
    meta = validate_card(render_card(folder, CardOptions(base_model=BASE), log=logs.append))
    assert "license" not in meta and any(line.startswith("warning: no license") for line in logs)


def test_precedence_flags_over_card_data_over_inference(folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "card.yaml"
    data.write_text("license: mit\nlanguage: [en]\ndatasets: [openai/gsm8k]\ntags: [math]\n")
    options = CardOptions(license="apache-2.0", card_data=data, base_model=BASE)
    meta = validate_card(render_card(folder, options, log=lambda _: None))
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"] and meta["datasets"] == ["openai/gsm8k"]
    assert meta["tags"] == ["hubexport", "math"] and meta["base_model_relation"] == "finetune"


@pytest.mark.parametrize(("meta", "message"), [
    ({"license": "apache"}, "not a Hub license id"),
    ({"license": "other"}, "needs license_name and license_link"),
    ({"base_model": "/home/me/qwen"}, "must be Hub repo ids"),
    ({"datasets": ["~/data/train.jsonl"]}, "must be Hub repo ids"),
    ({"base_model": BASE, "base_model_relation": "distilled"}, "is not one of"),
    ({"base_model_relation": "finetune"}, "base_model is not"),
    ({"tags": [1, 2]}, "tags must be"),
])
def test_metadata_the_hub_would_refuse_is_refused_locally(meta: dict, message: str) -> None:
    with pytest.raises(CardError, match=message):
        validate_metadata(meta)


def test_metadata_the_hub_accepts_passes() -> None:
    validate_metadata({"license": "other", "license_name": "qwen", "license_link": "https://x.test/l",
                       "base_model": [BASE, "org/other"], "base_model_relation": "merge", "tags": "one"})


def test_templates_by_path_and_errors(folder: Path, tmp_path: Path) -> None:
    custom = tmp_path / "mine.md.j2"
    custom.write_text("---\n{{ card_data }}\n---\nstep {{ facts.global_step }} of {{ vars.run }}\n")
    options = CardOptions(license="mit", template=custom, variables={"run": "r1"})
    assert render_card(folder, options, log=lambda _: None).endswith("step None of r1\n")
    with pytest.raises(CardError, match="no bundled card template named 'fancy'"):
        render_card(folder, CardOptions(template="fancy"), log=lambda _: None)
    with pytest.raises(CardError, match=r"has no attribute 'run'"):
        render_card(folder, CardOptions(template=custom), log=lambda _: None)  # vars.run missing: an error, not a blank


def test_card_command_writes_readme_or_stdout(folder: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["card", str(folder), "--base-model", BASE, "--license", "apache-2.0",
                                 "--var", "reward=exact match"])
    assert result.exit_code == 0, result.output
    assert "**Reward:** exact match" in (folder / "README.md").read_text()
    result = runner.invoke(cli, ["card", str(folder), "--license", "mit", "--template", "minimal", "-o", "-"])
    assert result.stdout.startswith("---\n") and "license: mit" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--license", "Apache 2.0"], "error: model card metadata: license 'Apache 2.0' is not a Hub license id"),
    (["--card-data", "missing.yaml"], "error: cannot read card data missing.yaml"),
    (["--var", "novalue"], "'novalue' is not KEY=VALUE"),
    (["--template", "fancy"], "error: no bundled card template named 'fancy'"),
])
def test_card_command_bad_input_exits_2(folder: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["card", str(folder), *args])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (folder / "README.md").exists()


def test_card_options_default_equals_no_options() -> None:
    """push warns that options were ignored only when the user gave some: that check relies on this equality."""
    assert CardOptions(variables={}, template="default") == CardOptions()
