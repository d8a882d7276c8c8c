"""The content cache (addons/gateway/contentcache.py) end to end: manifests and blob HEADs by digest
answered from the workers' memory, never across tenants or repositories, never past a delete
or a GC, bounded under a flood of distinct digests.

Two gateway workers: a client cannot choose the worker, so every check that matters is made
over many fresh connections (each may land on either worker).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import skopeo, skopeo_copy
from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.support.images import image_manifest
from tests.support.rawhttp import Conn
from tests.support.stack import CLI, Stack
from tests.support.standins.auth import AuthStandin

pytestmark = pytest.mark.e2e
OCI = "application/vnd.oci.image.manifest.v1+json"
TRIES = 16  # fresh connections per check: each lands on either worker
POLICY = """
[[retention]]
repositories = ["acme/cachegc/**"]
untagged_after = "1s"
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, auth: AuthStandin) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("cache") / "data"
    data.mkdir()
    (data / "policy.toml").write_text(POLICY)
    s = Stack(data, auth.url, REGISTRY_WORKERS="2").start()
    yield s
    s.stop()


def admin(stack: Stack) -> str:
    return "http://" + stack.env["REGISTRY_ADMIN_ADDR"]


def metric(stack: Stack, name: str) -> float:
    """A metric of /metrics as the workers last published it (once a second)."""
    text = requests.get(f"{admin(stack)}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def push_image(stack: Stack, h: dict[str, str], repo: str, ref: str, note: str = "") -> tuple:
    """A small image (config, one layer) pushed by `ref`; (digest, manifest bytes, layer)."""
    config = json.dumps({"note": note or repo}).encode()
    layer = f"layer of {repo} {note}".encode()
    for blob in (config, layer):
        push_blob(stack, repo, blob, h)
    body = json.loads(image_manifest((sha256(config), len(config)), [(sha256(layer), len(layer))]))
    if note:
        body["annotations"] = {"note": note}
    raw = json.dumps(body).encode()
    r = requests.put(
        f"{stack.url}/v2/{repo}/manifests/{ref}",
        data=raw,
        headers={**h, "Content-Type": OCI},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return sha256(raw), raw, sha256(layer)


def fresh(method: str, url: str, h: dict[str, str]) -> requests.Response:
    """One request on its own connection (either worker may take it)."""
    with requests.Session() as s:
        return s.request(method, url, headers={**h, "Connection": "close"}, timeout=10)


def test_answers_are_the_backends_and_head_has_no_body(stack, acme_jwt):
    h = {**bearer(token(stack, acme_jwt)), "Accept": OCI}
    repo = "acme/cache/exact"
    digest, raw, layer = push_image(stack, h, repo, "v1")
    direct = stack.backend_get(f"/v2/{repo}/manifests/{digest}", headers={"Accept": OCI})
    hits = metric(stack, 'tabbify_cache_lookups_total{result="hit"}')
    for _ in range(TRIES):
        r = fresh("GET", f"{stack.url}/v2/{repo}/manifests/{digest}", h)
        assert r.status_code == 200 and r.content == raw
        for name in ("Content-Type", "Docker-Content-Digest", "Content-Length", "Etag"):
            assert r.headers.get(name) == direct.headers.get(name), name
    time.sleep(1.5)  # the workers publish once a second
    assert metric(stack, 'tabbify_cache_lookups_total{result="hit"}') >= hits + TRIES - 2
    lines = [x for x in stack.access_log() if x.get("reference") == digest]
    assert sum(x.get("cache") == "hit" for x in lines) >= TRIES - 2
    # HEADs (manifest and blob) carry no body: the next answer on the same connection parses.
    c = Conn(stack.port)
    auth = f"Authorization: {h['Authorization']}\r\nAccept: {OCI}\r\n"
    for path in (f"/v2/{repo}/manifests/{digest}", f"/v2/{repo}/blobs/{layer}") * 3:
        c.send(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        a = c.read_answer("HEAD")
        assert a is not None and a.status == 200
        assert a.header("docker-content-digest") == (digest if "manifests" in path else layer)
        if "manifests" in path:
            assert a.header("content-length") == str(len(raw))
            assert a.header("content-type") == OCI
    c.send(f"GET /v2/{repo}/manifests/{digest} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
    a = c.read_answer()
    assert a is not None and a.status == 200 and a.body == raw  # no stray HEAD body before
    c.close()
    # A client that does not accept the type gets what the backend says (Distribution: 404).
    r = fresh("GET", f"{stack.url}/v2/{repo}/manifests/{digest}", {**h, "Accept": "text/plain"})
    assert r.status_code == direct_status(stack, repo, digest, "text/plain")


def direct_status(stack: Stack, repo: str, digest: str, accept: str) -> int:
    return stack.backend_get(
        f"/v2/{repo}/manifests/{digest}", headers={"Accept": accept}
    ).status_code


def test_never_across_repositories_nor_tenants(stack, acme_jwt, globex_jwt, tmp_path):
    h = {**bearer(token(stack, acme_jwt)), "Accept": OCI}
    digest, _, layer = push_image(stack, h, "acme/cache/x", "v1")
    # A real client's pull by digest fills a worker's cache.
    r = skopeo_copy(f"docker://{stack.host}/acme/cache/x@{digest}", f"oci:{tmp_path}:x", acme_jwt)
    assert r.returncode == 0, r.stderr
    for _ in range(TRIES):  # fill both workers
        assert fresh("GET", f"{stack.url}/v2/acme/cache/x/manifests/{digest}", h).status_code == 200
        assert fresh("HEAD", f"{stack.url}/v2/acme/cache/x/blobs/{layer}", h).status_code == 200
    # Same tenant, another repository: the backend does not know the digest there.
    for method, path in (("GET", "manifests/" + digest), ("HEAD", "blobs/" + layer)):
        assert stack.backend_get(f"/v2/acme/cache/y/{path}", method=method).status_code == 404
        for _ in range(TRIES):
            assert fresh(method, f"{stack.url}/v2/acme/cache/y/{path}", h).status_code == 404
    # Another tenant: not its repository (403), nor a digest it may read in its own (404).
    g = {**bearer(token(stack, globex_jwt)), "Accept": OCI}
    for _ in range(TRIES):
        assert fresh("GET", f"{stack.url}/v2/acme/cache/x/manifests/{digest}", g).status_code == 403
        assert fresh("HEAD", f"{stack.url}/v2/acme/cache/x/blobs/{layer}", g).status_code == 403
        assert fresh("GET", f"{stack.url}/v2/globex/x/manifests/{digest}", g).status_code == 404
        assert fresh("HEAD", f"{stack.url}/v2/globex/x/blobs/{layer}", g).status_code == 404
    r = skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        f"x:{globex_jwt}",
        f"docker://{stack.host}/globex/x@{digest}",
    )
    assert r.returncode != 0 and "manifest unknown" in r.stderr.lower(), r.stderr


def test_a_delete_through_either_worker_is_seen_at_once(stack, acme_jwt):
    h = {**bearer(token(stack, acme_jwt)), "Accept": OCI}
    repo = "acme/cache/del"
    digest, _, layer = push_image(stack, h, repo, "v1")
    manifest_url, blob_url = (
        f"{stack.url}/v2/{repo}/manifests/{digest}",
        f"{stack.url}/v2/{repo}/blobs/{layer}",
    )
    for _ in range(TRIES):
        assert fresh("GET", manifest_url, h).status_code == 200
        assert fresh("HEAD", blob_url, h).status_code == 200
    assert fresh("DELETE", manifest_url, h).status_code == 202
    assert [fresh("GET", manifest_url, h).status_code for _ in range(TRIES)] == [404] * TRIES
    assert [fresh("HEAD", manifest_url, h).status_code for _ in range(TRIES)] == [404] * TRIES
    for _ in range(TRIES):  # refill the blob HEADs after the manifest delete emptied the caches
        assert fresh("HEAD", blob_url, h).status_code == 200
    assert fresh("DELETE", blob_url, h).status_code == 202
    assert [fresh("HEAD", blob_url, h).status_code for _ in range(TRIES)] == [404] * TRIES


def test_gc_empties_the_caches(stack, acme_jwt, tmp_path):
    h = {**bearer(token(stack, acme_jwt)), "Accept": OCI}
    repo = "acme/cachegc/app"
    old, _, _ = push_image(stack, h, repo, "v1", note="old")
    push_image(stack, h, repo, "v1", note="new")  # the old one is untagged now
    time.sleep(1.5)  # untagged_after = 1s
    url = f"{stack.url}/v2/{repo}/manifests/{old}"
    for _ in range(TRIES):
        assert fresh("GET", url, h).status_code == 200
    out = subprocess.run([CLI, "gc"], env=stack.env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {"repository": repo, "digest": old} in report["deleted_manifests"]
    assert [fresh("GET", url, h).status_code for _ in range(TRIES)] == [404] * TRIES


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, auth: AuthStandin) -> Iterator[Stack]:
    """One worker whose cache holds 1 MiB."""
    data = tmp_path_factory.mktemp("cache-small") / "data"
    s = Stack(data, auth.url, REGISTRY_WORKERS="1", REGISTRY_CACHE_MB="1").start()
    yield s
    s.stop()


def test_a_flood_of_distinct_digests_stays_within_the_bound(small, acme_jwt):
    h = {**bearer(token(small, acme_jwt)), "Accept": OCI}
    repo = "acme/cache/flood"
    pad = "x" * 100_000  # ~100 KiB manifests: 1 MiB holds about ten
    pushed = [push_image(small, h, repo, f"t{i}", note=f"{i}{pad}") for i in range(24)]
    for digest, raw, _ in pushed * 2:
        r = requests.get(f"{small.url}/v2/{repo}/manifests/{digest}", headers=h, timeout=10)
        assert r.status_code == 200 and r.content == raw
    time.sleep(1.5)
    held = metric(small, "tabbify_cache_bytes")
    assert 0 < held <= 1024 * 1024
    assert metric(small, "tabbify_cache_entries") <= 10
    assert metric(small, "tabbify_cache_evictions_total") >= 14
    rss = metric(small, 'tabbify_gateway_worker_rss_bytes{worker="0"}')
    assert rss < 150 * 1024 * 1024


def test_a_pushed_manifest_is_answered_from_memory_as_the_backend_answers(small, acme_jwt):
    """Filled by the push itself: the first read is a hit, with the backend's headers."""
    h = {**bearer(token(small, acme_jwt)), "Accept": OCI}
    repo = "acme/cache/pushed"
    first, _, _ = push_image(small, h, repo, "a", note="a")
    requests.get(f"{small.url}/v2/{repo}/manifests/{first}", headers=h, timeout=10)  # learns
    time.sleep(1.5)
    misses = metric(small, 'tabbify_cache_lookups_total{result="miss"}')
    digest, raw, _ = push_image(small, h, repo, "b", note="b")
    r = requests.get(f"{small.url}/v2/{repo}/manifests/{digest}", headers=h, timeout=10)
    direct = small.backend_get(f"/v2/{repo}/manifests/{digest}", headers={"Accept": OCI})
    assert r.status_code == 200 and r.content == raw == direct.content

    def comparable(headers) -> dict[str, str]:
        return {k.lower(): v for k, v in headers.items() if k.lower() not in ("date", "connection")}

    assert comparable(r.headers) == comparable(direct.headers)
    time.sleep(1.5)
    assert metric(small, 'tabbify_cache_lookups_total{result="miss"}') == misses
