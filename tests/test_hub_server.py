"""The loopback Hub server itself: plain HTTP (urllib) and huggingface_hub's HfApi(endpoint=...).

HfApi / hf_hub_download take the endpoint as an argument, so these run in-process; the full
push/pull round trip through transformers and peft (which read HF_ENDPOINT at import) is in
test_hub.py."""

import base64
import json
import urllib.error
import urllib.request

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import hf_hybrid_attn.testing
from hf_hybrid_attn.testing import DEFAULT_TOKEN, LoopbackHub, git_blob_sha, validate_card_metadata

REPO = "tester/demo"


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    # The suite runs with HF_HUB_OFFLINE=1 (scripts/run_tests.sh); these requests only reach 127.0.0.1.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(tmp_path):
    with LoopbackHub(root=str(tmp_path / "hub")) as server:
        yield server
    assert server.unknown_requests == []


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.endpoint, token=DEFAULT_TOKEN)


def http(hub, method, path, body=None, token=DEFAULT_TOKEN, headers=None):
    """(status, headers, body bytes) of one request; errors are answers, not exceptions."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(hub.endpoint + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def ndjson(*items):
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def add(path, data: bytes):
    return {"key": "file", "value": {"path": path, "encoding": "base64", "content": base64.b64encode(data).decode()}}


HEADER = {"key": "header", "value": {"summary": "raw commit", "description": ""}}


def test_create_upload_download_with_revisions(hub, api, tmp_path):
    url = api.create_repo(REPO)
    assert url.repo_id == REPO
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # 409 handled by the client
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(REPO)
    assert e.value.response.status_code == 409
    initial = api.model_info(REPO).sha
    assert [s.rfilename for s in api.model_info(REPO).siblings] == [".gitattributes"]

    c1 = api.upload_file(path_or_fileobj=b"one", path_in_repo="dir/f.txt", repo_id=REPO)
    c2 = api.upload_file(path_or_fileobj=b"two", path_in_repo="dir/f.txt", repo_id=REPO)
    assert len({initial, c1.oid, c2.oid}) == 3 and hub.head(REPO) == c2.oid
    assert hub.commit_count(REPO) == 3
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == [c2.oid, c1.oid, initial]
    # every commit stays addressable by sha (git-like), the branch follows the newest
    cache = str(tmp_path / "cache")
    old = hf_hub_download(REPO, "dir/f.txt", revision=c1.oid, cache_dir=cache, endpoint=hub.endpoint)
    new = hf_hub_download(REPO, "dir/f.txt", cache_dir=cache, endpoint=hub.endpoint)
    assert open(old, "rb").read() == b"one" and open(new, "rb").read() == b"two"
    assert api.model_info(REPO, revision=c1.oid).sha == c1.oid
    assert hub.files(REPO, c1.oid)["dir/f.txt"] == b"one"


def test_resolve_headers_and_error_codes(hub, api):
    api.create_repo(REPO)
    sha = api.upload_file(path_or_fileobj=b"hello world", path_in_repo="a.txt", repo_id=REPO).oid
    status, headers, body = http(hub, "HEAD", f"/{REPO}/resolve/main/a.txt", token=None)
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == sha
    assert headers["ETag"] == f'"{git_blob_sha(b"hello world")}"'
    assert headers["Content-Length"] == "11"
    assert http(hub, "GET", f"/{REPO}/resolve/{sha}/a.txt")[2] == b"hello world"
    status, headers, body = http(hub, "GET", f"/{REPO}/resolve/main/a.txt", headers={"Range": "bytes=6-"})
    assert (status, body, headers["Content-Range"]) == (206, b"world", "bytes 6-10/11")

    status, headers, _ = http(hub, "HEAD", f"/{REPO}/resolve/main/missing.txt")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", sha)
    status, headers, _ = http(hub, "GET", f"/{REPO}/resolve/nobranch/a.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = http(hub, "GET", "/tester/nope/resolve/main/a.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    # ... which huggingface_hub turns into its typed errors
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt", endpoint=hub.endpoint, cache_dir=str(hub.root) + "/c")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nobranch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/nope")
    assert api.file_exists(REPO, "a.txt") and not api.file_exists(REPO, "missing.txt")


def test_writes_need_a_valid_token(hub, api):
    api.create_repo(REPO)
    head = hub.head(REPO)
    for token in (None, "wrong-token"):
        status, _, body = http(hub, "POST", f"/api/models/{REPO}/commit/main", ndjson(HEADER, add("x", b"x")), token=token)
        assert status == 401, body
        assert http(hub, "POST", "/api/repos/create", {"name": "other"}, token=token)[0] == 401
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.endpoint, token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO)
    assert e.value.response.status_code == 401
    assert hub.head(REPO) == head and "x" not in hub.files(REPO)
    # reads of public repos need no token; a wrong token is refused even there
    assert http(hub, "GET", f"/api/models/{REPO}", token=None)[0] == 200
    assert http(hub, "GET", f"/api/models/{REPO}", token="wrong-token")[0] == 401


def test_private_repo_is_hidden_without_token(hub, api):
    api.create_repo(REPO, private=True)
    status, headers, _ = http(hub, "GET", f"/api/models/{REPO}", token=None)
    assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")
    assert api.model_info(REPO).private is True


@pytest.mark.parametrize(
    "lines, reason",
    [
        ([HEADER, add("ok.txt", b"1"), {"key": "file", "value": {"path": "b.txt", "encoding": "base64", "content": "%%%"}}],
         "base64"),
        ([HEADER, add("ok.txt", b"1"), add("../escape.txt", b"2")], "invalid path"),
        ([HEADER, {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64}}], "LFS"),
        ([add("ok.txt", b"1")], "header"),
        ([HEADER, {"key": "deletedFile", "value": {"path": "not-there.txt"}}], "Cannot delete"),
    ],
)
def test_malformed_commit_changes_nothing(hub, api, lines, reason):
    api.create_repo(REPO)
    head, files = hub.head(REPO), hub.files(REPO)
    status, _, body = http(hub, "POST", f"/api/models/{REPO}/commit/main", ndjson(*lines))
    assert status in (400, 404) and reason in body.decode()
    assert hub.head(REPO) == head and hub.files(REPO) == files
    status, _, _ = http(hub, "POST", f"/api/models/{REPO}/commit/main", b'{"key": "header", "value": {}}\n{not json\n')
    assert status == 400 and hub.head(REPO) == head


@pytest.mark.parametrize("mode", ["disconnect", "error"])
def test_interrupted_commit_keeps_previous_revision(hub, api, mode):
    api.create_repo(REPO)
    good = api.upload_file(path_or_fileobj=b"v1", path_in_repo="w.safetensors", repo_id=REPO).oid
    hub.fail_next_commit(mode)
    with pytest.raises(Exception) as e:  # a dropped connection (transport error) or a 500
        api.upload_file(path_or_fileobj=b"v2" * 1000, path_in_repo="w.safetensors", repo_id=REPO)
    assert ("500" in str(e.value)) == (mode == "error")
    assert hub.head(REPO) == good and hub.files(REPO)["w.safetensors"] == b"v1"
    assert hub.commit_count(REPO) == 2
    # the fault is one-shot: the next commit goes through
    assert api.upload_file(path_or_fileobj=b"v3", path_in_repo="w.safetensors", repo_id=REPO).oid != good
    assert hub.files(REPO)["w.safetensors"] == b"v3"
    with pytest.raises(ValueError, match="mode must be one of"):
        hub.fail_next_commit("explode")


def test_parent_commit_conflict(hub, api):
    api.create_repo(REPO)
    first = hub.head(REPO)
    api.upload_file(path_or_fileobj=b"a", path_in_repo="a", repo_id=REPO)
    stale = {"key": "header", "value": {"summary": "s", "description": "", "parentCommit": first}}
    status, _, _ = http(hub, "POST", f"/api/models/{REPO}/commit/main", ndjson(stale, add("b", b"b")))
    assert status == 412 and "b" not in hub.files(REPO)


def test_branches_tree_and_paths_info(hub, api):
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"m", path_in_repo="sub/deep/m.txt", repo_id=REPO)
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    dev = api.upload_file(path_or_fileobj=b"d", path_in_repo="d.txt", repo_id=REPO, revision="dev").oid
    assert "d.txt" not in api.list_repo_files(REPO) and "d.txt" in api.list_repo_files(REPO, revision="dev")
    refs = {b.name: b.target_commit for b in api.list_repo_refs(REPO).branches}
    assert refs["dev"] == dev and refs["main"] == hub.head(REPO)

    top = {e.path for e in api.list_repo_tree(REPO)}
    assert top == {".gitattributes", "sub"}
    deep = {e.path for e in api.list_repo_tree(REPO, recursive=True)}
    assert deep == {".gitattributes", "sub", "sub/deep", "sub/deep/m.txt"}
    info = {e.path: e for e in api.get_paths_info(REPO, ["sub", "sub/deep/m.txt", "absent"])}
    assert set(info) == {"sub", "sub/deep/m.txt"} and info["sub/deep/m.txt"].size == 1
    api.delete_branch(REPO, branch="dev")
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main"]


def test_delete_folder_operation(hub, api):
    from huggingface_hub import CommitOperationDelete

    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"1", path_in_repo="old/a.bin", repo_id=REPO)
    api.upload_file(path_or_fileobj=b"2", path_in_repo="keep.txt", repo_id=REPO)
    api.create_commit(REPO, operations=[CommitOperationDelete("old/")], commit_message="rm")
    assert sorted(hub.files(REPO)) == [".gitattributes", "keep.txt"]


def test_validate_yaml(hub):
    def check(content):
        status, _, body = http(hub, "POST", "/api/validate-yaml", {"repoType": "model", "content": content}, token=None)
        return status, body.decode()

    assert check("---\nlicense: apache-2.0\ntags: [a, b]\nbase_model: org/model\n---\n# card\n")[0] == 200
    assert check("# no metadata at all\n")[0] == 200
    status, body = check("---\nlicense: not-a-license\n---\n")
    assert status == 400 and "license" in body
    assert check("---\ntags: [a\n---\n")[0] == 400  # broken YAML
    assert check("---\nbase_model: not a repo id\n---\n")[0] == 400
    assert validate_card_metadata({"tags": "x", "datasets": [3]}) == [
        "\"tags\" must be a list of non-empty strings, got 'x'",
        '"datasets" must be a string or a list of strings, got [3]',
    ]


def test_state_persists_across_restart(tmp_path):
    root = str(tmp_path / "hub")
    with LoopbackHub(root=root) as first:
        api = HfApi(endpoint=first.endpoint, token=DEFAULT_TOKEN)
        api.create_repo(REPO)
        sha = api.upload_file(path_or_fileobj=b"kept", path_in_repo="k.txt", repo_id=REPO).oid
    with LoopbackHub(root=root) as second:
        assert second.head(REPO) == sha and second.files(REPO)["k.txt"] == b"kept"


def test_unknown_endpoint_is_recorded(tmp_path):
    with LoopbackHub(root=str(tmp_path / "hub")) as server:
        status, _, body = http(server, "GET", "/api/spaces/x/y")
        assert status == 404 and b"unknown endpoint" in body
        assert server.unknown_requests == [("GET", "/api/spaces/x/y")]


def test_public_api():
    """What users may rely on (documented in LoopbackHub's docstring): keep it small and stable."""
    assert sorted(hf_hybrid_attn.testing.__all__) == [
        "DEFAULT_TOKEN", "DEFAULT_USER", "LoopbackHub", "git_blob_sha", "validate_card_metadata"]
    public = {n for n in dir(LoopbackHub) if not n.startswith("_")}
    assert public == {"commit_count", "endpoint", "fail_next_commit", "files", "head", "requests_matching",
                      "start", "state", "stop"}
    with LoopbackHub() as hub:
        assert {n for n in vars(hub) if not n.startswith("_")} == {"root", "tokens", "request_log", "unknown_requests"}
