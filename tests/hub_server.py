"""A small local stand-in for the Hugging Face Hub HTTP API, to test uploads with the real client.

`FakeHub` serves, on 127.0.0.1 and a free port, exactly the endpoints `HfApi.create_repo` and
`HfApi.upload_folder` call in huggingface_hub 1.x/2.x when Xet is disabled (`HF_HUB_DISABLE_XET=1`), and file
downloads:

| request | used by |
|---|---|
| `POST /api/repos/create` | `create_repo` (409 when the repo exists, which `exist_ok=True` accepts) |
| `GET /api/models/{repo}[/revision/{revision}]` | `repo_info` (`create_repo(exist_ok=True)` after a 401/403) |
| `POST /api/validate-yaml` | `upload_folder` / `create_commit`, before hashing, when a README.md is uploaded |
| `POST /api/models/{repo}/preupload/{revision}` | `preupload_lfs_files`: "regular" (inline) or "lfs" per file |
| `POST /{repo}.git/info/lfs/objects/batch` | LFS batch API: where to PUT each LFS object |
| `PUT /lfs-upload/{oid}` | basic LFS transfer (the bytes; checked against the sha256 oid and size) |
| `POST /lfs-verify/{oid}` | LFS verify step |
| `POST /api/models/{repo}/commit/{revision}` | the ndjson commit: inline base64 files and LFS pointers |
| `HEAD`/`GET /{repo}/resolve/{revision}/{path}` | `hf_hub_download` (e.g. `ModelCard.load`): metadata, then the bytes |

Like the Hub, files matching the default `.gitattributes` LFS patterns (`*.safetensors`, `*.bin`, ...) or of
10 MB and more go through LFS; the others are sent inline (base64) in the commit. README.md metadata is
checked with `validate_model_card_metadata` (a subset of the Hub's rules: `license`, `tags`, `datasets`,
`base_model`, `model-index`) at validate-yaml and again at commit. Every request is recorded; anything else
gets a 404 and is listed in `unexpected`.

The server is bounded: it answers at most `max_requests` requests (then 400), each connection has a socket
timeout, bodies are capped, and it shuts itself down after `lifetime` seconds if `stop()` was not called.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import yaml
from huggingface_hub.repocard import REGEX_YAML_BLOCK

LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".npy",
    ".npz",
    ".zip",
    ".gz",
    ".tar",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024

# A subset of the Hub's license identifiers.
KNOWN_LICENSES = frozenset(
    {
        "apache-2.0",
        "mit",
        "bsd-2-clause",
        "bsd-3-clause",
        "cc0-1.0",
        "cc-by-4.0",
        "cc-by-sa-4.0",
        "cc-by-nc-4.0",
        "cc-by-nc-sa-4.0",
        "gpl-3.0",
        "lgpl-3.0",
        "agpl-3.0",
        "mpl-2.0",
        "openrail",
        "bigscience-openrail-m",
        "llama2",
        "llama3",
        "llama3.1",
        "llama3.2",
        "gemma",
        "other",
        "unknown",
    }
)
_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")
_NAME = re.compile(r"^[\w\-.]+$")


def split_card(content: str) -> tuple[Any, str]:
    """Splits a README.md into (parsed YAML metadata or None, Markdown body), with the Hub's regex."""
    match = REGEX_YAML_BLOCK.search(content)
    if not match:
        return None, content
    return yaml.safe_load(match.group(2)), content[match.end() :]


def _is_repo_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_REPO_ID.match(value)) and ".." not in value and "--" not in value


def validate_model_card_metadata(content: str) -> list[str]:
    """Returns the errors the Hub would report for the YAML metadata of a model README.md (empty if valid)."""
    try:
        metadata, _ = split_card(content)
    except yaml.YAMLError as error:
        return [f"YAML metadata does not parse: {error}"]
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["YAML metadata must be a mapping"]
    errors = []

    license_id = metadata.get("license")
    if license_id is not None and license_id not in KNOWN_LICENSES:
        errors.append(f'"license" must be a known license identifier, got {license_id!r}')
    if license_id == "other" and not (metadata.get("license_name") and metadata.get("license_link")):
        errors.append('"license: other" needs "license_name" and "license_link"')
    for key in ("library_name", "pipeline_tag"):
        if key in metadata and not (isinstance(metadata[key], str) and _NAME.match(metadata[key])):
            errors.append(f'"{key}" must be a name, got {metadata[key]!r}')
    tags = metadata.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) and t for t in tags)):
        errors.append(f'"tags" must be a list of non-empty strings, got {tags!r}')
    for key in ("datasets", "base_model"):
        value = metadata.get(key)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not (isinstance(values, list) and values and all(_is_repo_id(v) for v in values)):
            errors.append(f'"{key}" must be a Hub id or a list of Hub ids, got {value!r}')

    model_index = metadata.get("model-index")
    if model_index is not None:
        errors += _model_index_errors(model_index)
    return errors


def _model_index_errors(model_index: Any) -> list[str]:
    if not isinstance(model_index, list) or not model_index:
        return ['"model-index" must be a non-empty list']
    errors = []
    for i, entry in enumerate(model_index):
        where = f"model-index[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            errors.append(f"{where} needs a non-empty string `name`")
            continue
        results = entry.get("results")
        if not isinstance(results, list) or not results:
            errors.append(f"{where}.results must be a non-empty list")
            continue
        for j, result in enumerate(results):
            here = f"{where}.results[{j}]"
            task = result.get("task") if isinstance(result, dict) else None
            dataset = result.get("dataset") if isinstance(result, dict) else None
            metrics = result.get("metrics") if isinstance(result, dict) else None
            if not (isinstance(task, dict) and isinstance(task.get("type"), str)):
                errors.append(f"{here}.task.type must be a string")
            if not (
                isinstance(dataset, dict) and isinstance(dataset.get("type"), str) and dataset.get("name")
            ):
                errors.append(f"{here}.dataset needs string `type` and `name`")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f"{here}.metrics must be a non-empty list")
                continue
            for k, metric in enumerate(metrics):
                value = metric.get("value") if isinstance(metric, dict) else None
                if not (isinstance(metric, dict) and isinstance(metric.get("type"), str)):
                    errors.append(f"{here}.metrics[{k}].type must be a string")
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    errors.append(f"{here}.metrics[{k}].value must be a number or a string, got {value!r}")
    return errors


class HubError(Exception):
    """An HTTP error answer: status, message and optional `X-Error-Code`."""

    def __init__(
        self, status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class FakeHub:
    """The local Hub stand-in. Use as a context manager, or call `start()` / `stop()`.

    Recorded state (read it after the client is done): `repos[repo_id]` with `private`, `files` (path ->
    bytes), `commits` (summary, per-file upload mode); `lfs_objects` (sha256 -> bytes); `requests`
    (method, path, authorization header); `validated` (README contents sent to validate-yaml, with their
    errors); `unexpected` (requests to unknown endpoints).
    """

    def __init__(self, *, token: str = "dummy", max_requests: int = 300, lifetime: float = 180.0):
        self.token = token
        self.max_requests = max_requests
        self.lifetime = lifetime
        self.repos: dict[str, dict[str, Any]] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_pending: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.validated: list[tuple[str, list[str]]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "the server is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        self._watchdog = threading.Timer(self.lifetime, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        with self.lock:
            server, self._server = self._server, None
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- helpers for tests ------------------------------------------------------------------------
    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of `repo_id` after all commits."""
        return dict(self.repos[repo_id]["files"])

    def paths_requested(self) -> list[str]:
        return [f"{method} {path}" for method, path, _ in self.requests]

    # --- endpoint logic (called by the handler, under no lock unless stated) -----------------------
    def _repo(self, repo_id: str) -> dict[str, Any]:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found.", code="RepoNotFound")
        return repo

    def create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name, organization = payload.get("name"), payload.get("organization")
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, f"This fake hub only hosts model repos, got type {payload.get('type')!r}.")
        if not organization or not name:
            raise HubError(400, "This fake hub needs repo ids of the form namespace/name.")
        repo_id = f"{organization}/{name}"
        if not _is_repo_id(repo_id):
            raise HubError(400, f"Invalid repo id {repo_id!r}.")
        with self.lock:
            if repo_id in self.repos:
                # Like the Hub, the conflict answer carries the URL: `create_repo(exist_ok=True)` returns it.
                raise HubError(
                    409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"}
                )
            self.repos[repo_id] = {
                "private": payload.get("visibility") == "private" or payload.get("private") is True,
                "files": {},
                "commits": [],
            }
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def repo_info(self, repo_id: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        repo = self._repo(repo_id)
        if repo["private"] and authorization != f"Bearer {self.token}":
            raise HubError(404, f"Repository {repo_id} not found.", code="RepoNotFound")
        with self.lock:
            sha = repo["commits"][-1]["oid"] if repo["commits"] else None
            siblings = [{"rfilename": path} for path in sorted(repo["files"])]
        return 200, {"id": repo_id, "sha": sha, "private": repo["private"], "siblings": siblings}

    def resolve(self, repo_id: str, revision: str, path: str, authorization: str | None) -> tuple[bytes, str]:
        """(content, commit oid) of a file, or the errors `hf_hub_download` turns into EntryNotFound / ...."""
        repo = self._repo(repo_id)
        if repo["private"] and authorization != f"Bearer {self.token}":
            raise HubError(404, f"Repository {repo_id} not found.", code="RepoNotFound")
        if revision != "main":
            raise HubError(404, f"Revision {revision!r} not found.", code="RevisionNotFound")
        with self.lock:
            content = repo["files"].get(path)
            oid = repo["commits"][-1]["oid"] if repo["commits"] else None
        if content is None:
            raise HubError(404, f"Entry {path} not found in {repo_id}.", code="EntryNotFound")
        return content, oid

    def validate_yaml(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        content = payload.get("content")
        if not isinstance(content, str):
            raise HubError(400, "validate-yaml needs a string `content`.")
        errors = validate_model_card_metadata(content)
        with self.lock:
            self.validated.append((content, errors))
        warnings = (
            [] if split_card(content)[0] else [{"message": "Empty or missing yaml metadata in repo card"}]
        )
        body = {"errors": [{"message": e} for e in errors], "warnings": warnings}
        return (400 if errors else 200), body

    def preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._repo(repo_id)
        if revision != "main":
            raise HubError(400, f"Unknown revision {revision!r}.", code="RevisionNotFound")
        files = payload.get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload needs a `files` list.")
        answer = []
        for file in files:
            path, size, sample = file.get("path"), file.get("size"), file.get("sample")
            if not isinstance(path, str) or not isinstance(size, int) or not isinstance(sample, str):
                raise HubError(400, f"Malformed preupload entry {file!r}.")
            if len(base64.b64decode(sample)) > 512:
                raise HubError(400, f"The sample of {path} is longer than 512 bytes.")
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        return 200, {"files": answer, "commitOid": "0" * 40}

    def lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._repo(repo_id)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            raise HubError(400, "Only the basic LFS upload transfer is supported.")
        objects = []
        for item in payload.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                raise HubError(400, f"Malformed LFS object {item!r}.")
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with self.lock:
                if oid not in self.lfs_objects:
                    self.lfs_pending[oid] = size
                    entry["actions"] = {
                        "upload": {"href": f"{self.url}/lfs-upload/{oid}"},
                        "verify": {"href": f"{self.url}/lfs-verify/{oid}"},
                    }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_upload(self, oid: str, body: bytes) -> tuple[int, dict[str, Any]]:
        with self.lock:
            expected_size = self.lfs_pending.get(oid)
        if expected_size is None:
            raise HubError(404, f"No pending LFS upload for {oid}.")
        if len(body) != expected_size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"LFS object {oid}: content does not match its oid and size.")
        with self.lock:
            self.lfs_objects[oid] = body
            self.lfs_pending.pop(oid, None)
        return 200, {}

    def lfs_verify(self, oid: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            body = self.lfs_objects.get(oid)
        if body is None or payload.get("oid") != oid or payload.get("size") != len(body):
            raise HubError(404, f"LFS object {oid} was not uploaded.")
        return 200, {}

    def commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict[str, Any]]:
        repo = self._repo(repo_id)
        if revision != "main":
            raise HubError(400, f"Unknown revision {revision!r}.", code="RevisionNotFound")
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            raise HubError(400, "A commit starts with a header holding a non-empty summary.")
        additions: dict[str, bytes] = {}
        modes: dict[str, str] = {}
        deletions: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str) or not path:
                raise HubError(400, f"Malformed commit operation {line!r}.")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')!r}.")
                additions[path], modes[path] = base64.b64decode(value["content"]), "regular"
            elif key == "lfsFile":
                with self.lock:
                    content = self.lfs_objects.get(value.get("oid"))
                if content is None or value.get("algo") != "sha256":
                    raise HubError(422, f"LFS file {path} references an object that was not uploaded.")
                if "size" in value and value["size"] != len(content):
                    raise HubError(422, f"LFS file {path}: size does not match the uploaded object.")
                additions[path], modes[path] = content, "lfs"
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(path)
            else:
                raise HubError(400, f"Unknown commit operation {key!r}.")
        if "README.md" in additions:
            errors = validate_model_card_metadata(additions["README.md"].decode("utf-8"))
            if errors:
                raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
        oid = hashlib.sha1(body + str(time.time_ns()).encode()).hexdigest()
        with self.lock:
            for path in deletions:
                repo["files"] = {
                    p: c for p, c in repo["files"].items() if p != path and not p.startswith(path + "/")
                }
            repo["files"].update(additions)
            repo["commits"].append({"oid": oid, "summary": lines[0]["value"]["summary"], "modes": modes})
        return 200, {
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        }


_REPO = r"(?P<repo>[\w\-.]+/[\w\-.]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<revision>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<revision>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("POST", re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$"), "lfs_verify"),
]
_NEEDS_AUTH = {"create_repo", "preupload", "commit", "lfs_batch"}


def _route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """The endpoint name and URL arguments of a request, or None for an unknown endpoint."""
    for route_method, pattern, name in _ROUTES:
        match = pattern.match(path)
        if match and route_method == method:
            return name, match.groupdict()
    return None


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    timeout = 30  # socket timeout: a stalled client cannot hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, "Request body too large.")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "Request body too large.")
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        hub = self.fake_hub
        path = urlsplit(self.path).path
        authorization = self.headers.get("Authorization")
        with hub.lock:
            hub.requests.append((method, path, authorization))
            over_budget = len(hub.requests) > hub.max_requests
        try:
            # Read the body first, whatever the answer: closing a socket with unread data can reset the
            # connection before the client reads the error.
            body = self._read_body()
            if over_budget:
                raise HubError(400, f"The fake hub answers at most {hub.max_requests} requests.")
            route = _route(method, path)
            if route is None:
                with hub.lock:
                    hub.unexpected.append((method, path))
                raise HubError(404, f"{method} {path} is not an endpoint of this fake hub.")
            name, args = route
            if name in _NEEDS_AUTH and authorization != f"Bearer {hub.token}":
                raise HubError(401, "Invalid credentials in Authorization header")
            if name == "resolve":
                content, oid = hub.resolve(args["repo"], args["revision"], args["path"], authorization)
                self._send_file(content, oid, with_body=method == "GET")
                return
            if name == "lfs_upload":
                status, answer = hub.lfs_upload(args["oid"], body)
            elif name == "commit":
                status, answer = hub.commit(args["repo"], args["revision"], body)
            else:
                payload = json.loads(body or b"{}")
                if name == "create_repo":
                    status, answer = hub.create_repo(payload)
                elif name == "repo_info":
                    status, answer = hub.repo_info(args["repo"], authorization)
                elif name == "validate_yaml":
                    status, answer = hub.validate_yaml(payload)
                elif name == "preupload":
                    status, answer = hub.preupload(args["repo"], args["revision"], payload)
                elif name == "lfs_batch":
                    status, answer = hub.lfs_batch(args["repo"], payload)
                else:
                    status, answer = hub.lfs_verify(args["oid"], payload)
            self._send(status, answer)
        except HubError as error:
            self._send(error.status, {"error": error.message, **error.extra}, error.message, error.code)
        except (ValueError, KeyError, TypeError) as error:  # malformed JSON / payloads
            self._send(400, {"error": f"Bad request: {error}"}, f"Bad request: {error}")

    def _send_file(self, content: bytes, oid: str | None, with_body: bool) -> None:
        """A file of a repo with the headers `hf_hub_download` reads (commit, ETag, size); HEAD: no body."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        if oid:
            self.send_header("X-Repo-Commit", oid)
        self.end_headers()
        if with_body:
            self.wfile.write(content)

    def _send(self, status: int, answer: dict[str, Any], message: str | None = None, code: str | None = None):
        data = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if message:
            self.send_header("X-Error-Message", message.encode("ascii", "replace").decode("ascii"))
        if code:
            self.send_header("X-Error-Code", code)
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(data)
