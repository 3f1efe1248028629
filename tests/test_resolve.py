"""Model references resolved against the in-repo Hub emulator with the real huggingface_hub client: public, private
and gated repos, pinned revisions, offline with and without the cache, a download cut mid-file, and torchrun ranks
sharing (or not sharing) a cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from hubexport.dist import Dist
from hubexport.errors import HubexportError, ResolveError
from hubexport.resolve import CARD_FILES, ResolvedModel, resolve_model
from tests.fakehub import FakeHub
from tests.hub_fixtures import ORG, READ_TOKEN, TOKEN, USER

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")
EXTRAS = {  # beside the transformers checkpoint: tokenizer/template files, and pickles that must never be fetched
    "tokenizer.model": b"sentencepiece", "merges.txt": b"a b\n", "vocab.json": b"{}", "chat_template.jinja": b"{{x}}",
    "README.md": b"---\nlicense: apache-2.0\n---\n", "pytorch_model.bin": b"PK\x03\x04pickle",
    "training_args.bin": b"\x80\x04pickle", "original/consolidated.00.pth": b"\x80\x04pickle",
}
PICKLED = {"pytorch_model.bin", "training_args.bin", "original/consolidated.00.pth"}


@pytest.fixture
def source(model_dir: Path) -> Path:
    for name, data in EXTRAS.items():
        (model_dir / name).parent.mkdir(exist_ok=True)
        (model_dir / name).write_bytes(data)
    return model_dir


def _upload(hub: FakeHub, source: Path, repo_id: str, *, private: bool = False) -> str:
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo_id, private=private)
    return api.upload_folder(repo_id=repo_id, folder_path=source).oid


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _resolve(ref: str, **kw: object) -> tuple[ResolvedModel, list[str]]:
    logs: list[str] = []
    return resolve_model(ref, purpose="--hf-model-path", log=logs.append, **kw), logs  # type: ignore[arg-type]


def test_local_folder_wins_over_a_hub_id(source: Path, monkeypatch: pytest.MonkeyPatch, fakehub: FakeHub,
                                         tmp_path: Path) -> None:
    local = tmp_path / "cwd" / ORG / "tiny"
    shutil.copytree(source, local)
    monkeypatch.chdir(tmp_path / "cwd")
    got, _ = _resolve(f"{ORG}/tiny")
    assert got == ResolvedModel(Path(f"{ORG}/tiny")) and got.sha is None
    assert fakehub.requests == []


def test_public_repo_downloads_what_is_read_and_no_pickles(source: Path, fakehub: FakeHub, hf_home: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    sha = _upload(fakehub, source, f"{ORG}/public")
    monkeypatch.delenv("HF_TOKEN")
    got, logs = _resolve(f"{ORG}/public")
    assert got.repo_id == f"{ORG}/public" and got.revision is None and got.sha == sha
    assert got.path == hf_home / "hub" / "models--rl-org--public" / "snapshots" / sha
    expected = _files(source) - PICKLED
    assert _files(got.path) == expected
    for name in expected:
        assert (got.path / name).read_bytes() == (source / name).read_bytes(), name
    assert not [p for p in fakehub.paths(contains="/resolve/") if p.endswith((".bin", ".pth"))]
    assert sha in logs[-1]
    card, _ = _resolve(f"{ORG}/public", files=CARD_FILES)  # what `card --base-model` needs: README and config
    assert _files(card.path) >= {"README.md", "config.json"}


def test_private_repo_needs_the_token(source: Path, fakehub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = _upload(fakehub, source, f"{USER}/secret", private=True)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ResolveError, match=f"--hf-model-path {USER}/secret: no such repo .* or it is private") as e:
        _resolve(f"{USER}/secret")
    assert "HF_TOKEN" in (e.value.hint or "")
    bad = "hf_WrongToken0123456789abcdefgh"
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(ResolveError, match="HTTP 401") as e:
        _resolve(f"{USER}/secret")
    assert bad not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    assert _resolve(f"{USER}/secret")[0].sha == sha


def test_gated_repo(source: Path, fakehub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    _upload(fakehub, source, f"{USER}/gated")
    fakehub.add_user("friend", "hf_FriendToken0123456789abcdef", role="read")
    fakehub.add_user("stranger", "hf_StrangerToken0123456789abcd", role="read")
    fakehub.gate(f"{USER}/gated", "friend")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ResolveError, match=f"{USER}/gated is gated") as e:
        _resolve(f"{USER}/gated")
    assert "accept its terms" in (e.value.hint or "")
    assert ("GET", f"/api/models/{USER}/gated/revision/main", 200) in fakehub.requests  # metadata is public
    monkeypatch.setenv("HF_TOKEN", "hf_StrangerToken0123456789abcd")
    with pytest.raises(ResolveError, match="is gated"):
        _resolve(f"{USER}/gated")
    assert any(status == 403 for _, _, status in fakehub.requests)
    monkeypatch.setenv("HF_TOKEN", "hf_FriendToken0123456789abcdef")
    got, _ = _resolve(f"{USER}/gated")
    assert (got.path / "model.safetensors.index.json").is_file()


def test_pinned_revisions(source: Path, fakehub: FakeHub) -> None:
    repo = f"{ORG}/pinned"
    main = _upload(fakehub, source, repo)
    api = HfApi(endpoint=fakehub.url, token=TOKEN)
    api.create_branch(repo, branch="v2")
    config = json.loads((source / "config.json").read_text()) | {"hubexport_test": "v2"}
    v2 = api.upload_file(path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id=repo,
                         revision="v2").oid
    got, _ = _resolve(f"{repo}@v2")
    assert (got.revision, got.sha) == ("v2", v2) and v2 != main
    assert json.loads((got.path / "config.json").read_text())["hubexport_test"] == "v2"
    got, _ = _resolve(f"{repo}@{main}")
    assert got.sha == main and "hubexport_test" not in json.loads((got.path / "config.json").read_text())
    with pytest.raises(ResolveError, match=f"{repo}@nope: the repo has no revision nope"):
        _resolve(f"{repo}@nope")


def test_offline_uses_the_cache_only(source: Path, fakehub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                     hf_home: Path) -> None:
    repo = f"{ORG}/offline"
    sha = _upload(fakehub, source, repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(fakehub.requests)
    with pytest.raises(ResolveError, match=f"{repo} is not in the cache .* HF_HUB_OFFLINE is set"):
        _resolve(repo)
    assert len(fakehub.requests) == before
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online, _ = _resolve(repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    after = len(fakehub.requests)
    offline, _ = _resolve(repo)
    assert offline == online and offline.sha == sha
    assert len(fakehub.requests) == after  # nothing asked of the Hub


def test_download_cut_mid_file_resumes_where_it_stopped(source: Path, fakehub: FakeHub,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # The client keeps what it received in whole read chunks (10 MB): small chunks make a tiny shard behave like a
    # real multi-GB one, where a cut lands after many chunks.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    repo = f"{ORG}/cut"
    _upload(fakehub, source, repo)
    shard = max(source.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    fakehub.inject("GET", rf"/resolve/[0-9a-f]{{40}}/{shard.name}$", cut=5000)
    got, _ = _resolve(repo)
    assert (got.path / shard.name).read_bytes() == shard.read_bytes()
    statuses = [s for m, p, s in fakehub.requests if m == "GET" and p.endswith("/" + shard.name)]
    assert statuses == [200, 206]  # the cut answer, then a Range request for the rest


def test_unknown_repo_and_bad_refs(fakehub: FakeHub, source: Path) -> None:
    with pytest.raises(ResolveError, match=f"{ORG}/missing: no such repo"):
        _resolve(f"{ORG}/missing")
    with pytest.raises(ResolveError, match="no such folder, and not a Hub id"):
        _resolve("./not/a/folder")
    with pytest.raises(ResolveError, match="not a Hub id"):
        _resolve(f"{ORG}/x@")
    (source / "model.safetensors.index.json").unlink()
    for shard in source.glob("*.safetensors"):
        shard.unlink()
    _upload(fakehub, source, f"{ORG}/pickles-only")
    with pytest.raises(ResolveError, match=r"has no \*\.safetensors weights"):
        _resolve(f"{ORG}/pickles-only")


def _rank(rank: int, init_file: str, base: str, repo: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {}
        for case, cache, ref in (("shared", "shared", repo), ("own", f"own-{rank}", repo),
                                 ("missing", "shared", f"{ORG}/missing")):
            os.environ["HF_HUB_CACHE"] = os.path.join(base, cache)
            try:
                result[case] = str(resolve_model(ref, purpose="--hf-model-path", log=print, dist=Dist(rank, 2)).path)
            except HubexportError as e:
                result[case] = f"error: {e.message}"
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def test_torchrun_ranks_download_once_per_cache(source: Path, fakehub: FakeHub, tmp_path: Path) -> None:
    repo = f"{ORG}/dist"
    sha = _upload(fakehub, source, repo)
    torch.multiprocessing.start_processes(_rank, args=(str(tmp_path / "rdzv"), str(tmp_path), repo, str(tmp_path)),
                                          nprocs=2, start_method="spawn")
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["shared"] == str(tmp_path / "shared" / "models--rl-org--dist" / "snapshots" / sha)
        assert result["own"] == str(tmp_path / f"own-{rank}" / "models--rl-org--dist" / "snapshots" / sha)
    assert results[0]["missing"].startswith(f"error: --hf-model-path {ORG}/missing: no such repo")
    assert results[1]["missing"].startswith(f"error: rank 0 failed: --hf-model-path {ORG}/missing")
    for shard in source.glob("*.safetensors"):
        gets = [p for m, p, _ in fakehub.requests if m == "GET" and p.endswith("/" + shard.name)]
        assert len(gets) == 3, shard.name  # once into the shared cache, then once into each rank's own
