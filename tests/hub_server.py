"""A small Hugging Face Hub-compatible server on 127.0.0.1 for offline tests.

No maintained package does the full publish + download round trip offline (read-only
mirrors have no upload endpoints), so this implements exactly the endpoints that
``huggingface_hub`` (create_repo, upload_folder, hf_hub_download, snapshot_download)
and timm's ``hf-hub:`` loader call, with state in memory. ``upload_mode`` chooses how
preupload answers: "regular" (files inline in the commit, the path production uses
with xet clients) or "lfs" (LFS batch + PUT, with xet disabled on the client).
Every commit stays resolvable by its hash (pinned revisions), deletions in commits and
the tree listing behave as on the Hub (``upload_folder(delete_patterns=...)``), and
writes without a token are refused with 401, as the Hub does.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import unquote, urlparse

from loopback import LoopbackServer


class HubState:
    def __init__(self, upload_mode: str = "regular"):
        self.upload_mode = upload_mode
        # repo_id -> {"sha": head commit, "files": {path: bytes}, "private": bool, "history": {sha: files}}
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}     # LFS uploads by sha256
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.lock = threading.Lock()

    def commit(self, repo_id: str, changes: dict[str, bytes | None]) -> str:
        repo = self.repos[repo_id]
        for path, data in changes.items():
            if data is None:
                repo["files"].pop(path, None)
            else:
                repo["files"][path] = data
        digest = hashlib.sha1(repr(sorted((p, hashlib.sha256(d).hexdigest())
                                          for p, d in repo["files"].items())).encode() + repo["sha"].encode())
        repo["sha"] = digest.hexdigest()
        repo.setdefault("history", {})[repo["sha"]] = dict(repo["files"])
        return repo["sha"]

    def files_at(self, repo_id: str, revision: str) -> dict[str, bytes] | None:
        """The files of ``revision`` (main or any commit hash), None if unknown."""
        repo = self.repos[repo_id]
        if revision == "main":
            return repo["files"]
        return repo.get("history", {}).get(revision)


class Handler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass made by serve()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    # --- helpers ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code: int, payload=None, headers: dict | None = None, raw: bytes | None = None, head=False):
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if raw is None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, code: int, error_code: str, message: str, head=False):
        self._send(code, {"error": message}, {"X-Error-Code": error_code, "X-Error-Message": message}, head=head)

    @property
    def endpoint(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    def _record(self):
        with self.state.lock:
            self.state.requests.append((self.command, self.path))
            if self.headers.get("Authorization"):
                self.state.auth_headers.append(self.headers["Authorization"])

    # --- routes -------------------------------------------------------------------------------
    def do_HEAD(self):
        self._record()
        self._resolve(head=True)

    def do_GET(self):
        self._record()
        parts = urlparse(self.path)
        path = unquote(parts.path)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):].split("/")
            repo_id = "/".join(rest[:2])
            repo = self.state.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if len(rest) >= 4 and rest[2] in ("revision", "tree"):
                files = self.state.files_at(repo_id, rest[3])
                if files is None:
                    return self._error(404, "RevisionNotFound", f"Revision {rest[3]} not found")
                if rest[2] == "tree":
                    return self._send(200, [self._tree_entry(p, d) for p, d in sorted(files.items())])
                sha = repo["sha"] if rest[3] == "main" else rest[3]
                return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo["private"],
                                        "siblings": [{"rfilename": p} for p in sorted(files)]})
            return self._send(200, {"id": repo_id, "sha": repo["sha"], "private": repo["private"],
                                    "siblings": [{"rfilename": p} for p in sorted(repo["files"])]})
        if path == "/api/whoami-v2":
            return self._send(200, {"type": "user", "name": "tester", "orgs": []})
        self._resolve(head=False)

    def _refuse_anonymous(self) -> bool:
        """The Hub answers a write without a token with 401."""
        if self.headers.get("Authorization"):
            return False
        self._error(401, "Unauthorized", "Invalid username or password.")
        return True

    def do_PUT(self):  # LFS upload hrefs are presigned: no token, as on the Hub
        self._record()
        body = self._body()
        path = unquote(urlparse(self.path).path)
        if path.startswith("/lfs-upload/"):
            oid = path.rsplit("/", 1)[-1]
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "BadRequest", "sha256 mismatch")
            self.state.blobs[oid] = body
            return self._send(200, {})
        self._error(404, "EntryNotFound", f"no PUT route {path}")

    def do_POST(self):
        self._record()
        body = self._body()
        path = unquote(urlparse(self.path).path)
        if path != "/api/validate-yaml" and self._refuse_anonymous():
            return
        if path == "/api/repos/create":
            req = json.loads(body or b"{}")
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            url = f"{self.endpoint}/{repo_id}"
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.state.repos[repo_id] = {"sha": "0" * 40, "files": {}, "private": bool(req.get("private")),
                                         "history": {}}
            return self._send(200, {"url": url, "name": repo_id})
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if path.endswith(".git/info/lfs/objects/batch"):
            req = json.loads(body)
            objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                        "actions": {"upload": {"href": f"{self.endpoint}/lfs-upload/{o['oid']}"}}}
                       for o in req["objects"]]
            return self._send(200, {"transfer": "basic", "objects": objects})
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):].split("/")
            repo_id, action = "/".join(rest[:2]), rest[2] if len(rest) > 2 else ""
            if repo_id not in self.state.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if action == "preupload":
                req = json.loads(body)
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": self.state.upload_mode,
                                                   "shouldIgnore": False, "oid": None} for f in req["files"]]})
            if action == "commit":
                return self._commit(repo_id, body)
        self._error(404, "EntryNotFound", f"no POST route {path}")

    # --- pieces -------------------------------------------------------------------------------
    def _commit(self, repo_id: str, body: bytes):
        changes: dict[str, bytes | None] = {}
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                    value["content"].encode()
                changes[value["path"]] = data
            elif key == "lfsFile":
                blob = self.state.blobs.get(value["oid"])
                if blob is None:
                    return self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = blob
            elif key == "deletedFile":
                changes[value["path"]] = None
        sha = self.state.commit(repo_id, changes)
        self._send(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True})

    def _tree_entry(self, path: str, data: bytes) -> dict:
        sha = hashlib.sha256(data).hexdigest()
        return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                "lfs": {"oid": sha, "size": len(data), "pointerSize": 134}}

    def _resolve(self, head: bool):
        path = unquote(urlparse(self.path).path).lstrip("/")
        parts = path.split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(404, "EntryNotFound", f"no route {path}", head=head)
        repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        files = self.state.files_at(repo_id, revision)
        if files is None:
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found", head=head)
        data = files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} not found in {repo_id}", head=head)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        self._send(200, raw=data, head=head, headers={
            "X-Repo-Commit": repo["sha"] if revision == "main" else revision, "ETag": etag, "X-Linked-Etag": etag,
            "X-Linked-Size": str(len(data)), "Content-Type": "application/octet-stream"})


class HubServer(LoopbackServer):
    """``with HubServer() as hub: hub.endpoint`` -> http://127.0.0.1:PORT, stopped on exit."""

    def __init__(self, upload_mode: str = "regular"):
        self.state = HubState(upload_mode)
        super().__init__(type("BoundHandler", (Handler,), {"state": self.state}))

    @property
    def endpoint(self) -> str:
        return self.url
