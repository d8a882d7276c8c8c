"""An OCI registry that shares blobs across repositories by digest, as Zot does with its
dedupe cache and its own access control off (FIELD-NOTES, Zot).

Real HTTP/1.1 (keep-alive, Content-Length on every answer, no body on HEAD) in a thread. What
makes it a faithful stand-in for the vulnerability the gateway must close:

- one GLOBAL blob store: `HEAD`/`GET /v2/<any repo>/blobs/<d>` answers for any known digest;
- a mount (`?mount=<d>&from=<x>`) succeeds (201) whenever `<d>` is known, `from` is ignored;
  as in Zot's CreateBlobUpload, that 201 (and a monolithic POST's) carries only `Location`,
  no `Docker-Content-Digest`;
- a manifest PUT is accepted when every digest it references exists anywhere;
- a manifest by digest is served from any repository.

Every request is recorded in `requests` (method, path, query) so tests can prove a request
never got here.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

NAME = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
DIGEST = r"sha256:[a-f0-9]{64}"
_BLOB = re.compile(rf"/v2/(?P<name>{NAME})/blobs/(?P<digest>{DIGEST})")
_UPLOADS = re.compile(rf"/v2/(?P<name>{NAME})/blobs/uploads/")
_UPLOAD = re.compile(rf"/v2/(?P<name>{NAME})/blobs/uploads/(?P<id>[A-Za-z0-9-]+)")
_MANIFEST = re.compile(rf"/v2/(?P<name>{NAME})/manifests/(?P<ref>[A-Za-z0-9_.:-]+)")
_TAGS = re.compile(rf"/v2/(?P<name>{NAME})/tags/list")
_REFERRERS = re.compile(rf"/v2/(?P<name>{NAME})/referrers/(?P<digest>{DIGEST})")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Repo:
    tags: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest
    manifests: set[str] = field(default_factory=set)  # digests pushed here


class DedupeRegistry:
    """`DedupeRegistry(port).start()`; `url`, `port`, `requests`, `stop()`."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.blobs: dict[str, bytes] = {}  # GLOBAL, whatever the repository
        self.manifests: dict[str, tuple[str, bytes]] = {}  # GLOBAL digest -> (type, bytes)
        self.repos: dict[str, Repo] = {}
        self.uploads: dict[str, tuple[str, bytearray]] = {}  # id -> (repo, data so far)
        self.requests: list[Seen] = []
        self.catalog_fails = False  # a backend whose catalog answers 503 (a walk cannot end)
        self.lock = threading.RLock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query, keep_blank_values=True)
                registry.requests.append(Seen(self.command, parts.path, query))
                body = self._read_body()
                try:
                    registry.dispatch(self, self.command, parts.path, query, body)
                except Exception as e:  # an honest 500, never a hung connection
                    self.answer(500, error=("UNKNOWN", repr(e)))

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def answer(
                self,
                status: int,
                body: bytes = b"",
                headers: dict[str, str] | None = None,
                error: tuple[str, str] | None = None,
                length: int | None = None,
            ) -> None:
                all_headers = dict(headers or {})
                if error is not None:
                    code, message = error
                    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
                    all_headers["Content-Type"] = "application/json"
                elif body and "Content-Type" not in all_headers:
                    all_headers["Content-Type"] = "application/json"
                self.send_response(status)
                all_headers["Docker-Distribution-API-Version"] = "registry/2.0"
                all_headers["Content-Length"] = str(len(body) if length is None else length)
                for k, v in all_headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD" and body:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> DedupeRegistry:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- requests -------------------------------------------------------------------------

    def _repo(self, name: str) -> Repo:
        with self.lock:
            return self.repos.setdefault(name, Repo())

    def dispatch(
        self, h: Any, method: str, path: str, q: dict[str, list[str]], body: bytes
    ) -> None:
        one = {k: v[0] for k, v in q.items()}
        if path == "/v2/" and method in ("GET", "HEAD"):
            return h.answer(200, b"{}")
        if path == "/v2/_catalog" and method == "GET":
            if self.catalog_fails:
                return h.answer(503, error=("UNAVAILABLE", "catalog unavailable"))
            with self.lock:
                names = sorted(n for n, r in self.repos.items() if r.tags or r.manifests)
            return h.answer(200, json.dumps({"repositories": names}).encode())
        if m := _UPLOADS.fullmatch(path):
            if method == "POST":
                return self._upload_start(h, m["name"], one, body)
        elif m := _UPLOAD.fullmatch(path):
            return self._upload(h, method, m["name"], m["id"], one, body)
        elif m := _BLOB.fullmatch(path):
            return self._blob(h, method, m["digest"])
        elif m := _MANIFEST.fullmatch(path):
            return self._manifest(h, method, m["name"], m["ref"], body)
        elif m := _TAGS.fullmatch(path):
            with self.lock:
                repo = self.repos.get(m["name"])
                tags = sorted(repo.tags) if repo else None
            if tags is None:
                return h.answer(404, error=("NAME_UNKNOWN", "repository name not known"))
            return h.answer(200, json.dumps({"name": m["name"], "tags": tags}).encode())
        elif (m := _REFERRERS.fullmatch(path)) and method == "GET":
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            return h.answer(200, json.dumps(index).encode(), {"Content-Type": OCI_INDEX})
        return h.answer(404, error=("NOT_FOUND", f"{method} {path}"))

    def _blob_created(self, h: Any, name: str, digest: str, confirm: bool = True) -> None:
        self._repo(name)
        headers = {"Location": f"/v2/{name}/blobs/{digest}"}
        if confirm:
            headers["Docker-Content-Digest"] = digest
        h.answer(201, headers=headers)

    def _upload_start(self, h: Any, name: str, q: dict[str, str], body: bytes) -> None:
        """Zot's CreateBlobUpload: `mount` first (`from` ignored; a known digest is linked,
        else a plain upload starts, `digest` ignored); then a monolithic `digest` upload.
        Like Zot, neither 201 carries Docker-Content-Digest: only `Location`."""
        if "mount" in q:
            with self.lock:
                known = q["mount"] in self.blobs
            if known:
                return self._blob_created(h, name, q["mount"], confirm=False)
        elif "from" in q:
            return h.answer(405, error=("UNSUPPORTED", "from without mount"))
        elif digest := q.get("digest"):  # monolithic
            if sha256(body) != digest:
                return h.answer(400, error=("DIGEST_INVALID", "digest does not match content"))
            with self.lock:
                self.blobs[digest] = body
            return self._blob_created(h, name, digest, confirm=False)
        upload = uuid.uuid4().hex
        with self.lock:
            self.uploads[upload] = (name, bytearray())
        location = f"/v2/{name}/blobs/uploads/{upload}"
        h.answer(202, headers={"Location": location, "Range": "0-0", "Docker-Upload-UUID": upload})

    def _upload(
        self, h: Any, method: str, name: str, upload: str, q: dict[str, str], body: bytes
    ) -> None:
        with self.lock:
            session = self.uploads.get(upload)
        if session is None or session[0] != name:
            return h.answer(404, error=("BLOB_UPLOAD_UNKNOWN", "upload unknown"))
        data = session[1]
        location = f"/v2/{name}/blobs/uploads/{upload}"
        if method == "DELETE":
            with self.lock:
                self.uploads.pop(upload, None)
            return h.answer(204)
        if method == "GET":
            return h.answer(
                204, headers={"Location": location, "Range": f"0-{max(len(data) - 1, 0)}"}
            )
        if method == "PATCH":
            data += body
            return h.answer(
                202,
                headers={
                    "Location": location,
                    "Range": f"0-{max(len(data) - 1, 0)}",
                    "Docker-Upload-UUID": upload,
                },
            )
        if method == "PUT":
            data += body
            digest = q.get("digest", "")
            if sha256(bytes(data)) != digest:
                return h.answer(400, error=("DIGEST_INVALID", "digest does not match content"))
            with self.lock:
                self.blobs[digest] = bytes(data)
                self.uploads.pop(upload, None)
            return self._blob_created(h, name, digest)
        return h.answer(405, error=("UNSUPPORTED", method))

    def _blob(self, h: Any, method: str, digest: str) -> None:
        with self.lock:
            data = self.blobs.get(digest)
        if method == "DELETE":
            return h.answer(202 if data is not None else 404)
        if data is None:
            return h.answer(404, error=("BLOB_UNKNOWN", "blob unknown to registry"))
        headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"}
        if method == "HEAD":
            return h.answer(200, headers=headers, length=len(data))
        rng = _RANGE.fullmatch(h.headers.get("Range", "").strip())
        if rng:
            start = int(rng[1])
            end = min(int(rng[2]) if rng[2] else len(data) - 1, len(data) - 1)
            if start > end:
                return h.answer(416, headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return h.answer(206, data[start : end + 1], headers)
        return h.answer(200, data, headers)

    def _manifest(self, h: Any, method: str, name: str, ref: str, body: bytes) -> None:
        by_digest = re.fullmatch(DIGEST, ref) is not None
        if method == "PUT":
            return self._manifest_put(h, name, ref, by_digest, body)
        with self.lock:
            repo = self.repos.get(name)
            # A tag is per repository; a digest is served from ANY repository (global).
            digest = ref if by_digest else (repo.tags.get(ref) if repo else None)
            stored = self.manifests.get(digest) if digest else None
            if method == "DELETE" and stored is not None and repo is not None:
                repo.tags = {t: d for t, d in repo.tags.items() if d != digest}
                repo.manifests.discard(digest)
        if stored is None:
            return h.answer(404, error=("MANIFEST_UNKNOWN", "manifest unknown"))
        if method == "DELETE":
            return h.answer(202)
        media_type, data = stored
        headers = {"Content-Type": media_type, "Docker-Content-Digest": digest}
        if method == "HEAD":
            return h.answer(200, headers=headers, length=len(data))
        return h.answer(200, data, headers)

    def store(self, name: str, tag: str, media_type: str, body: bytes) -> str:
        """Put a manifest straight into storage, unchecked: content the registry already
        holds however it got there (an older version, a restored backup, a bug)."""
        digest = sha256(body)
        with self.lock:
            self.manifests[digest] = (media_type, body)
            repo = self._repo(name)
            repo.manifests.add(digest)
            repo.tags[tag] = digest
        return digest

    def _manifest_put(self, h: Any, name: str, ref: str, by_digest: bool, body: bytes) -> None:
        digest = sha256(body)
        if by_digest and ref != digest:
            return h.answer(400, error=("DIGEST_INVALID", "digest does not match manifest"))
        try:
            doc = json.loads(body)
            descriptors = [doc["config"]] if isinstance(doc.get("config"), dict) else []
            for key in ("layers", "manifests", "blobs"):
                descriptors += doc.get(key) or []
            refs = [d["digest"] for d in descriptors]
        except (ValueError, KeyError, TypeError, AttributeError):
            return h.answer(400, error=("MANIFEST_INVALID", "manifest invalid"))
        with self.lock:  # dedupe: any digest known anywhere will do
            missing = [d for d in refs if d not in self.blobs and d not in self.manifests]
            if missing:
                return h.answer(400, error=("MANIFEST_BLOB_UNKNOWN", " ".join(missing)))
            media_type = h.headers.get("Content-Type") or doc.get("mediaType") or ""
            self.manifests[digest] = (media_type, body)
            repo = self._repo(name)
            repo.manifests.add(digest)
            if not by_digest:
                repo.tags[ref] = digest
        h.answer(
            201,
            headers={"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest},
        )
