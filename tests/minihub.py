"""A small Hugging Face Hub for tests: speaks the Hub's HTTP protocol on 127.0.0.1 (stdlib only).

It serves what ``huggingface_hub`` (0.34 .. 2.x) sends for ``create_repo``, ``create_branch``,
``create_tag``, ``upload_folder``/``upload_file``/``create_commit`` (regular files inline, and
git-LFS basic and multipart uploads), pull requests (``create_pr=True``), ``repo_info``,
``list_repo_tree``, ``get_paths_info``, ``list_repo_refs``, ``hf_hub_download`` and
``snapshot_download`` (HEAD + GET ``/resolve``, ``Range`` reads, an optional 302 to a CDN origin
as the Hub does for LFS files), with the Hub's error headers (``X-Error-Code``) so the client
raises its own exception types. Protocol notes: the design reference ``hub_protocol.md``.

Auth is the Hub's in miniature: ``tokens`` maps a token to a user; writing needs the token of the
repo's namespace; a private repo reads as missing (401/404 ``RepoNotFound``) without it; an
unknown token is refused (401) everywhere.

Not served (the limits of what the tests prove): the Xet transport (``xet-*-token`` answers 501,
so a client with Xet enabled must be given ``lfs_mode="never"``, which answers "regular" for every
file), tree pagination, gated repos, size limits, merging pull requests.

Every request is recorded in ``store.log`` (method, path, Range header, status) so tests can assert
what went over the wire.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# The Hub's default .gitattributes LFS patterns: files matching them are stored in LFS.
LFS_PATTERNS = [
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "*.safeckpt",
    "*.tar",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
]
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-f]{64}")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    method: str
    path: str  # URL path, percent-decoded
    range: str | None
    status: int


class Store:
    """Repos (commits, branches, tags, pull requests) in memory; blobs content-addressed on disk."""

    def __init__(
        self,
        root: str,
        *,
        lfs_mode: str = "auto",
        lfs_threshold: int = 10_000_000,
        multipart_threshold: int | None = None,
        multipart_chunk: int = 5 << 20,
        tokens: dict[str, str] | None = None,
        cdn_host: str | None = None,
    ) -> None:
        if lfs_mode not in ("auto", "always", "never"):
            raise ValueError(f"lfs_mode must be auto, always or never, not {lfs_mode!r}")
        self.root = root
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
        os.makedirs(os.path.join(root, "lfs"), exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], dict[str, Any]] = {}
        self.lfs_mode, self.lfs_threshold = lfs_mode, lfs_threshold
        self.multipart_threshold, self.multipart_chunk = multipart_threshold, multipart_chunk
        self.tokens = dict(tokens or {})
        self.cdn_host = cdn_host
        self.parts: dict[str, dict[int, bytes]] = {}
        self.log: list[Request] = []

    # -- blobs
    def put_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = os.path.join(self.root, "blobs", oid)
        if not os.path.exists(path):
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return oid

    def blob_path(self, entry: dict[str, Any]) -> str:
        if entry["lfs"]:
            return self.lfs_path(entry["lfs"]["oid"])
        return os.path.join(self.root, "blobs", entry["oid"])

    def lfs_path(self, sha256: str) -> str:
        if not HEX64.fullmatch(sha256):
            raise HubError(400, "invalid oid")
        return os.path.join(self.root, "lfs", sha256)

    # -- repos
    def repo(self, rtype: str, rid: str, user: str | None, *, write: bool = False) -> dict[str, Any]:
        r = self.repos.get((rtype, rid))
        owner = rid.split("/")[0]
        if r is None or (r["private"] and user != owner):
            # the Hub answers 401 to anonymous requests and 404 to others, with the same error code
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            self.check_write(rid, user)
        return r

    def check_write(self, rid: str, user: str | None) -> None:
        if not self.tokens:
            return
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if user != rid.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to {rid}")

    def create_repo(self, rtype: str, rid: str, private: bool) -> None:
        with self.lock:
            if (rtype, rid) in self.repos:
                raise HubError(409, "You already created this model repo")
            repo: dict[str, Any] = {"commits": {}, "branches": {}, "tags": {}, "prs": {}, "private": private}
            self.repos[(rtype, rid)] = repo
            self.new_commit(repo, "main", None, {".gitattributes": self.regular_entry(GITATTRIBUTES)}, "initial commit")

    def regular_entry(self, data: bytes) -> dict[str, Any]:
        return {"oid": self.put_blob(data), "size": len(data), "lfs": None}

    def new_commit(
        self, repo: dict[str, Any], branch: str, parent: str | None, files: dict[str, Any], summary: str
    ) -> str:
        body = json.dumps([parent, sorted((k, v["oid"]) for k, v in files.items()), summary, time.time_ns()])
        oid = hashlib.sha1(body.encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo["commits"][oid] = {"parent": parent, "files": files, "summary": summary, "date": date}
        repo["branches"][branch] = oid
        return oid

    def resolve(self, repo: dict[str, Any], rev: str) -> str:
        rev = unquote(rev)
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if rev in repo["tags"]:
            return repo["tags"][rev]
        if HEX40.fullmatch(rev) and rev in repo["commits"]:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def open_pr(self, repo: dict[str, Any], title: str) -> int:
        with self.lock:
            num = len(repo["prs"]) + 1
            repo["prs"][num] = {"title": title, "base": "main"}
            repo["branches"][f"refs/pr/{num}"] = repo["branches"]["main"]
            return num

    def commit(self, repo: dict[str, Any], rev: str, lines: list[dict[str, Any]]) -> str:
        with self.lock:
            branch = unquote(rev)
            if branch not in repo["branches"]:
                if HEX40.fullmatch(branch) or branch in repo["tags"]:
                    raise HubError(400, "Can only commit to a branch")
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo["branches"][branch]
            header = lines[0]["value"] if lines and lines[0].get("key") == "header" else {}
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo["commits"][head]["files"])
            for line in lines[1:]:
                key, v = line["key"], line["value"]
                if key == "file":
                    files[v["path"]] = self.regular_entry(base64.b64decode(v["content"]))
                elif key == "lfsFile":
                    path = self.lfs_path(v["oid"])
                    if not os.path.exists(path):
                        raise HubError(422, f"LFS object {v['oid']} for {v['path']} was not uploaded")
                    size = os.path.getsize(path)
                    ptr = lfs_pointer(v["oid"], size)
                    lfs = {"oid": v["oid"], "size": size, "pointerSize": len(ptr)}
                    files[v["path"]] = {"oid": git_blob_sha1(ptr), "size": size, "lfs": lfs}
                elif key == "deletedFile":
                    if v["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[v["path"]]
                elif key == "deletedFolder":
                    prefix = v["path"].rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise HubError(400, f"unknown commit operation {key}")
            return self.new_commit(repo, branch, head, files, header.get("summary", ""))

    def requests(self, since: int = 0) -> list[Request]:
        """The requests logged after the first ``since`` (use ``len(store.log)`` as a mark)."""
        with self.lock:
            return list(self.log[since:])


def file_item(path: str, e: dict[str, Any]) -> dict[str, Any]:
    item = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
    if e["lfs"]:
        item["lfs"] = dict(e["lfs"])
    return item


def dir_item(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}


def tree_entries(files: dict[str, Any], path: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    out, dirs = [], set()
    for p in sorted(files):
        if not p.startswith(prefix):
            continue
        parts = p[len(prefix) :].split("/")
        for i in range(1, len(parts) if recursive else min(2, len(parts))):
            dirs.add(prefix + "/".join(parts[:i]))
        if recursive or len(parts) == 1:
            out.append(file_item(p, files[p]))
    if prefix and not out and not dirs:
        raise HubError(404, f"{path} does not exist", "EntryNotFound")
    return sorted(out + [dir_item(d) for d in dirs], key=lambda x: x["path"])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minihub/1"
    store: Store

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests go to store.log instead

    # -- plumbing
    def base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None, *, raw: bytes | None = None,
             ctype: str = "application/json", length: int | None = None) -> None:  # fmt: skip
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status = code
        super().send_response(code, message)

    def end_headers(self) -> None:
        # logged before the client can see the answer, so a test that marks the log after a call
        # returns never catches that call's request late
        self.record()
        super().end_headers()

    def record(self) -> None:
        if not self.logged:
            self.logged = True
            with self.store.lock:
                self.store.log.append(
                    Request(self.command, unquote(urlsplit(self.path).path), self.headers.get("Range"), self.status)
                )

    def dispatch(self) -> None:
        self.status, self.logged = 0, False
        url = urlsplit(self.path)
        try:
            self.body = self.read_body()  # always drain the body, or keep-alive breaks
            self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            self.user = self.authenticate()
            self.route(self.command, url.path)
        except HubError as e:
            h = dict(e.headers)
            if e.code:
                h["X-Error-Code"] = e.code
            h["X-Error-Message"] = e.message
            self.send(e.status, {"error": e.message}, h)
        except Exception as e:  # a server bug: answer 500 so the test sees it in the log
            self.send(500, {"error": f"{type(e).__name__}: {e}"})
        finally:
            self.record()

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = dispatch

    def authenticate(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not self.store.tokens:
            return None
        user = self.store.tokens.get(auth[len("Bearer ") :])
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    # -- routing
    def route(self, method: str, path: str) -> None:
        s = self.store
        if method == "POST" and path == "/api/validate-yaml":
            return self.send(200, {"errors": [], "warnings": []})
        if method == "GET" and path == "/api/whoami-v2":
            if self.user is None:
                raise HubError(401, "Invalid user token.")
            return self.send(200, {"type": "user", "name": self.user, "orgs": []})
        if method == "POST" and path == "/api/repos/create":
            p = json.loads(self.body or b"{}")
            rtype = p.get("type") or "model"
            rid = f"{p.get('organization') or self.user}/{p['name']}"
            url = f"{self.base()}/{'' if rtype == 'model' else rtype + 's/'}{rid}"
            s.check_write(rid, self.user)
            try:
                s.create_repo(rtype, rid, bool(p.get("private")) or p.get("visibility") == "private")
            except HubError as e:  # the Hub's 409 body carries "url": create_repo(exist_ok=True) reads it
                return self.send(e.status, {"error": e.message, "url": url}, {"X-Error-Message": e.message})
            return self.send(200, {"url": url, "name": rid})
        m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?", path)
        if m:
            return self.api(method, REPO_TYPES[m.group(1)], m.group(2), m.group(3) or "")
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+?)\.git/info/lfs/objects/batch", path)
        if m and method == "POST":
            return self.lfs_batch(REPO_TYPES[(m.group(1) or "models")], m.group(2))
        m = re.fullmatch(r"/_lfs/(upload|part|complete|verify)/([0-9a-f]{64})(?:/(\d+))?", path)
        if m:
            return self.lfs_transfer(method, m.group(1), m.group(2), m.group(3))
        m = re.fullmatch(r"/_cdn/([0-9a-f]{64})", path)
        if m and method in ("GET", "HEAD"):
            return self.serve_file(s.lfs_path(m.group(1)), {"ETag": f'"{m.group(1)}"'})
        m = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            return self.resolve_file(REPO_TYPES[(m.group(1) or "models")], m.group(2), m.group(3), unquote(m.group(4)))
        raise HubError(404, f"no route for {method} {path}")

    def api(self, method: str, rtype: str, rid: str, rest: str) -> None:
        s = self.store
        write = method in ("POST", "PUT", "DELETE") and not rest.startswith("paths-info")
        repo = s.repo(rtype, rid, self.user, write=write)
        op, _, arg = rest.partition("/")
        if method == "GET" and op in ("", "revision"):
            sha = s.resolve(repo, arg or "main")
            c = repo["commits"][sha]
            return self.send(200, {"id": rid, "sha": sha, "private": repo["private"], "disabled": False, "gated": False,
                                   "lastModified": c["date"], "tags": [], "downloads": 0, "likes": 0,
                                   "siblings": [{"rfilename": p} for p in sorted(c["files"])]})  # fmt: skip
        if method == "GET" and op == "tree":
            rev, _, sub = arg.partition("/")
            files = repo["commits"][s.resolve(repo, rev)]["files"]
            recursive = self.query.get("recursive", "false").lower() in ("1", "true")
            return self.send(200, tree_entries(files, unquote(sub), recursive))
        if method == "POST" and op == "paths-info":
            files = repo["commits"][s.resolve(repo, arg)]["files"]
            out = []
            for p in parse_qs(self.body.decode()).get("paths", []):
                if p in files:
                    out.append(file_item(p, files[p]))
                elif any(f.startswith(p.rstrip("/") + "/") for f in files):
                    out.append(dir_item(p))
            return self.send(200, out)
        if method == "POST" and op == "preupload":
            files = repo["commits"][s.resolve(repo, arg)]["files"]
            out = []
            for f in json.loads(self.body)["files"]:
                lfs = self.is_lfs(f["path"], f["size"], base64.b64decode(f.get("sample", "")))
                e = files.get(f["path"])
                oid = None  # the remote oid lets the client skip an unchanged file
                if e is not None and bool(e["lfs"]) == lfs:
                    oid = e["lfs"]["oid"] if lfs else e["oid"]
                out.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            return self.send(200, {"files": out})
        if method == "POST" and op == "commit":
            if "ndjson" not in (self.headers.get("Content-Type") or ""):
                raise HubError(400, "expected application/x-ndjson")
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
            rev, pr_url = arg, None
            if self.query.get("create_pr") in ("1", "true", "True"):
                num = s.open_pr(repo, lines[0]["value"].get("summary", "") if lines else "")
                rev, pr_url = f"refs/pr/{num}", f"{self.base()}/{self.prefix(rtype)}{rid}/discussions/{num}"
            oid = s.commit(repo, rev, lines)
            commit_url = f"{self.base()}/{self.prefix(rtype)}{rid}/commit/{oid}"
            return self.send(
                200, {"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": pr_url}
            )
        if method == "POST" and op == "discussions" and not arg:
            p = json.loads(self.body or b"{}")
            if not p.get("pullRequest"):
                raise HubError(400, "this test server only opens pull requests")
            return self.send(200, {"num": s.open_pr(repo, p.get("title", ""))})
        if method == "GET" and op == "discussions" and arg.isdigit() and int(arg) in repo["prs"]:
            pr = repo["prs"][int(arg)]
            return self.send(200, {"num": int(arg), "title": pr["title"], "status": "draft", "isPullRequest": True,
                                   "author": {"name": rid.split("/")[0]}, "createdAt": "2026-01-01T00:00:00.000Z",
                                   "repo": {"name": rid, "type": rtype}, "events": [], "filesWithConflicts": [],
                                   "changes": {"base": pr["base"]}, "diff": ""})  # fmt: skip
        if method == "GET" and op == "refs":

            def ref(kind: str, name: str, target: str) -> dict[str, str]:
                return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": target}

            branches = [ref("heads", n, t) for n, t in sorted(repo["branches"].items()) if not n.startswith("refs/pr/")]
            prs = [
                {"name": n, "ref": n, "targetCommit": t}
                for n, t in sorted(repo["branches"].items())
                if n.startswith("refs/pr/")
            ]
            tags = [ref("tags", n, t) for n, t in sorted(repo["tags"].items())]
            return self.send(200, {"branches": branches, "tags": tags, "converts": [], "pullRequests": prs})
        if op in ("branch", "tag") and method in ("POST", "DELETE"):
            name = unquote(arg)
            p = json.loads(self.body or b"{}")
            with s.lock:
                if op == "branch" and method == "POST":
                    if name in repo["branches"]:
                        raise HubError(409, f"Reference already exists: {name}")
                    repo["branches"][name] = s.resolve(repo, p.get("startingPoint") or "main")
                elif op == "branch":
                    repo["branches"].pop(name, None)
                elif method == "POST":  # arg is the revision to tag
                    if p["tag"] in repo["tags"]:
                        raise HubError(409, f"Tag {p['tag']} already exists")
                    repo["tags"][p["tag"]] = s.resolve(repo, name)
                else:
                    repo["tags"].pop(name, None)
            return self.send(200, {})
        if op in ("xet-write-token", "xet-read-token"):
            raise HubError(501, "Xet is not served here: set HF_HUB_DISABLE_XET=1 or use lfs_mode='never'")
        raise HubError(404, f"no api route for {method} {op}")

    @staticmethod
    def prefix(rtype: str) -> str:
        return "" if rtype == "model" else f"{rtype}s/"

    def is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        s = self.store
        if s.lfs_mode != "auto":
            return s.lfs_mode == "always"
        name = os.path.basename(path)
        return size >= s.lfs_threshold or b"\0" in sample or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)

    # -- git-LFS
    def lfs_batch(self, rtype: str, rid: str) -> None:
        s = self.store
        s.repo(rtype, rid, self.user, write=True)
        req = json.loads(self.body)
        if req.get("operation") != "upload":
            raise HubError(400, "only upload is supported")
        objs = []
        for o in req["objects"]:
            oid, size = o["oid"], int(o["size"])
            if os.path.exists(s.lfs_path(oid)):
                objs.append({"oid": oid, "size": size})  # already stored: no actions
                continue
            multipart = s.multipart_threshold is not None and size > s.multipart_threshold
            if multipart and "multipart" in req.get("transfers", []):
                n = -(-size // s.multipart_chunk)
                parts = {str(i): f"{self.base()}/_lfs/part/{oid}/{i}" for i in range(1, n + 1)}
                upload = {
                    "href": f"{self.base()}/_lfs/complete/{oid}",
                    "header": {"chunk_size": str(s.multipart_chunk), **parts},
                }
            else:
                upload = {"href": f"{self.base()}/_lfs/upload/{oid}"}
            verify = {"href": f"{self.base()}/_lfs/verify/{oid}"}
            objs.append(
                {"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}}
            )
        self.send(
            200, {"transfer": "basic", "objects": objs, "hash_algo": "sha256"}, ctype="application/vnd.git-lfs+json"
        )

    def store_lfs(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch for uploaded LFS object")
        path = self.store.lfs_path(oid)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def lfs_transfer(self, method: str, kind: str, oid: str, part: str | None) -> None:
        s = self.store
        if kind == "upload" and method == "PUT":
            self.store_lfs(oid, self.body)
            return self.send(200, {})
        if kind == "part" and method == "PUT" and part is not None:
            with s.lock:
                s.parts.setdefault(oid, {})[int(part)] = self.body
            return self.send(200, {}, {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'})
        if kind == "complete" and method == "POST":
            nums = [p["partNumber"] for p in json.loads(self.body)["parts"]]
            with s.lock:
                chunks = s.parts.pop(oid, {})
            if sorted(nums) != list(range(1, len(chunks) + 1)):
                raise HubError(400, "incomplete multipart upload")
            self.store_lfs(oid, b"".join(chunks[i] for i in sorted(nums)))
            return self.send(200, {})
        if kind == "verify" and method == "POST":
            req = json.loads(self.body)
            path = s.lfs_path(req["oid"])
            if not os.path.exists(path) or os.path.getsize(path) != int(req["size"]):
                raise HubError(404, "LFS object not found")
            return self.send(200, {})
        raise HubError(405, "method not allowed")

    # -- downloads
    def resolve_file(self, rtype: str, rid: str, rev: str, filename: str) -> None:
        s = self.store
        repo = s.repo(rtype, rid, self.user)
        sha = s.resolve(repo, rev)
        e = repo["commits"][sha]["files"].get(filename)
        h = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if e is None:
            raise HubError(404, "Entry not found", "EntryNotFound", h)
        if not e["lfs"]:
            h["ETag"] = f'"{e["oid"]}"'
            return self.serve_file(s.blob_path(e), h)
        h.update({"X-Linked-Etag": f'"{e["lfs"]["oid"]}"', "X-Linked-Size": str(e["size"]), "ETag": f'"{e["oid"]}"'})
        if s.cdn_host:  # the Hub sends LFS files from a CDN on another origin
            h["Location"] = f"http://{s.cdn_host}:{self.server.server_address[1]}/_cdn/{e['lfs']['oid']}"
            return self.send(302, raw=b"", headers=h)
        return self.serve_file(s.blob_path(e), h)

    def serve_file(self, path: str, headers: dict[str, str]) -> None:
        if not os.path.exists(path):
            raise HubError(404, "blob missing", "EntryNotFound")
        size = os.path.getsize(path)
        start, end, status = 0, size, 200
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None or int(m.group(1)) >= max(size, 1):
                raise HubError(
                    416, f"unsatisfiable range {rng!r} for {size} bytes", headers={"Content-Range": f"bytes */{size}"}
                )
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if self.command == "HEAD":
            return self.send(status, raw=b"", headers=headers, ctype="application/octet-stream", length=size)
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        self.send(status, raw=data, headers=headers, ctype="application/octet-stream")


def make_server(data_dir: str, host: str = "127.0.0.1", port: int = 0, **store_options: Any) -> ThreadingHTTPServer:
    """A server on ``host:port`` (0 picks a free port) over a `Store` in ``data_dir``; its store is
    ``server.store``. Run it with ``threading.Thread(target=server.serve_forever, daemon=True)``.

    Example:
        >>> srv = make_server("/tmp/hub", tokens={"hf_me": "me"})
        >>> endpoint = f"http://127.0.0.1:{srv.server_address[1]}"
    """
    store = Store(data_dir, **store_options)
    handler = type("BoundHandler", (Handler,), {"store": store})
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    srv.store = store  # type: ignore[attr-defined]
    return srv
