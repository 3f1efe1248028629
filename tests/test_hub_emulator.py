"""The emulator's contract (docs/hub-and-action.md, Appendix A), driven by the real huggingface_hub client, so the
push tests that rely on it test something real."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from tests.fakehub import FakeHub
from tests.hub_fixtures import READ_TOKEN, TOKEN, USER

REPO = f"{USER}/emu"
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # huggingface_hub's own PUTs


@pytest.fixture
def api(fakehub: FakeHub) -> HfApi:
    return HfApi(endpoint=fakehub.url, token=TOKEN)


def test_upload_both_lfs_paths_then_download_bitwise(api: HfApi, fakehub: FakeHub, model_dir: Path,
                                                      tmp_path: Path) -> None:
    api.create_repo(REPO, private=True)
    api.upload_folder(repo_id=REPO, folder_path=model_dir)
    assert fakehub.transfers["basic"] > 0 and fakehub.transfers["multipart"] > 0
    assert all(n == 1 for n in fakehub.stored.values())
    got = Path(snapshot_download(REPO, endpoint=fakehub.url, token=TOKEN, cache_dir=tmp_path / "dl"))
    for f in model_dir.iterdir():
        assert (got / f.name).read_bytes() == f.read_bytes(), f.name


def test_reupload_sends_nothing(api: HfApi, fakehub: FakeHub, model_dir: Path) -> None:
    api.create_repo(REPO)
    first = api.upload_folder(repo_id=REPO, folder_path=model_dir)
    puts = len(fakehub.paths("PUT"))
    second = api.upload_folder(repo_id=REPO, folder_path=model_dir)
    assert second.oid == first.oid
    assert len(fakehub.paths("PUT")) == puts
    assert fakehub.commit_count(REPO) == 2  # the seed commit and one upload


def test_create_existing_repo_is_409(api: HfApi) -> None:
    api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(REPO)
    assert e.value.response.status_code == 409
    api.create_repo(REPO, exist_ok=True)


def test_visibility_sent_by_the_client_is_honoured(api: HfApi) -> None:
    api.create_repo(REPO, private=True)
    api.create_repo(f"{USER}/pub", private=False)
    assert api.repo_info(REPO).private is True
    assert api.repo_info(f"{USER}/pub").private is False
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=api.endpoint, token=False).repo_info(REPO)


def test_stale_parent_commit_is_412(api: HfApi) -> None:
    api.create_repo(REPO)
    parent = api.repo_info(REPO).sha
    api.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id=REPO)
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=b"two", path_in_repo="b.txt", repo_id=REPO, parent_commit=parent)
    assert e.value.response.status_code == 412


def test_bad_token_is_401_and_read_token_is_403(fakehub: FakeHub, api: HfApi) -> None:
    api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=fakehub.url, token="hf_nope").whoami()
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=fakehub.url, token=READ_TOKEN).upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO)
    assert e.value.response.status_code == 403
    assert fakehub.paths("POST", "/preupload/")


def test_invalid_readme_is_refused_before_any_upload(api: HfApi, fakehub: FakeHub, model_dir: Path) -> None:
    api.create_repo(REPO)
    (model_dir / "README.md").write_text("---\nbase_model_relation: distilled\n---\n# x\n")
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_folder(repo_id=REPO, folder_path=model_dir)
    assert not fakehub.paths(contains="/preupload/") and not fakehub.stored


def test_lfs_put_with_wrong_content_is_rejected(api: HfApi, fakehub: FakeHub) -> None:
    api.create_repo(REPO)
    data = b"\0" * 1000
    oid = hashlib.sha256(data).hexdigest()
    batch = httpx2.post(f"{fakehub.url}/{REPO}.git/info/lfs/objects/batch",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert httpx2.put(href, content=b"\1" * 1000).status_code == 400
    assert not fakehub.stored
    assert httpx2.put(href, content=data).status_code == 200
    assert fakehub.stored[oid] == 1


def test_tree_resolve_and_range(api: HfApi, fakehub: FakeHub, tmp_path: Path) -> None:
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"hello world", path_in_repo="sub/dir/a.txt", repo_id=REPO)
    assert [f.path for f in api.list_repo_tree(REPO)] == [".gitattributes", "sub"]
    assert "sub/dir/a.txt" in [f.path for f in api.list_repo_tree(REPO, recursive=True)]
    assert Path(hf_hub_download(REPO, "sub/dir/a.txt", endpoint=fakehub.url, cache_dir=tmp_path)).read_bytes() \
        == b"hello world"
    r = httpx2.get(f"{fakehub.url}/{REPO}/resolve/main/sub/dir/a.txt", headers={"Range": "bytes=6-"})
    assert (r.status_code, r.content) == (206, b"world")
    missing = httpx2.head(f"{fakehub.url}/{REPO}/resolve/main/nope")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert missing.headers["X-Repo-Commit"]


def test_injected_faults_are_retried_by_the_client(api: HfApi, fakehub: FakeHub, model_dir: Path) -> None:
    api.create_repo(REPO)
    fakehub.inject("POST", r"/preupload/", status=429, headers={"Retry-After": "0"})
    fakehub.inject("PUT", r"^/_lfs/put/", status=503)
    fakehub.inject("PUT", r"^/_lfs/part/", drop=True)
    api.upload_folder(repo_id=REPO, folder_path=model_dir)
    statuses = [s for _, _, s in fakehub.requests]
    assert 429 in statuses and 503 in statuses and 0 in statuses  # 0: the dropped connection
    assert sorted(fakehub.files(REPO)) == sorted([".gitattributes", *(f.name for f in model_dir.iterdir())])
