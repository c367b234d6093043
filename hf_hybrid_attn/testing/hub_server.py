"""A small loopback Hugging Face Hub: the part of the Hub HTTP API that push/pull round trips use.

Why: there is no network in CI, and mocking huggingface_hub's client would test nothing real. This
server speaks HTTP on 127.0.0.1 (ephemeral port), so the unmodified `huggingface_hub`, `transformers`
and `peft` clients run against it when `HF_ENDPOINT` points here (set it before huggingface_hub is
imported: it is read at import time).

Storage is git-like: blobs are content-addressed files under `root/objects` (id = git blob sha1),
each commit is an immutable tree {path: blob} with a parent and its own sha, and branches are refs
to commits, persisted in `root/repos/<ns>/<name>/repo.json` with an atomic rename. A commit is
parsed and checked in full, its blobs written, and only then is the branch moved, so a malformed or
interrupted commit leaves the previous revision intact. Uploads are always "regular" (base64 in the
commit body): no LFS or Xet.

Writes need `Authorization: Bearer <token>` with a known token (401 otherwise). Requests the server
does not know are answered 404 and recorded in `unknown_requests`, which tests assert is empty.

The supported API is `__all__` (also importable from `hf_hybrid_attn.testing`) and the LoopbackHub
members its docstring lists; everything else here is internal and may change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "LoopbackHub", "git_blob_sha", "validate_card_metadata"]

#: the write token the server knows by default, and the user (namespace) it belongs to
DEFAULT_TOKEN = "hf_loopback_write_token"
DEFAULT_USER = "tester"
FAULT_MODES = ("disconnect", "error")

#: License ids the Hub accepts in card metadata (the Hub's list, abridged to the common ones).
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
    c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
    cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
    cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
    ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
    lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0
    odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
    deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3
    llama4 gemma unknown other""".split()
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as `oid` / ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _card_front_matter(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """(metadata, error) of a README's YAML block; ({}, None) when it has none."""
    m = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(\r?\n|$)", text, flags=re.DOTALL)
    if m is None:
        return {}, None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        return None, f"Invalid YAML in the model card metadata: {e}"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return None, "The model card metadata must be a YAML mapping"
    return data, None


def validate_card_metadata(metadata: dict[str, Any]) -> list[str]:
    """The checks this server's /api/validate-yaml applies (a subset of the Hub's): one message per problem."""
    errors = []

    def str_or_list(key: str, pattern: re.Pattern | None = None) -> None:
        value = metadata.get(key)
        if value is None:
            return
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            errors.append(f'"{key}" must be a string or a list of strings, got {value!r}')
        elif pattern is not None and not all(pattern.match(v) for v in values):
            errors.append(f'"{key}" must name repositories as "namespace/name", got {value!r}')

    lic = metadata.get("license")
    if lic is not None and (not isinstance(lic, str) or lic not in HUB_LICENSES):
        errors.append(f'"license" must be one of the Hub license ids (e.g. apache-2.0, mit, other), got {lic!r}')
    for key in ("library_name", "pipeline_tag", "license_name", "license_link"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string, got {metadata[key]!r}')
    tags = metadata.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) and t for t in tags)):
        errors.append(f'"tags" must be a list of non-empty strings, got {tags!r}')
    str_or_list("datasets")
    str_or_list("language")
    str_or_list("base_model", re.compile(r"^[\w.-]+/[\w.-]+$"))
    if "model-index" in metadata and not isinstance(metadata["model-index"], list):
        errors.append('"model-index" must be a list')
    return errors


class HubError(Exception):
    """An HTTP error answer: status, message, and the Hub's X-Error-Code where the client needs it."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    #: sha -> {"parent", "tree": {path: [oid, size]}, "title", "message", "date", "author"}
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)


class LoopbackHub:
    """A Hub-compatible HTTP server on 127.0.0.1 for push/pull tests without the network.

        import os, subprocess, sys
        from hf_hybrid_attn.testing import DEFAULT_TOKEN, LoopbackHub

        def test_push_and_pull(tmp_path):
            with LoopbackHub(root=str(tmp_path / "hub")) as hub:
                env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": DEFAULT_TOKEN,
                       "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
                env.pop("HF_HUB_OFFLINE", None)
                # huggingface_hub reads HF_ENDPOINT when it is imported: run the client in a fresh process
                subprocess.run([sys.executable, "push_and_pull.py", "tester/my-model"], env=env, check=True)
                assert "model.safetensors" in hub.files("tester/my-model")
                assert hub.unknown_requests == []  # every request was one the server knows

    In the test process itself, pass the endpoint explicitly: `HfApi(endpoint=hub.endpoint,
    token=DEFAULT_TOKEN)`, `hf_hub_download(..., endpoint=hub.endpoint)`. Model repos only; a repo
    created without an organization goes to the token's user (`DEFAULT_USER`, "tester").
    Under HF_HUB_OFFLINE=1 huggingface_hub refuses every request: drop it from the client's
    environment (as above) or, in-process, set `huggingface_hub.constants.HF_HUB_OFFLINE = False`.
    HF_HUB_DISABLE_TELEMETRY=1 keeps huggingface_hub 2.x from fetching its agent registry
    (GET /api/agent-harnesses) from the endpoint; this server does not serve it, so the request
    would show in unknown_requests.

    Supported API:
      LoopbackHub(root=None, tokens=None)  root: storage folder (a temporary one, removed on stop(),
                              when None; an existing root is loaded, so a hub can be restarted);
                              tokens: {token: user} that may write (default {DEFAULT_TOKEN: DEFAULT_USER})
      start() / stop(), or `with LoopbackHub(...) as hub:`
      endpoint                the base URL, for HF_ENDPOINT or `endpoint=`
      head(repo_id, branch="main") -> commit sha;  files(repo_id, revision="main") -> {path: bytes}
      commit_count(repo_id)   commits in the repo, the initial .gitattributes commit included
      fail_next_commit(mode)  the next commit fails: "disconnect" or "error" (nothing is moved)
      state()                 JSON view: repos (commits, branches, private), requests, unknown requests
      requests_matching(method, pattern) -> paths;  request_log, unknown_requests (lists of tuples)
    Clients in another process reach the same controls over HTTP: GET /_loopback/state (= state())
    and POST /_loopback/fault {"mode": ...} (= fail_next_commit).
    """

    def __init__(self, root: str | None = None, tokens: dict[str, str] | None = None):
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="loopback-hub-")
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self._repos: dict[str, Repo] = {}
        self._lock = threading.RLock()
        self.request_log: list[tuple[str, str, int]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self._fault: str | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._load()

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LoopbackHub is not running: call start() or use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LoopbackHub:
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- test helpers ------------------------------------------------------------------------
    def fail_next_commit(self, mode: str = "disconnect") -> None:
        """Fault injection for the next commit: 'disconnect' reads half the body, stores what it got,
        then drops the connection; 'error' stores every blob, then answers 500 before moving the ref."""
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {FAULT_MODES}, got {mode!r}")
        self._fault = mode

    def commit_count(self, repo_id: str) -> int:
        """Number of commits in the repo (the initial .gitattributes commit included)."""
        with self._lock:
            return len(self._repos[repo_id].commits) if repo_id in self._repos else 0

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self._repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self._repo(repo_id, token_user=DEFAULT_USER)
            tree = repo.commits[self._resolve(repo, revision)]["tree"]
            return {p: self._read_blob(oid) for p, (oid, _) in tree.items()}

    def state(self) -> dict[str, Any]:
        """JSON view for tests: repos (commit count, branches), the request log, unknown requests."""
        with self._lock:
            repos = {rid: {"commits": len(r.commits), "branches": dict(r.branches), "private": r.private}
                     for rid, r in self._repos.items()}
        return {"repos": repos, "requests": [list(r) for r in self.request_log],
                "unknown_requests": [list(r) for r in self.unknown_requests]}

    def requests_matching(self, method: str, pattern: str) -> list[str]:
        return [p for m, p, _ in self.request_log if m == method and re.search(pattern, p)]

    # ---- storage -----------------------------------------------------------------------------
    def _blob_path(self, oid: str) -> str:
        return os.path.join(self.root, "objects", oid[:2], oid[2:])

    def _write_blob(self, data: bytes) -> str:
        oid = git_blob_sha(data)
        path = self._blob_path(oid)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return oid

    def _read_blob(self, oid: str) -> bytes:
        with open(self._blob_path(oid), "rb") as f:
            return f.read()

    def _repo_file(self, repo_id: str) -> str:
        return os.path.join(self.root, "repos", repo_id, "repo.json")

    def _persist(self, repo: Repo) -> None:
        path = self._repo_file(repo.repo_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(repo.__dict__, f)
        os.replace(tmp, path)  # atomic: readers see the old or the new refs, never half

    def _load(self) -> None:
        base = os.path.join(self.root, "repos")
        if not os.path.isdir(base):
            return
        for ns in os.listdir(base):
            for name in os.listdir(os.path.join(base, ns)):
                path = self._repo_file(f"{ns}/{name}")
                if os.path.exists(path):
                    with open(path) as f:
                        self._repos[f"{ns}/{name}"] = Repo(**json.load(f))

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict, title: str, message: str, user: str) -> str:
        body = json.dumps([parent, sorted(tree.items()), title, message, len(repo.commits), time.time()])
        sha = hashlib.sha1(body.encode()).hexdigest()
        repo.commits[sha] = {"parent": parent, "tree": tree, "title": title, "message": message,
                             "date": _now(), "author": user}
        return sha

    # ---- lookups -----------------------------------------------------------------------------
    def _repo(self, repo_id: str, token_user: str | None) -> Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and token_user is None):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> str:
        rev = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
        if rev in repo.branches:
            return repo.branches[rev]
        if _SHA.match(rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: requests go to hub.request_log
        pass

    # ---- plumbing ----------------------------------------------------------------------------
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _writer(self) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated (Authorization: Bearer <token>) to write to the Hub")
        return user

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n if limit is None else min(n, limit))

    def _send(self, status: int, body: Any = b"", headers: dict | None = None, head_only: bool = False) -> None:
        if isinstance(body, (dict, list)):
            data, ctype = json.dumps(body).encode(), "application/json"
        else:
            data = body.encode() if isinstance(body, str) else body
            ctype = "text/plain; charset=utf-8"
        self.send_response(status)
        headers = {"Content-Type": ctype, "Content-Length": str(len(data)), **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head_only:
            self.wfile.write(data)
        self.hub.request_log.append((self.command, self.path, status))

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body_pending = self.command in ("POST", "PUT", "DELETE") and self._is_faulty_commit(parts)
        try:
            body = b""
            if self.command in ("POST", "PUT", "DELETE") and not body_pending:
                body = self._read_body()
            handled = self._route(parts, query, body)
            if not handled:
                self.hub.unknown_requests.append((self.command, self.path))
                raise HubError(404, f"loopback hub: unknown endpoint {self.command} {url.path}")
        except HubError as e:
            if body_pending:  # the request body was not consumed: this connection cannot be reused
                self.close_connection = True
            headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message, **e.extra}, headers, head_only=self.command == "HEAD")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _is_faulty_commit(self, parts: list[str]) -> bool:
        return len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit" and self.hub._fault == "disconnect"

    # ---- routing -----------------------------------------------------------------------------
    def _route(self, parts: list[str], query: dict[str, str], body: bytes) -> bool:
        m = self.command
        if parts == ["_loopback", "fault"] and m == "POST":  # test control, for clients in a subprocess
            try:
                self.hub.fail_next_commit(json.loads(body or b"{}").get("mode", "disconnect"))
            except ValueError as e:
                raise HubError(400, str(e)) from None
            self._send(200, {})
            return True
        if parts == ["_loopback", "state"] and m == "GET":
            self._send(200, self.hub.state())
            return True
        if parts == ["api", "whoami-v2"] and m == "GET":
            user = self._writer()
            self._send(200, {"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}})
            return True
        if parts == ["api", "repos", "create"] and m == "POST":
            self._create_repo(json.loads(body or b"{}"))
            return True
        if parts == ["api", "validate-yaml"] and m == "POST":
            self._validate_yaml(json.loads(body or b"{}"))
            return True
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest and m == "GET":
                return self._model_info(repo_id, "main", query)
            action, args = (rest[0], rest[1:]) if rest else ("", [])
            routes = {
                ("revision", "GET"): lambda: self._model_info(repo_id, args[0], query),
                ("preupload", "POST"): lambda: self._preupload(repo_id, args[0], json.loads(body)),
                ("commit", "POST"): lambda: self._commit(repo_id, args[0], body, query),
                ("tree", "GET"): lambda: self._tree(repo_id, args[0], "/".join(args[1:]), query),
                ("paths-info", "POST"): lambda: self._paths_info(repo_id, args[0], body),
                ("refs", "GET"): lambda: self._refs(repo_id),
                ("commits", "GET"): lambda: self._commits(repo_id, args[0]),
                ("branch", "POST"): lambda: self._create_branch(repo_id, "/".join(args), body),
                ("branch", "DELETE"): lambda: self._delete_branch(repo_id, "/".join(args)),
            }
            route = routes.get((action, m))
            if route is None or (action not in ("refs",) and not args):
                return False
            route()
            return True
        if len(parts) >= 5 and parts[2] == "resolve" and m in ("GET", "HEAD"):
            self._resolve_file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            return True
        return False

    # ---- endpoints ---------------------------------------------------------------------------
    def _create_repo(self, payload: dict) -> None:
        user = self._writer()
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "loopback hub: only model repos are supported")
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org or user}/{name}"
        if not isinstance(name, str) or not _REPO_ID.match(repo_id):
            raise HubError(400, f"Invalid repo name {repo_id!r}")
        hub = self.hub
        with hub._lock:
            if repo_id in hub._repos:
                # The Hub answers 409 with the url; huggingface_hub reads it (exist_ok=True).
                raise HubError(409, "You already created this model repo", extra={"url": f"{hub.endpoint}/{repo_id}"})
            # hub 1.x sends "private": bool, hub 2.x "visibility": "private" | "public"
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            repo = Repo(repo_id, private=private)
            # Like the Hub: a new repo has one commit holding .gitattributes, on branch main.
            attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            tree = {".gitattributes": [hub._write_blob(attributes), len(attributes)]}
            sha = hub._new_commit(repo, None, tree, "initial commit", "", user)
            repo.branches["main"] = sha
            hub._repos[repo_id] = repo
            hub._persist(repo)
        self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        metadata, error = _card_front_matter(str(payload.get("content", "")))
        errors = [error] if error else validate_card_metadata(metadata)
        if errors:
            raise HubError(400, "; ".join(errors))
        self._send(200, {})

    def _model_info(self, repo_id: str, revision: str, query: dict[str, str]) -> bool:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_id, self._user())
            sha = hub._resolve(repo, revision)
            commit = repo.commits[sha]
        tree = commit["tree"]
        card: dict[str, Any] = {}
        if "README.md" in tree:
            card = _card_front_matter(hub._read_blob(tree["README.md"][0]).decode("utf-8", "replace"))[0] or {}
        with_blobs = query.get("blobs", "").lower() == "true"
        siblings = [
            {"rfilename": p, **({"size": size, "blobId": oid} if with_blobs else {})}
            for p, (oid, size) in sorted(tree.items())
        ]
        tags = card.get("tags") if isinstance(card.get("tags"), list) else []
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0], "sha": sha, "lastModified": commit["date"],
            "createdAt": repo.commits[_root_commit(repo, sha)]["date"], "private": repo.private,
            "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": tags,
            "library_name": card.get("library_name"), "siblings": siblings, "cardData": card or None,
        }
        self._send(200, info)
        return True

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        self._writer()
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_id, DEFAULT_USER)
            tree = repo.commits[hub._resolve(repo, revision)]["tree"]
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, 'preupload: expected {"files": [{"path", "size", "sample"}, ...]}')
        self._send(200, {"files": [
            # "regular": contents travel base64 in the commit body, so no LFS/Xet storage is needed.
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": tree.get(f["path"], [None])[0]}
            for f in files
        ]})

    def _commit(self, repo_id: str, revision: str, body: bytes, query: dict[str, str]) -> None:
        user = self._writer()
        hub = self.hub
        fault, hub._fault = hub._fault, None
        if query.get("create_pr") in ("1", "true"):
            raise HubError(400, "loopback hub: pull requests (create_pr) are not supported")
        with hub._lock:
            repo = hub._repo(repo_id, user)
            if revision not in repo.branches:
                code = "RevisionNotFound"
                raise HubError(404 if not _SHA.match(revision) else 400, f"Invalid rev id: {revision}", code)
        if fault == "disconnect":
            body = self._read_body(limit=max(1, int(self.headers.get("Content-Length") or 2) // 2))
        header, adds, deletes = _parse_commit(body, partial=fault == "disconnect")
        oids = {path: (hub._write_blob(data), len(data)) for path, data in adds.items()}
        if fault == "disconnect":  # the client is gone mid-upload: nothing is committed
            self.close_connection = True
            hub.request_log.append((self.command, self.path, 0))
            return
        if fault == "error":
            raise HubError(500, "loopback hub: injected failure after the upload, before the commit")
        with hub._lock:
            head = repo.branches[revision]
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != head:
                raise HubError(412, f"A commit has happened since {parent_commit}; the head is {head}")
            tree = dict(repo.commits[head]["tree"])
            for path, is_folder in deletes:
                doomed = [p for p in tree if p == path or (is_folder and p.startswith(path.rstrip("/") + "/"))]
                if not doomed:
                    raise HubError(404, f"Cannot delete {path}: not in {revision}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            tree.update({p: list(v) for p, v in oids.items()})
            sha = hub._new_commit(repo, head, tree, header.get("summary") or "commit",
                                  header.get("description") or "", user)
            repo.branches[revision] = sha
            hub._persist(repo)
        self._send(200, {"commitOid": sha, "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}",
                         "success": True, "pullRequestUrl": None})

    def _tree(self, repo_id: str, revision: str, path: str, query: dict[str, str]) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_id, self._user())
            sha = hub._resolve(repo, revision)
            tree = repo.commits[sha]["tree"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        recursive = query.get("recursive", "").lower() == "true"
        entries: dict[str, dict] = {}
        for p, (oid, size) in sorted(tree.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):].split("/")
            for depth in range(1, len(rel)):  # folders on the way
                folder = prefix + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                                "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(rel) == 1:
                entries[p] = {"type": "file", "path": p, "size": size, "oid": oid}
        self._send(200, list(entries.values()))

    def _paths_info(self, repo_id: str, revision: str, body: bytes) -> None:
        hub = self.hub
        ctype = self.headers.get("Content-Type", "")
        form = json.loads(body) if "json" in ctype else parse_qs(body.decode())
        paths = form.get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        with hub._lock:
            repo = hub._repo(repo_id, self._user())
            tree = repo.commits[hub._resolve(repo, revision)]["tree"]
        out = []
        for p in paths:
            p = p.strip("/")
            if p in tree:
                out.append({"type": "file", "path": p, "size": tree[p][1], "oid": tree[p][0]})
            elif any(q.startswith(p + "/") for q in tree):
                out.append({"type": "directory", "path": p, "size": 0, "oid": hashlib.sha1(p.encode()).hexdigest()})
        self._send(200, out)

    def _refs(self, repo_id: str) -> None:
        with self.hub._lock:
            repo = self.hub._repo(repo_id, self._user())
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
        self._send(200, {"branches": branches, "converts": [], "tags": []})

    def _commits(self, repo_id: str, revision: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_id, self._user())
            sha, out = hub._resolve(repo, revision), []
            while sha is not None:
                c = repo.commits[sha]
                out.append({"id": sha, "title": c["title"], "message": c["message"], "date": c["date"],
                            "authors": [{"user": c["author"]}]})
                sha = c["parent"]
        self._send(200, out)

    def _create_branch(self, repo_id: str, branch: str, body: bytes) -> None:
        user = self._writer()
        payload = json.loads(body) if body else {}
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_id, user)
            if branch in repo.branches:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            if not re.match(r"^[\w.-]+(/[\w.-]+)*$", branch) or _SHA.match(branch):
                raise HubError(400, f"Invalid branch name {branch!r}")
            start = payload.get("startingPoint") or "main"
            repo.branches[branch] = hub._resolve(repo, start)
            hub._persist(repo)
        self._send(200, {})

    def _delete_branch(self, repo_id: str, branch: str) -> None:
        user = self._writer()
        with self.hub._lock:
            repo = self.hub._repo(repo_id, user)
            if branch == "main" or branch not in repo.branches:
                raise HubError(400 if branch == "main" else 404, f"Cannot delete branch {branch!r}")
            del repo.branches[branch]
            self.hub._persist(repo)
        self._send(200, {})

    def _resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_id, self._user())
            sha = hub._resolve(repo, revision)
            entry = repo.commits[sha]["tree"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        oid, size = entry
        headers = {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if self.command == "HEAD":
            self.send_response(200)
            for k, v in {**headers, "Content-Length": str(size)}.items():
                self.send_header(k, v)
            self.end_headers()
            hub.request_log.append((self.command, self.path, 200))
            return
        data = hub._read_blob(oid)
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if m:  # resumed downloads
            start, end = int(m.group(1)), int(m.group(2) or size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send(206, data[start:end + 1], headers)
        else:
            self._send(200, data, headers)


def _root_commit(repo: Repo, sha: str) -> str:
    while repo.commits[sha]["parent"] is not None:
        sha = repo.commits[sha]["parent"]
    return sha


def _parse_commit(body: bytes, partial: bool = False) -> tuple[dict, dict[str, bytes], list[tuple[str, bool]]]:
    """Parse and check the whole NDJSON commit body before anything is applied.

    `partial`: the body was cut off; keep the complete lines and ignore the rest (fault injection)."""
    lines = body.split(b"\n")
    if partial:
        lines = lines[:-1]
    header: dict | None = None
    adds: dict[str, bytes] = {}
    deletes: list[tuple[str, bool]] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError) as e:
            raise HubError(400, f"commit: line {i + 1} is not a {{key, value}} JSON object ({e})") from e
        if key == "header":
            header = value
            continue
        if header is None:
            raise HubError(400, "commit: the first line must be the header")
        path = value.get("path") if isinstance(value, dict) else None
        norm = posixpath.normpath(path) if isinstance(path, str) else ""
        if not path or norm != path.strip("/") or norm.startswith("..") or path.startswith("/") or ".git/" in path:
            raise HubError(400, f"commit: invalid path {path!r} on line {i + 1}")
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"commit: unsupported encoding {value.get('encoding')!r} for {path}")
            try:
                adds[path] = base64.b64decode(value["content"], validate=True)
            except (ValueError, KeyError, TypeError) as e:
                raise HubError(400, f"commit: invalid base64 content for {path}") from e
        elif key in ("deletedFile", "deletedFolder"):
            deletes.append((path, key == "deletedFolder"))
        elif key == "lfsFile":
            raise HubError(400, f"commit: {path} was sent as LFS, but this hub only takes regular uploads")
        else:
            raise HubError(400, f"commit: unknown operation {key!r} on line {i + 1}")
    if header is None:
        raise HubError(400, "commit: empty body (no header line)")
    return header, adds, deletes
