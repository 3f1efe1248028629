"""`hubexport push` against the emulator, through the real huggingface_hub client: visibility, both LFS paths and a
bitwise download, idempotent and resumable re-runs, branches and PRs, one-line auth errors, and no token leaks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from huggingface_hub import snapshot_download

from hubexport import executor
from hubexport.cli import cli
from hubexport.errors import HubError
from hubexport.hub import PushResult
from hubexport.options import PushOptions
from tests.fakehub import FakeHub
from tests.hub_fixtures import ORG, READ_TOKEN, TOKEN, USER, hub_env

REPO = f"{USER}/qwen-grpo"
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # huggingface_hub's own PUTs


def push_folder(folder: Path) -> PushResult:
    return executor.push(folder, PushOptions(REPO), log=lambda _: None).push


def run_cli(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def push_json(folder: Path, *args: str) -> dict:
    result = run_cli("push", str(folder), "--repo-id", REPO, "--json", "--license", "apache-2.0", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_downloads_bitwise(hub: FakeHub, folder: Path, tmp_path: Path, repo: str = REPO) -> None:
    got = Path(snapshot_download(repo, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "download"))
    local = sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in got.iterdir() if p.name not in (".gitattributes", "README.md")) == local
    assert (got / "README.md").is_file()  # the card, generated in memory: the folder itself is never written
    for name in local:
        assert (got / name).read_bytes() == (folder / name).read_bytes(), name


def test_private_push_uploads_every_shard_through_both_lfs_paths(fakehub: FakeHub, model_dir: Path,
                                                                 tmp_path: Path) -> None:
    out = push_json(model_dir, "--private")
    assert fakehub.repos[f"model:{REPO}"].private is True
    assert fakehub.transfers["basic"] > 0 and fakehub.transfers["multipart"] > 0
    assert out["commit_sha"] == fakehub.repos[f"model:{REPO}"].refs["main"]
    files = list(model_dir.iterdir())
    card = fakehub.files(REPO)["README.md"].data
    assert out["files_uploaded"] == len(files) + 1
    assert out["bytes_uploaded"] == sum(f.stat().st_size for f in files) + len(card)
    assert out["repo_url"] == f"{fakehub.url}/{REPO}" and out["private"] is True and out["no_op"] is False
    assert_downloads_bitwise(fakehub, model_dir, tmp_path)
    assert b"license: apache-2.0" in card and not (model_dir / "README.md").exists()


def test_public_push_into_an_org(fakehub: FakeHub, model_dir: Path) -> None:
    result = run_cli("push", str(model_dir), "--repo-id", f"{ORG}/public-model", "--license", "mit")
    assert result.exit_code == 0, result.output
    assert fakehub.repos[f"model:{ORG}/public-model"].private is False
    assert f"{fakehub.url}/{ORG}/public-model (public)" in result.stdout


def test_rerun_with_nothing_changed_makes_no_commit(fakehub: FakeHub, model_dir: Path) -> None:
    first = push_json(model_dir)
    requests_before = len(fakehub.requests)
    result = run_cli("push", str(model_dir), "--repo-id", REPO, "--json", "--license", "apache-2.0")
    second = json.loads(result.stdout)
    assert second["no_op"] is True and second["commit_sha"] == first["commit_sha"] and second["files_uploaded"] == 0
    assert "nothing changed" in result.stderr
    assert fakehub.commit_count(REPO) == 2  # the seed commit and the first push
    assert not [p for m, p, _ in fakehub.requests[requests_before:] if m in ("PUT", "POST") and "whoami" not in p]


def test_only_changed_files_are_sent_and_stale_shards_are_removed(fakehub: FakeHub, model_dir: Path) -> None:
    extra = model_dir / "model-00009-of-00009.safetensors"
    extra.write_bytes((model_dir / "model-00001-of-00007.safetensors").read_bytes())
    push_json(model_dir)
    extra.unlink()
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    out = push_json(model_dir)
    card = fakehub.files(REPO)["README.md"].data
    assert out["files_uploaded"] == 2  # config.json, and the card, whose shard table lost the stale shard
    assert out["bytes_uploaded"] == (model_dir / "config.json").stat().st_size + len(card)
    assert b"model-00009-of-00009" not in card
    assert extra.name not in fakehub.files(REPO)
    assert json.loads(fakehub.files(REPO)["config.json"].data)["use_cache"] is False


def test_upload_killed_mid_way_resumes_without_resending(fakehub: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    release = threading.Event()
    fakehub.inject("PUT", r"^/_lfs/", stall=release)  # the first LFS PUT hangs; the other workers carry on
    cmd = [sys.executable, "-m", "hubexport", "push", str(model_dir), "--repo-id", REPO, "--license", "mit"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=hub_env(fakehub), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = len(list(model_dir.glob("*.safetensors")))
    deadline = time.monotonic() + 60
    while (len(fakehub.stored) < shards - 1 or not fakehub.stalled.is_set()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    release.set()
    assert len(fakehub.stored) == shards - 1 and fakehub.commit_count(REPO) == 1  # killed before its commit
    puts_before = len(fakehub.paths("PUT"))

    result = push_folder(model_dir)

    resent = fakehub.paths("PUT")[puts_before:]
    assert 0 < len(resent) <= 5  # the one unfinished shard (at most 5 parts of 4 KB), nothing else
    assert all(n == 1 for n in fakehub.stored.values()) and len(fakehub.stored) == shards
    assert fakehub.commit_count(REPO) == 2 and result.files_uploaded == len(list(model_dir.iterdir())) + 1
    assert_downloads_bitwise(fakehub, model_dir, tmp_path)


def test_commit_lost_on_the_wire_then_rerun_sends_no_lfs_bytes(fakehub: FakeHub, model_dir: Path) -> None:
    fakehub.inject("POST", r"/commit/", drop=True)
    with pytest.raises(HubError, match="cannot reach"):
        push_folder(model_dir)
    puts = len(fakehub.paths("PUT"))
    result = push_folder(model_dir)
    assert len(fakehub.paths("PUT")) == puts and result.commit_sha == fakehub.repos[f"model:{REPO}"].refs["main"]


def test_transient_faults_are_retried(fakehub: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    fakehub.inject("POST", r"/preupload/", status=429, headers={"Retry-After": "0"})
    fakehub.inject("PUT", r"^/_lfs/put/", status=500)
    fakehub.inject("PUT", r"^/_lfs/part/", drop=True)
    push_folder(model_dir)
    assert {429, 500, 0} <= {s for _, _, s in fakehub.requests}
    assert_downloads_bitwise(fakehub, model_dir, tmp_path)


@pytest.mark.parametrize(("env", "repo", "expected"), [
    ({"HF_TOKEN": "hf_WrongToken0123456789"}, REPO, "HTTP 401"),
    ({"HF_TOKEN": READ_TOKEN}, REPO, "read-only"),
    ({}, "someone-else/model", "cannot write to the namespace someone-else"),
    ({"HF_TOKEN": None}, REPO, "no Hugging Face token found"),
])
def test_auth_failures_are_one_clear_error_before_any_upload(fakehub: FakeHub, model_dir: Path,
                                                             env: dict[str, str | None], repo: str,
                                                             expected: str) -> None:
    result = run_cli("push", str(model_dir), "--repo-id", repo, "--license", "mit", env=env)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1 and expected in error[0], result.stderr
    assert any(line.startswith("hint:") for line in lines)
    assert not fakehub.repos and not fakehub.stored
    assert all(token not in result.output for token in (TOKEN, READ_TOKEN, "hf_WrongToken0123456789"))


@pytest.mark.parametrize("front_matter", ["license: not-a-license", "license: [", "base_model: /home/me/qwen"])
def test_bad_card_metadata_fails_before_any_request(fakehub: FakeHub, model_dir: Path, front_matter: str) -> None:
    (model_dir / "README.md").write_text(f"---\n{front_matter}\n---\n# model\n")
    result = run_cli("push", str(model_dir), "--repo-id", REPO)
    assert result.exit_code == 2 and "error: model card metadata" in result.stderr
    assert fakehub.requests == []


def test_metadata_refused_by_the_hub_stops_before_lfs(fakehub: FakeHub, model_dir: Path) -> None:
    fakehub.inject("POST", r"/api/validate-yaml", status=400,
                   body={"errors": [{"message": '"license" is not valid'}], "warnings": []})
    with pytest.raises(HubError, match=r"Invalid metadata in README\.md.*license"):
        push_folder(model_dir)
    assert not fakehub.stored and not fakehub.paths(contains="/preupload/")


def test_token_never_appears_in_output_card_or_errors(fakehub: FakeHub, model_dir: Path) -> None:
    env = hub_env(fakehub)
    ok = subprocess.run([sys.executable, "-m", "hubexport", "push", str(model_dir), "--repo-id", REPO, "--license",
                         "mit", "--var", "reward=exact match"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    # A server that echoes the token back in its error must not make hubexport print it.
    fakehub.inject("POST", r"/preupload/", status=403, body={"error": f"token {TOKEN} may not write here"})
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text() + "\n")
    failed = subprocess.run([sys.executable, "-m", "hubexport", "push", str(model_dir), "--repo-id", REPO], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    assert failed.returncode == 2 and "HTTP 403" in failed.stderr and "***" in failed.stderr
    for text in (ok.stdout, ok.stderr, failed.stdout, failed.stderr, fakehub.files(REPO)["README.md"].data.decode()):
        assert TOKEN not in text
    assert not fakehub.paths(contains="xet-write-token")  # Xet was switched off for a non-huggingface.co endpoint


def test_xet_is_switched_off_for_other_endpoints_and_restored(fakehub: FakeHub, model_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # as in a fresh process with hf_xet installed
    push_folder(model_dir)
    assert not fakehub.paths(contains="xet-write-token") and fakehub.stored
    assert constants.HF_HUB_DISABLE_XET is False


def test_dry_run_creates_and_sends_nothing(fakehub: FakeHub, model_dir: Path) -> None:
    result = run_cli("push", str(model_dir), "--repo-id", REPO, "--license", "mit", "--dry-run", "--json")
    out = json.loads(result.stdout)
    files = list(model_dir.iterdir())
    assert out["files_uploaded"] == len(files) + 1  # + the README it would generate
    assert out["commit_sha"] is None and "would create public repo" in result.stderr
    assert not (model_dir / "README.md").exists()
    assert not fakehub.repos and all(m == "GET" for m, _, _ in fakehub.requests)


def test_revision_branch_is_created_and_pr_is_opened(fakehub: FakeHub, model_dir: Path) -> None:
    push_json(model_dir, "--revision", "step-200", "--commit-message", "GRPO step 200")
    repo = fakehub.repos[f"model:{REPO}"]
    assert "config.json" in fakehub.files(REPO, "step-200") and "config.json" not in fakehub.files(REPO, "main")
    out = push_json(model_dir, "--create-pr")
    assert out["pr_url"] == f"{fakehub.url}/{REPO}/discussions/1"
    assert "config.json" in fakehub.files(REPO, "refs/pr/1") and "config.json" not in fakehub.files(REPO, "main")
    assert repo.refs["refs/pr/1"] == out["commit_sha"]


def test_existing_repo_keeps_its_visibility_with_a_warning(fakehub: FakeHub, model_dir: Path) -> None:
    fakehub.create_repo("model", REPO, private=False)
    result = run_cli("push", str(model_dir), "--repo-id", REPO, "--private", "--license", "mit")
    assert result.exit_code == 0
    assert "warning: tester/qwen-grpo already exists and is public" in result.stderr
    assert fakehub.repos[f"model:{REPO}"].private is False


def test_offline_mode_fails_early(fakehub: FakeHub, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_folder(model_dir)
    assert fakehub.requests == []


def test_a_missing_source_is_refused_before_any_request(fakehub: FakeHub, tmp_path: Path) -> None:
    result = run_cli("push", str(tmp_path / "nope"), "--repo-id", REPO)
    assert result.exit_code == 2 and "error:" in result.stderr and "hint:" in result.stderr
    assert fakehub.requests == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verl-style checkpoint made by a real training step (world size 1: no processes to spawn), with the run's
    resolved Hydra config at the run root, as verl leaves it."""
    from hubexport.examples import FsdpCase, make_case

    root = tmp_path_factory.mktemp("ckpt")
    make_case(FsdpCase("run", fsdp=0, world_size=1), root)
    (root / "run" / "config.yaml").write_text(
        "algorithm: {adv_estimator: grpo}\nactor_rollout_ref: {actor: {strategy: fsdp}}\n"
        f"trainer: {{wandb_api_key: {TOKEN}, default_local_dir: /home/alice/ckpts/run}}\n")
    return root / "run" / "global_step_1" / "actor"


def test_push_of_a_checkpoint_merges_in_a_temp_dir_renders_the_card_and_is_idempotent(
        fakehub: FakeHub, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    args = ("push", str(checkpoint), "--repo-id", REPO, "--private", "--base-model", "Qwen/Qwen2.5-0.5B-Instruct",
            "--license", "apache-2.0", "--json")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)
    files = fakehub.files(REPO)
    assert {"config.json", "README.md", "model.safetensors"} <= set(files)
    readme = files["README.md"].data.decode()
    assert "verl FSDP checkpoint" in readme and "| Training step | 1 |" in readme and "- grpo" in readme
    assert TOKEN not in readme and "/home/alice" not in readme and f"model_id = \"{REPO}\"" in readme
    assert list(scratch.iterdir()) == []  # the merged copy is gone
    again = json.loads(run_cli(*args).stdout)  # merge and card are deterministic: same bytes, so no commit
    assert again["no_op"] is True and again["commit_sha"] == first["commit_sha"]


def test_push_of_a_checkpoint_keeps_target_dir_and_fails_fast_on_a_bad_token(fakehub: FakeHub, checkpoint: Path,
                                                                              tmp_path: Path) -> None:
    target = tmp_path / "merged"
    bad = run_cli("push", str(checkpoint), "--repo-id", REPO, "--target-dir", str(target),
                  env={"HF_TOKEN": "hf_WrongToken0123456789"})
    assert bad.exit_code == 2 and "HTTP 401" in bad.stderr and not target.exists()  # no merge for a bad token
    ok = run_cli("push", str(checkpoint), "--repo-id", REPO, "--target-dir", str(target), "--license", "mit")
    assert ok.exit_code == 0, ok.output
    assert (target / "README.md").is_file() and (target / "config.json").is_file()


def test_verl_merge_flag_hf_upload_path_pushes_with_a_card(fakehub: FakeHub, checkpoint: Path,
                                                           tmp_path: Path) -> None:
    result = run_cli("merge", "--backend", "fsdp", "--local_dir", str(checkpoint), "--target_dir",
                     str(tmp_path / "out"), "--hf_upload_path", REPO, "--private", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["push"]["private"] is True
    assert fakehub.repos[f"model:{REPO}"].private is True and "README.md" in fakehub.files(REPO)


def test_dry_run_of_a_checkpoint_plans_the_merge_and_sends_nothing(fakehub: FakeHub, checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    target = tmp_path / "merged"
    result = run_cli("push", str(checkpoint), "--repo-id", REPO, "--target-dir", str(target), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["files_uploaded"] >= 1 and out["commit_sha"] is None
    assert not target.exists() and not fakehub.repos and all(m == "GET" for m, _, _ in fakehub.requests)
    assert out["dry_run"] is True and out["model"]["source"].startswith("verl FSDP checkpoint")


def test_json_result_says_what_was_pushed_with_shard_digests(fakehub: FakeHub, model_dir: Path) -> None:
    """What CI (the action's summary) reads: the folder, the model facts, every shard with its size and sha256."""
    from hubexport.model_facts import sha256_file

    out = push_json(model_dir)
    assert out["target_dir"] == str(model_dir) and out["dry_run"] is False
    model = out["model"]
    assert model["architecture"] == "Qwen2ForCausalLM" and model["source"] is None and model["dtype"] == "float32"
    shards = sorted(model_dir.glob("*.safetensors"))
    assert [s["name"] for s in model["shards"]] == [p.name for p in shards]
    for entry, path in zip(model["shards"], shards, strict=True):
        assert entry["size"] == path.stat().st_size and entry["sha256"] == sha256_file(path)
        assert fakehub.files(REPO)[path.name].lfs == entry["sha256"]


def test_push_under_torchrun_with_a_bad_token_stops_every_rank_before_the_merge(fakehub: FakeHub, checkpoint: Path,
                                                                                 tmp_path: Path) -> None:
    """Rank 0 checks the token; the other ranks must not wait for it in the merge's collectives (that would hang)."""
    target = tmp_path / "merged"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hubexport",
           "push", str(checkpoint), "--repo-id", REPO, "--target-dir", str(target), "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=hub_env(fakehub, token="hf_WrongToken0123456789"), capture_output=True,
                          text=True, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "HTTP 401" in errors[0]  # rank 0 reports, once
    assert proc.stdout.strip() == "" and not target.exists() and not fakehub.repos
