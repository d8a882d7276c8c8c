"""The content cache (gateway/contentcache.py): its bound, its lifetime, what it will hold and
serve, and its invalidation. End to end with real clients: tests/e2e/test_cache.py."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons.decisions.metrics import Metrics
from addons.gateway import require_signature
from addons.gateway.capture import Capture
from addons.gateway.contentcache import OVERHEAD, Cache, ContentCache, accepts, cacheable
from addons.gateway.gate import answered
from addons.gateway.publish import Publisher
from addons.gateway.record import record

OCI = "application/vnd.oci.image.manifest.v1+json"
BODY = json.dumps({"schemaVersion": 2, "mediaType": OCI}).encode()
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()
OTHER = "sha256:" + "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def put(cache: Cache, name: str, body: bytes = b"") -> bool:
    return cache.put(("manifest", "acme/app", name), ((b"a", b"b"),), body, OCI)


def test_bound_by_bytes_least_recently_used_first_out():
    cache = Cache(max_bytes=3 * (OVERHEAD + 2 + 1000), max_entries=100)
    for name in "abc":
        assert put(cache, name, b"x" * 1000)
    assert cache.get(("manifest", "acme/app", "a")) is not None  # a is now the most recent
    put(cache, "d", b"x" * 1000)
    assert [k[2] for k in cache.entries] == ["c", "a", "d"]
    assert cache.bytes <= cache.max_bytes and cache.evictions == 1
    assert not put(cache, "huge", b"x" * cache.max_bytes)  # larger than the whole bound
    assert len(cache.entries) == 3


def test_bound_by_entries_under_a_flood():
    cache = Cache(max_bytes=1 << 30, max_entries=50)
    for i in range(10_000):
        put(cache, f"{i}")
    assert len(cache.entries) == 50 and cache.evictions == 10_000 - 50
    assert cache.bytes == sum(e.size for e in cache.entries.values())


def test_entries_live_ttl_seconds():
    clock = Clock()
    cache = Cache(ttl=10.0, clock=clock)
    put(cache, "a")
    clock.now += 9.9
    assert cache.get(("manifest", "acme/app", "a")) is not None
    clock.now += 0.1
    assert cache.get(("manifest", "acme/app", "a")) is None
    assert cache.bytes == 0 and not cache.entries


def test_keys_name_the_repository():
    cache = Cache()
    put(cache, DIGEST)
    assert cache.get(("manifest", "acme/other", DIGEST)) is None
    assert cache.get(("blob", "acme/app", DIGEST)) is None


def test_accept_must_list_the_media_type():
    assert accepts([f"application/json, {OCI}; q=0.5"], OCI)
    assert accepts(["text/plain", OCI.upper()], OCI)
    assert not accepts(["*/*"], OCI)
    assert not accepts([], OCI)
    assert not accepts(["application/vnd.oci.image.manifest.v1+json-not"], OCI)


def test_only_digest_reads_are_cacheable():
    assert cacheable("manifest", "GET", DIGEST, {}) == "manifest"
    assert cacheable("manifest", "HEAD", DIGEST, {}) == "manifest"
    assert cacheable("blob", "HEAD", DIGEST, {}) == "blob"
    assert cacheable("manifest", "GET", "latest", {}) is None  # a tag asks the backend
    assert cacheable("blob", "GET", DIGEST, {}) is None  # blob bodies are not kept
    assert cacheable("manifest", "GET", DIGEST, {"x": "1"}) is None
    assert cacheable("manifest", "PUT", DIGEST, {}) is None


def test_generation_token_changes_on_every_bump(tmp_path: Path):
    assert require_signature.read_generation("") is None
    assert require_signature.read_generation(tmp_path) is None
    seen = set()
    for _ in range(50):  # many rewrites within one mtime tick, inodes reused: still distinct
        require_signature.bump_generation(tmp_path)
        seen.add(require_signature.read_generation(tmp_path))
    assert len(seen) == 50


# --- the addon ----------------------------------------------------------------------------------


@pytest.fixture
def addon(tmp_path: Path) -> Iterator[ContentCache]:
    cache = ContentCache()
    with taddons.context(Publisher(Metrics(), Capture()), cache) as tctx:
        tctx.options.registry_state_dir = str(tmp_path)
        yield cache


def flow(method: str, route: str, reference: str, repo: str = "acme/app") -> http.HTTPFlow:
    path = f"/v2/{repo}/{route}s/{reference}"
    req = tutils.treq(
        method=method.encode(),
        path=path.encode(),
        headers=http.Headers([(b"accept", OCI.encode())]),
        content=b"",
    )
    f = tflow.tflow(req=req)
    rec = record(f)
    rec.kind, rec.decision, rec.route = "registry", "allow", route
    rec.repository, rec.reference = repo, reference
    return f


def backend(f: http.HTTPFlow, body: bytes, digest: str = DIGEST, **headers: str) -> None:
    f.response = http.Response.make(
        200,
        body,
        {"Content-Type": OCI, "Docker-Content-Digest": digest, **headers},
    )


def through(addon: ContentCache, f: http.HTTPFlow, body: bytes, digest: str = DIGEST) -> None:
    """requestheaders, the backend's (buffered) answer, response."""
    addon.requestheaders(f)
    if answered(f):
        return
    backend(f, body, digest)
    addon.responseheaders(f)
    f.response.stream = False  # type: ignore[union-attr]
    addon.response(f)


def test_a_verified_manifest_is_served_then_forgotten_on_delete(addon, tmp_path):
    through(addon, flow("GET", "manifest", DIGEST), BODY)
    f = flow("HEAD", "manifest", DIGEST)
    addon.requestheaders(f)
    assert answered(f) and record(f).cached
    other = ContentCache()  # another worker: same state directory
    other.cache.put(("manifest", "acme/app", DIGEST), (), BODY, OCI)
    other._token = require_signature.read_generation(tmp_path)
    d = flow("DELETE", "manifest", DIGEST)
    addon.requestheaders(d)
    d.response = http.Response.make(202)
    # Forgotten as soon as the backend's answer begins: a client has the 202 with its head.
    addon.responseheaders(d)
    assert not addon.cache.entries
    g = flow("GET", "manifest", DIGEST)
    other.requestheaders(g)  # the other worker reads the new token before its lookup
    assert not answered(g) and not other.cache.entries


def test_a_failed_delete_still_invalidates(addon):
    through(addon, flow("GET", "manifest", DIGEST), BODY)
    d = flow("DELETE", "blob", OTHER)
    addon.requestheaders(d)
    d.error = tflow.terr()
    addon.error(d)
    assert not addon.cache.entries


def test_a_body_that_is_not_the_digest_is_not_kept(addon):
    through(addon, flow("GET", "manifest", OTHER), BODY, digest=OTHER)
    f = flow("GET", "manifest", DIGEST)
    through(addon, f, BODY + b" ")  # the backend names the digest, the bytes are others
    assert not addon.cache.entries


def test_an_answer_naming_another_digest_is_not_kept(addon):
    through(addon, flow("GET", "manifest", DIGEST), BODY, digest=OTHER)
    assert not addon.cache.entries


def test_a_fill_racing_a_delete_is_dropped(addon, tmp_path):
    f = flow("GET", "manifest", DIGEST)
    addon.requestheaders(f)
    backend(f, BODY)
    require_signature.bump_generation(tmp_path)  # another worker deleted while the backend answered
    addon.responseheaders(f)
    f.response.stream = False  # type: ignore[union-attr]
    addon.response(f)
    assert not addon.cache.entries


def test_refused_or_undecided_requests_are_never_looked_up(addon):
    through(addon, flow("GET", "manifest", DIGEST), BODY)
    f = flow("GET", "manifest", DIGEST)
    record(f).decision = "deny:policy"
    addon.requestheaders(f)
    assert not answered(f)


def test_a_client_that_does_not_accept_the_type_asks_the_backend(addon):
    through(addon, flow("GET", "manifest", DIGEST), BODY)
    f = flow("GET", "manifest", DIGEST)
    f.request.headers["accept"] = "application/vnd.docker.distribution.manifest.v2+json"
    addon.requestheaders(f)
    assert not answered(f)
    r = flow("GET", "manifest", DIGEST)
    r.request.headers["range"] = "bytes=0-1"
    addon.requestheaders(r)
    assert not answered(r)
