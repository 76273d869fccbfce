"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving the routes huggingface_hub 2.x
calls (see shared/API.md, "The Hub routes"): model info, the file tree, HEAD/GET of files
with byte ranges, and model search. Tests point ``endpoint=`` / MRS_MIRROR / HF_ENDPOINT at
``FakeHub.url``.

Faults are scripted per file: ``hub.faults["model.safetensors"] = ["cut", "fail"]`` makes
the next GET send half the body and drop the connection, and the one after answer 500;
"corrupt" sends the right number of wrong bytes.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    pipeline_tag: str = "text-generation"
    tags: list[str] = field(default_factory=lambda: ["safetensors", "llama"])
    downloads: int = 0
    likes: int = 0


class FakeHub:
    """A threaded HTTP server holding fixture repos; ``requests`` logs (method, path, Range)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, files: dict[str, bytes], ref: str = "main", **meta) -> str:
        """Add a commit holding ``files`` to ``repo_id`` under branch/tag ``ref``; returns its sha."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, **meta))
        commit = hashlib.sha1(
            json.dumps(
                [repo_id, ref, sorted((k, git_blob_sha1(v)) for k, v in files.items())]
            ).encode(),
            usedforsecurity=False,
        ).hexdigest()
        repo.commits[commit] = dict(files)
        repo.refs[ref] = commit
        return commit

    def add_folder(
        self,
        repo_id: str,
        folder: Path,
        extra: dict[str, bytes] | None = None,
        ref: str = "main",
        **meta,
    ) -> str:
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return self.add(repo_id, files | (extra or {}), ref=ref, **meta)

    def gets(self, path: str) -> list[str | None]:
        """The Range header of every GET of a file path (None for a plain GET)."""
        return [
            r
            for m, p, r in self.requests
            if m == "GET" and p.endswith("/" + path) and "/resolve/" in p
        ]

    # -- lookups used by the handler ------------------------------------------------------

    def commit(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.commits:
            return rev
        return repo.refs.get(rev)


def _entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
    if path.endswith((".safetensors", ".bin")):
        entry["lfs"] = {
            "oid": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "pointerSize": 134,
        }
    return entry


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        # -- responses --------------------------------------------------------------------

        def send_json(self, value, status: int = 200, headers: dict | None = None) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def not_found(self, code: str, message: str) -> None:
            self.send_json(
                {"error": message}, 404, {"X-Error-Code": code, "X-Error-Message": message}
            )

        # -- routing ----------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self.route()

        def do_GET(self) -> None:
            self.route()

        def route(self) -> None:
            url = urlsplit(self.path)
            with hub.lock:
                hub.requests.append((self.command, url.path, self.headers.get("Range")))
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if parts[:2] == ["api", "models"] and len(parts) == 2:
                return self.search(query)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self.api_model(parts[2:])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            self.send_json({"error": "no such route"}, 404)

        def repo_at(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self.not_found("RepoNotFound", f"Repository {repo_id} not found")
                return None
            commit = hub.commit(repo, rev)
            if commit is None:
                self.not_found("RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo, commit

        def api_model(self, rest: list[str]) -> None:
            repo_id, rest = "/".join(rest[:2]), rest[2:]
            if not rest or rest[0] == "revision":  # /api/models/{id}[/revision/{rev}]
                found = self.repo_at(repo_id, rest[1] if rest else "main")
                if found:
                    repo, commit = found
                    self.send_json(
                        {
                            "id": repo_id,
                            "modelId": repo_id,
                            "sha": commit,
                            "private": False,
                            "pipeline_tag": repo.pipeline_tag,
                            "tags": repo.tags,
                            "downloads": repo.downloads,
                            "likes": repo.likes,
                            "siblings": [{"rfilename": p} for p in sorted(repo.commits[commit])],
                        }
                    )
            elif rest[0] == "tree" and len(rest) >= 2:  # /api/models/{id}/tree/{rev}[/{path}]
                found = self.repo_at(repo_id, rest[1])
                if found:
                    repo, commit = found
                    prefix = "/".join(rest[2:])
                    files = repo.commits[commit]
                    self.send_json(
                        [_entry(p, files[p]) for p in sorted(files) if p.startswith(prefix)]
                    )
            else:
                self.send_json({"error": "no such route"}, 404)

        def resolve(self, repo_id: str, rev: str, path: str) -> None:
            found = self.repo_at(repo_id, rev)
            if not found:
                return
            repo, commit = found
            data = repo.commits[commit].get(path)
            if data is None:
                return self.not_found("EntryNotFound", f"{path} does not exist at {rev}")
            entry = _entry(path, data)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            start = 0
            ranged = self.headers.get("Range")
            if ranged and ranged.startswith("bytes=") and self.command == "GET":
                start = int(ranged[len("bytes=") :].split("-")[0] or 0)
            fault = None
            if self.command == "GET":
                with hub.lock:
                    plan = hub.faults.get(path)
                    fault = plan.pop(0) if plan else None
            if fault == "fail":
                return self.send_json({"error": "scripted failure"}, 500)
            body = data[start:]
            if fault == "corrupt":  # same length, different bytes
                body = bytes(b ^ 0x55 for b in body)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault == "cut":  # half the body, then drop the connection
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if fault == "slow":  # about 200 kB/s, so a client can leave mid-download
                for at in range(0, len(body), 4096):
                    try:
                        self.wfile.write(body[at:at + 4096])
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.02)
                return
            self.wfile.write(body)

        def search(self, query: dict[str, str]) -> None:
            text = query.get("search", "").lower()
            found = [
                r
                for r in hub.repos.values()
                if text in r.repo_id.lower()
                and query.get("pipeline_tag") in (None, r.pipeline_tag)
                and query.get("filter") in (None, *r.tags)
            ]
            if query.get("sort") == "downloads":
                found.sort(key=lambda r: -r.downloads)
            found = found[: int(query.get("limit", 1000))]
            self.send_json(
                [
                    {
                        "id": r.repo_id,
                        "modelId": r.repo_id,
                        "downloads": r.downloads,
                        "likes": r.likes,
                        "pipeline_tag": r.pipeline_tag,
                        "tags": r.tags,
                        "private": False,
                        "createdAt": "2024-05-01T00:00:00.000Z",
                    }
                    for r in found
                ]
            )

    return Handler
