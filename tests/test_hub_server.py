"""Tests of tests/hub_server.py, driven by the real ``huggingface_hub`` client and by transformers."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest


import huggingface_hub.constants  # noqa: E402
from hub_server import LocalHub, git_blob_sha1, hub_environment  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

SHA_RE = re.compile(r"^[0-9a-f]{40}$")


@pytest.fixture
def hub():
    with LocalHub() as local_hub:
        yield local_hub


@pytest.fixture
def hf_env(hub, tmp_path):
    with hub_environment(hub, tmp_path) as home:
        yield home


@pytest.fixture
def api(hub, hf_env):
    return HfApi(endpoint=hub.endpoint, token=hub.token)


def _make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"hidden_size": 32, "name": "tiny"}).encode(),
        "README.md": b"# tiny\n\nA test repo.\n",
        "weights.bin": bytes(range(256)) * 64 + b"\x00\xff" * 1000,  # binary, includes NUL bytes
        "nested/dir/extra.txt": "héllo wörld\n".encode(),
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


def _raw(hub, method, path, data=None, token=None, headers=None):
    """Plain stdlib request, to look at raw status codes and headers."""
    req = urllib.request.Request(hub.endpoint + path, data=data, method=method, headers=dict(headers or {}))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_create_repo_and_repo_info(api, hub):
    url = api.create_repo("alice/tiny")
    assert url.repo_id == "alice/tiny" and url.startswith(hub.endpoint)
    info = api.model_info("alice/tiny")
    assert SHA_RE.match(info.sha)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert api.repo_exists("alice/tiny") and not api.repo_exists("alice/nope")

    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("alice/tiny")
    assert exc.value.response.status_code == 409
    assert api.create_repo("alice/tiny", exist_ok=True).repo_id == "alice/tiny"
    # No namespace: the token's user, like on the Hub.
    assert api.create_repo("solo").repo_id == f"{hub.user}/solo"
    assert api.whoami()["name"] == hub.user
    api.delete_repo("alice/tiny")
    assert not api.repo_exists("alice/tiny")


def test_upload_folder_and_download_roundtrip(api, hub, tmp_path):
    folder = tmp_path / "upload"
    files = _make_folder(folder)
    api.create_repo("alice/roundtrip")
    commit = api.upload_folder(folder_path=folder, repo_id="alice/roundtrip", commit_message="add files")
    assert SHA_RE.match(commit.oid)
    assert api.model_info("alice/roundtrip").sha == commit.oid

    assert set(api.list_repo_files("alice/roundtrip")) == set(files) | {".gitattributes"}
    top = {e.path: type(e).__name__ for e in api.list_repo_tree("alice/roundtrip")}
    assert top == {".gitattributes": "RepoFile", "config.json": "RepoFile", "README.md": "RepoFile",
                   "weights.bin": "RepoFile", "nested": "RepoFolder"}
    deep = {e.path for e in api.list_repo_tree("alice/roundtrip", path_in_repo="nested", recursive=True)}
    assert deep == {"nested/dir", "nested/dir/extra.txt"}
    sizes = {s.rfilename: s.size for s in api.model_info("alice/roundtrip", files_metadata=True).siblings}
    assert all(sizes[p] == len(c) for p, c in files.items())

    for rel, content in files.items():
        path = hf_hub_download("alice/roundtrip", rel)
        assert Path(path).read_bytes() == content
        meta = get_hf_file_metadata(hf_hub_url("alice/roundtrip", rel))
        assert (meta.commit_hash, meta.etag, meta.size) == (commit.oid, git_blob_sha1(content), len(content))

    snap = Path(snapshot_download("alice/roundtrip", cache_dir=tmp_path / "other_cache"))
    assert snap.name == commit.oid
    assert all((snap / rel).read_bytes() == content for rel, content in files.items())
    assert hub.unhandled == []


def test_new_commit_keeps_old_revision(api, tmp_path):
    folder = tmp_path / "upload"
    files = _make_folder(folder)
    api.create_repo("alice/revs")
    old = api.upload_folder(folder_path=folder, repo_id="alice/revs").oid

    new_weights = b"\x01\x02" * 5000
    new = api.create_commit(
        "alice/revs",
        operations=[CommitOperationAdd("weights.bin", new_weights), CommitOperationDelete("nested/dir/extra.txt")],
        commit_message="change weights",
    ).oid
    assert SHA_RE.match(new) and new != old
    assert api.model_info("alice/revs").sha == new
    assert api.model_info("alice/revs", revision=old).sha == old

    assert Path(hf_hub_download("alice/revs", "weights.bin", revision=old)).read_bytes() == files["weights.bin"]
    assert Path(hf_hub_download("alice/revs", "weights.bin", revision="main")).read_bytes() == new_weights
    assert Path(hf_hub_download("alice/revs", "weights.bin")).read_bytes() == new_weights
    old_extra = hf_hub_download("alice/revs", "nested/dir/extra.txt", revision=old)
    assert Path(old_extra).read_bytes() == files["nested/dir/extra.txt"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/revs", "nested/dir/extra.txt", revision="main")
    assert "nested/dir/extra.txt" not in api.list_repo_files("alice/revs")
    assert "nested/dir/extra.txt" in api.list_repo_files("alice/revs", revision=old)

    # Unchanged files are detected through the preupload "oid" and skipped (no empty commit).
    again = api.create_commit("alice/revs", [CommitOperationAdd("weights.bin", new_weights)], commit_message="noop")
    assert again.oid == new
    # Branches: a commit on a new branch does not move main.
    api.create_branch("alice/revs", branch="dev")
    dev = api.upload_file(path_or_fileobj=b"dev only", path_in_repo="dev.txt", repo_id="alice/revs", revision="dev")
    assert api.model_info("alice/revs", revision="dev").sha == dev.oid != api.model_info("alice/revs").sha


def test_dataset_repo(api, hub):
    url = api.create_repo("alice/data", repo_type="dataset")
    assert url.repo_type == "dataset" and url.endswith("/datasets/alice/data")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id="alice/data",
                    repo_type="dataset")
    assert hf_hub_download("alice/data", "data/train.csv", repo_type="dataset") == str(
        Path(snapshot_download("alice/data", repo_type="dataset")) / "data" / "train.csv")
    assert [s.rfilename for s in api.dataset_info("alice/data").siblings] == [".gitattributes", "data/train.csv"]
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/data")  # same name, other repo type


def test_not_found_errors(api, hub):
    api.create_repo("alice/errs")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/errs", "missing.txt")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/errs", ".gitattributes", revision="no-such-branch")

    head = api.model_info("alice/errs").sha
    status, headers, _ = _raw(hub, "HEAD", "/alice/errs/resolve/main/missing.txt")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", head)
    status, headers, _ = _raw(hub, "GET", "/alice/nope/resolve/main/x")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    status, headers, body = _raw(hub, "GET", "/alice/errs/resolve/main/.gitattributes")
    assert status == 200 and headers["X-Repo-Commit"] == head
    assert headers["ETag"] == f'"{git_blob_sha1(body)}"' and int(headers["Content-Length"]) == len(body)


def test_writes_need_the_token(api, hub, tmp_path):
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.create_repo("alice/anon")
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").create_repo("alice/anon")
    assert exc.value.response.status_code == 401

    api.create_repo("alice/guarded")
    folder = tmp_path / "upload"
    _make_folder(folder)
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.upload_folder(folder_path=folder, repo_id="alice/guarded")
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.create_commit("alice/guarded", [CommitOperationAdd("a.txt", b"a")], commit_message="x")
    assert exc.value.response.status_code == 401
    # The commit endpoint itself refuses an unauthenticated NDJSON body.
    ndjson = b'{"key": "header", "value": {"summary": "x", "description": ""}}\n'
    status, _, _ = _raw(hub, "POST", "/api/models/alice/guarded/commit/main", ndjson,
                        headers={"Content-Type": "application/x-ndjson"})
    assert status == 401
    status, _, body = _raw(hub, "POST", "/api/models/alice/guarded/commit/main", ndjson, token=hub.token,
                           headers={"Content-Type": "application/x-ndjson"})
    assert status == 200 and SHA_RE.match(json.loads(body)["commitOid"])

    # Reads of a public repo need no token; a private repo is hidden from anonymous readers.
    assert anonymous.model_info("alice/guarded").sha == api.model_info("alice/guarded").sha
    assert [s.rfilename for s in anonymous.model_info("alice/guarded").siblings] == [".gitattributes"]
    api.create_repo("alice/secret", private=True)
    assert api.model_info("alice/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("alice/secret")


def test_invalid_repo_names(api, hub):
    for bad in ("alice/bad name", "alice/a--b", "alice/x/y", "alice/trailing.", "alice/name.git"):
        with pytest.raises(HFValidationError):
            api.create_repo(bad)
    # Names the client lets through but the server refuses, with a 400 like the Hub.
    for bad in ("alice/_leading-underscore", "alice/trailing_", "_org/name"):
        with pytest.raises(HfHubHTTPError) as exc:
            api.create_repo(bad)
        assert exc.value.response.status_code == 400
        assert "Invalid repo name" in str(exc.value)
    assert not api.repo_exists("alice/_leading-underscore")


def test_stopped_server_gives_connection_errors(tmp_path, monkeypatch):
    import httpx2
    import huggingface_hub.utils._http as hf_http

    # The client retries a refused connection 5 times with 1-8 s sleeps (~23 s): skip the sleeps, keep the retries.
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda seconds: None))

    hub = LocalHub().start()
    with hub_environment(hub, tmp_path):
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        api.create_repo("alice/gone")
        api.upload_file(path_or_fileobj=b"cached", path_in_repo="cached.txt", repo_id="alice/gone")
        cached = hf_hub_download("alice/gone", "cached.txt")
        hub.stop()
        hub.stop()  # idempotent
        with pytest.raises(httpx2.ConnectError):
            api.model_info("alice/gone")
        with pytest.raises(httpx2.ConnectError):
            api.create_repo("alice/other")
        # hf_hub_download falls back to the cache when the server is unreachable...
        assert hf_hub_download("alice/gone", "cached.txt") == cached
        # ...and raises LocalEntryNotFoundError for what it never downloaded.
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download("alice/gone", ".gitattributes", etag_timeout=1)
    with pytest.raises(RuntimeError):
        _ = hub.endpoint


def test_hub_environment_restores_everything(hub, tmp_path):
    before_env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE")}
    before = (huggingface_hub.constants.ENDPOINT, huggingface_hub.constants.HF_HUB_CACHE,
              huggingface_hub.constants.HF_HUB_OFFLINE)
    with hub_environment(hub, tmp_path, login=True) as home:
        assert huggingface_hub.constants.ENDPOINT == os.environ["HF_ENDPOINT"] == hub.endpoint
        assert huggingface_hub.constants.HF_HUB_CACHE == str(home / "hub")
        assert huggingface_hub.constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"
        assert os.environ["HF_TOKEN"] == hub.token
        # Module-level helpers (bound to a shared HfApi) and implicit token both work.
        assert huggingface_hub.create_repo("alice/implicit").repo_id == "alice/implicit"
    assert {k: os.environ.get(k) for k in before_env} == before_env
    assert (huggingface_hub.constants.ENDPOINT, huggingface_hub.constants.HF_HUB_CACHE,
            huggingface_hub.constants.HF_HUB_OFFLINE) == before


def test_transformers_push_to_hub_and_from_pretrained(hub, hf_env):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    input_ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_v1 = model(input_ids).logits

    first = model.push_to_hub("tiny-bert", token=hub.token)  # no namespace: the token's user
    repo_id = f"{hub.user}/tiny-bert"
    assert first.repo_url.repo_id == repo_id
    files = set(HfApi(endpoint=hub.endpoint).list_repo_files(repo_id))
    assert {"config.json", "model.safetensors", "README.md"} <= files

    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(repo_id).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected_v1)

    # A second push makes a new revision; the old one still loads the old weights.
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
        expected_v2 = model(input_ids).logits
    second = model.push_to_hub(repo_id, token=hub.token)
    assert second.oid != first.oid
    auto = transformers.AutoModelForSequenceClassification
    with torch.no_grad():
        assert torch.equal(auto.from_pretrained(repo_id).eval()(input_ids).logits, expected_v2)
        assert torch.equal(auto.from_pretrained(repo_id, revision=first.oid).eval()(input_ids).logits, expected_v1)
        assert torch.equal(auto.from_pretrained(repo_id, revision="main").eval()(input_ids).logits, expected_v2)
    assert hub.unhandled == []
