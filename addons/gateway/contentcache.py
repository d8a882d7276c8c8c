"""Content-addressed answers from memory: a manifest GET/HEAD by digest and a blob HEAD by
digest, answered by this worker without asking the backend again.

What a digest names never changes; only whether the repository still holds it does. So:

- The cache sits at the gate: every per-request decision (token, policy, isolation,
  immutable tags, signatures) is made first, unchanged; only a request they all allowed,
  that nobody answered, is looked up. A tag read always asks the backend.
- Keyed by (kind, repository, digest): a digest readable in one repository is not served in
  another (the backend answers per repository).
- Filled by what passed through: a backend 200 for a manifest GET by digest (the body is
  hashed and must match the digest, its length the Content-Length; media type one of the
  manifest types) and for a blob HEAD by digest (headers only; the backend's
  Docker-Content-Digest must name it); and by a manifest PUT the backend confirmed (201)
  whose body the gateway read (its digest computed here), once this worker has seen how the
  backend answers a manifest GET (its fixed headers, whether it sends an ETag).
- Served only as the backend would: a manifest only to a request whose Accept lists its
  media type exactly (Distribution refuses an OCI manifest to a client that does not accept
  it); nothing to a conditional or ranged request, nor one with query parameters. A HEAD
  answer carries no body, with the Content-Length of the GET.
- Bounded per worker: MAX_BYTES of bodies and headers (REGISTRY_CACHE_MB; 0 turns it off,
  OVERHEAD counted per entry), MAX_ENTRIES entries, manifests above MAX_BODY not cached;
  least recently used first out.
- Invalidation: every DELETE forwarded through any worker (whatever the backend answered, or
  if the connection failed) empties this worker's cache and rewrites
  `<registry_state_dir>/signatures.generation` (addons/gateway/require_signature.py), as GC does
  (addons/cli/gc.py); every worker reads that token before each lookup and empties its
  cache when it changed. A fill is dropped when the token changed while its request was at
  the backend (a delete may have landed in between). What bypasses the gateway (another
  node's deletes on shared storage, Zot's own GC or retention) is bounded by TTL: no entry
  is served more than TTL seconds after the backend last said it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from addons.config import mirrors
from addons.decisions.manifest import MEDIA_TYPES
from addons.decisions.routes import DIGEST
from addons.gateway import require_signature
from addons.gateway.gate import answered, fail_closed, respond
from addons.gateway.record import record

logger = logging.getLogger(__name__)

MAX_BYTES = 48 * 1024 * 1024  # with ~90 MB of engine: a worker stays under 150 MB
MAX_ENTRIES = 20_000
MAX_BODY = 512 * 1024  # larger manifests are not cached
OVERHEAD = 512  # bytes counted per entry besides its body and headers
TTL = 10.0

_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
_DIGEST_RE = re.compile(DIGEST)
# Headers of the backend's answer that are per connection or per moment, never cached.
_NOT_CACHED = frozenset(
    {b"date", b"connection", b"keep-alive", b"transfer-encoding", b"set-cookie", b"age"}
)
# Headers of a manifest answer that depend on the manifest (the rest is the backend's fixed set).
_PER_MANIFEST = frozenset({b"content-type", b"content-length", b"docker-content-digest", b"etag"})
# A request with one of these may get another answer than a plain 200 (206, 304, 412).
_CONDITIONAL = frozenset(
    {
        b"range",
        b"if-none-match",
        b"if-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
    }
)

Key = tuple[str, str, str]  # ("manifest" | "blob", repository, digest)
Headers = tuple[tuple[bytes, bytes], ...]


def digest_of(algorithm: str, body: bytes) -> str | None:
    h = _HASHES.get(algorithm)
    return f"{algorithm}:{h(body).hexdigest()}" if h else None


def accepts(accept_values: list[str], media_type: str) -> bool:
    """Does the request's Accept list `media_type` exactly (parameters ignored)?"""
    for value in accept_values:
        for item in value.split(","):
            if item.split(";", 1)[0].strip().lower() == media_type:
                return True
    return False


@dataclass(slots=True)
class Entry:
    headers: Headers  # the answer's headers, as the client gets them
    body: bytes | None  # a manifest's bytes; None for a blob HEAD
    media_type: str | None  # a manifest's Content-Type
    expires: float
    size: int

    def response(self, method: str) -> http.Response:
        """The answer, built directly (no content encoding, no header parse): the headers
        are exactly the ones kept, Content-Length the GET's, a HEAD's body empty."""
        now = time.time()
        body = b"" if method == "HEAD" else (self.body or b"")
        return http.Response(
            b"HTTP/1.1", 200, b"OK", http.Headers(self.headers), body, None, now, now
        )


class Cache:
    """The bounded LRU store (pure: no mitmproxy state)."""

    def __init__(
        self,
        max_bytes: int = MAX_BYTES,
        max_entries: int = MAX_ENTRIES,
        ttl: float = TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes, self.max_entries, self.ttl, self.clock = max_bytes, max_entries, ttl, clock
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.clears = 0

    def get(self, key: Key) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None and entry.expires <= self.clock():
            self._drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Key, headers: Headers, body: bytes | None, media_type: str | None) -> bool:
        size = OVERHEAD + len(body or b"") + sum(len(n) + len(v) for n, v in headers)
        if size > self.max_bytes or self.max_entries < 1:
            return False
        if key in self.entries:
            self._drop(key)
        self.entries[key] = Entry(headers, body, media_type, self.clock() + self.ttl, size)
        self.bytes += size
        while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
            oldest = next(iter(self.entries))
            self._drop(oldest)
            self.evictions += 1
        return True

    def _drop(self, key: Key) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.size

    def clear(self) -> None:
        if self.entries:
            self.clears += 1
        self.entries.clear()
        self.bytes = 0

    def state(self) -> dict[str, int]:
        return {
            "entries": len(self.entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "clears": self.clears,
        }


def cacheable(
    kind: str | None, method: str, reference: str | None, params: dict[str, str]
) -> str | None:
    """The cache kind of a request, or None: a manifest GET/HEAD or a blob HEAD by digest."""
    if params or reference is None or not _DIGEST_RE.fullmatch(reference):
        return None
    if kind == "manifest" and method in ("GET", "HEAD"):
        return "manifest"
    if kind == "blob" and method == "HEAD":
        return "blob"
    return None


def kept_headers(headers: http.Headers) -> Headers:
    return tuple((n, v) for n, v in headers.fields if n.lower() not in _NOT_CACHED)


class _Collector:
    """A response stream callable that also keeps the first `limit` bytes."""

    __slots__ = ("data", "inner", "limit", "over")

    def __init__(self, inner: object, limit: int) -> None:
        self.inner, self.limit, self.data, self.over = inner, limit, bytearray(), False

    def __call__(self, chunk: bytes) -> bytes:
        if not self.over:
            if len(self.data) + len(chunk) > self.limit:
                self.over, self.data = True, bytearray()
            else:
                self.data += chunk
        return self.inner(chunk) if callable(self.inner) else chunk


class ContentCache:
    """The addon: runs after every deciding addon, just before the Gate."""

    def __init__(self) -> None:
        self.cache = Cache()
        self.local = 0  # invalidations in this worker (there may be no state directory)
        self._token: bytes | None = None
        # How this backend answers a manifest GET, learned from one: (fixed headers, ETag?).
        self.template: tuple[Headers, bool] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_cache_bytes",
            int,
            MAX_BYTES,
            "Bytes of content-addressed answers each worker keeps in memory (0: none).",
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_cache_bytes" in updated:
            self.cache.max_bytes = max(0, ctx.options.registry_cache_bytes)
            self.cache.clear()

    # --- invalidation -------------------------------------------------------------------------

    def generation(self) -> tuple[int, bytes | None]:
        """The invalidation generation now; empties the cache when another worker (or GC)
        moved it since this worker last looked."""
        token = require_signature.read_generation(ctx.options.registry_state_dir)
        if token != self._token:
            self.cache.clear()
            self._token = token
        return self.local, token

    def invalidate(self) -> None:
        self.local += 1
        self.cache.clear()
        if ctx.options.registry_state_dir:
            try:
                require_signature.bump_generation(ctx.options.registry_state_dir)
            except OSError as e:
                logger.error("cache: cannot tell the other workers of a delete (%s)", e)
        self.generation()

    # --- hooks ---------------------------------------------------------------------------------

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "registry" or not rec.allowed or answered(flow) or not rec.repository:
            return
        if mirrors.is_mirror(rec.repository):
            return  # read-only, verified and recorded as it streams (mirror.MirrorGate)
        method = flow.request.method
        if method == "DELETE":
            rec.cache_delete = True
            return
        if self.cache.max_bytes == 0:
            return
        if method == "PUT" and rec.route == "manifest":
            rec.cache_put = self.generation()
            return
        kind = cacheable(rec.route, method, rec.reference, rec.params)
        if kind is None or rec.holds:
            return
        accept: list[str] = []
        for name, value in flow.request.headers.fields:  # one pass (lookups by name are not)
            lower = name.lower()
            if lower in _CONDITIONAL:
                return
            if lower == b"accept":
                accept.append(value.decode("latin-1"))
        generation = self.generation()
        key = (kind, rec.repository, rec.reference or "")
        entry = self.cache.get(key)
        if entry is not None and (entry.media_type is None or accepts(accept, entry.media_type)):
            respond(flow, entry.response(method))
            rec.cached = True
            return
        if kind == "blob" or method == "GET":
            rec.cache_fill = (key, generation)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.cache_delete:
            rec.cache_delete = False
            # Here, before the client has a byte of the answer: a streamed answer's head (a
            # 202 with no body is complete with it) leaves before the `response` hook runs.
            self.invalidate()
            return
        fill = rec.cache_fill
        response = flow.response
        if fill is None or response is None or response.status_code != 200:
            return
        if fill[0][0] == "manifest":
            response.stream = _Collector(response.stream, MAX_BODY)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        response, rec = flow.response, record(flow)
        if rec.cache_delete:
            rec.cache_delete = False
            self.invalidate()  # whatever the backend answered: it may have deleted
            return
        if response is None:
            return
        put, rec.cache_put = rec.cache_put, None
        if put is not None and response.status_code == 201:
            self._fill_from_push(flow, put)
            return
        fill, rec.cache_fill = rec.cache_fill, None
        if fill is None or response.status_code != 200:
            return
        (kind, repository, digest), generation = fill
        if self.generation() != generation:
            return  # a delete or GC may have happened while the backend answered
        if response.headers.get("docker-content-digest") != digest:
            return
        if kind == "blob":
            if "content-length" in response.headers:
                self.cache.put(
                    (kind, repository, digest), kept_headers(response.headers), None, None
                )
            return
        collector = response.stream
        body = (
            bytes(collector.data)
            if isinstance(collector, _Collector) and not collector.over
            else response.raw_content
            if not response.stream
            else None
        )
        media_type = response.headers.get("content-type", "")
        if (
            body is None
            or media_type not in MEDIA_TYPES
            or response.headers.get("content-length") != str(len(body))
            or digest_of(digest.split(":", 1)[0], body) != digest
        ):
            return
        headers = kept_headers(response.headers)
        self.cache.put((kind, repository, digest), headers, body, media_type)
        fixed = tuple((n, v) for n, v in headers if n.lower() not in _PER_MANIFEST)
        self.template = (fixed, any(n.lower() == b"etag" for n, _ in headers))

    def error(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.cache_delete:
            rec.cache_delete = False
            self.invalidate()

    def _fill_from_push(self, flow: http.HTTPFlow, generation: tuple[int, bytes | None]) -> None:
        rec, request = record(flow), flow.request
        if self.template is None or request.stream or not rec.repository:
            return
        body = request.raw_content
        media_type = request.headers.get("content-type", "")
        digest = flow.response.headers.get("docker-content-digest", "")  # type: ignore[union-attr]
        if (
            body is None
            or len(body) > MAX_BODY
            or media_type not in MEDIA_TYPES
            or not _DIGEST_RE.fullmatch(digest)
            or digest_of(digest.split(":", 1)[0], body) != digest
            or self.generation() != generation
        ):
            return
        fixed, etag = self.template
        headers: Headers = (
            (b"Content-Type", media_type.encode()),
            (b"Docker-Content-Digest", digest.encode()),
            *((b"Etag", f'"{digest}"'.encode()),) * etag,
            (b"Content-Length", str(len(body)).encode()),
            *fixed,
        )
        self.cache.put(("manifest", rec.repository, digest), headers, body, media_type)

    def state(self) -> dict[str, int]:
        return self.cache.state()
