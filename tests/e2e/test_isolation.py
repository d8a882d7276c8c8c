"""Tenant isolation by digest that does not depend on the backend.

The gateway fronts (`REGISTRY_BACKEND=external`) a registry stand-in that shares blobs across
repositories by digest the way Zot's dedupe cache does with Zot's access control off: any
repository HEADs/GETs/mounts any known blob, and a manifest referencing any known digest is
accepted. Each test checks what the user sees AND, from the stand-in's request log, that a
request which must not reach the backend never did.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.support.images import image_manifest
from tests.support.rawhttp import Conn
from tests.support.stack import Stack, free_port, wait_for
from tests.support.standins.auth import AuthStandin
from tests.support.standins.dedupe_registry import DedupeRegistry, Seen

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCTETS = {"Content-Type": "application/octet-stream"}


# --- helpers ------------------------------------------------------------------------------


def external_stack(data_dir: Path, auth: AuthStandin, backend: DedupeRegistry) -> Stack:
    """A stack whose gateway fronts `backend` (nothing else runs a backend)."""
    stack = Stack(
        data_dir,
        auth.url,
        REGISTRY_BACKEND="external",
        REGISTRY_BACKEND_ADDR=f"127.0.0.1:{backend.port}",
    )
    stack.backend_port, stack.backend_url = backend.port, backend.url  # wait_ready polls it
    return stack


def manifest(config: bytes, layers: list[bytes]) -> bytes:
    return image_manifest((sha256(config), len(config)), [(sha256(x), len(x)) for x in layers])


def put_manifest(base: str, repo: str, ref: str, body: bytes, headers: dict[str, str]):
    return requests.put(
        f"{base}/v2/{repo}/manifests/{ref}",
        data=body,
        headers={**headers, "Content-Type": OCI_MANIFEST},
        timeout=10,
    )


def direct_upload(base: str, repo: str, blob: bytes) -> str:
    """POST + PUT straight to the stand-in (bypassing the gateway)."""
    r = requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=10)
    assert r.status_code == 202, r.text
    digest = sha256(blob)
    r = requests.put(
        base + r.headers["Location"],
        params={"digest": digest},
        data=blob,
        headers=OCTETS,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return digest


def code(r: requests.Response) -> str:
    return r.json()["errors"][0]["code"]


def image() -> tuple[bytes, bytes]:
    """(config, layer): unique random bytes, so no two tests share a digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
    return config.encode(), b"layer " + os.urandom(4096)


def head(stack: Stack, repo: str, digest: str, h: dict[str, str]) -> int:
    return requests.head(f"{stack.url}/v2/{repo}/blobs/{digest}", headers=h, timeout=10).status_code


def since(backend: DedupeRegistry, mark: int) -> list[Seen]:
    return list(backend.requests[mark:])


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dedupe() -> Iterator[DedupeRegistry]:
    standin = DedupeRegistry(free_port()).start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, auth, dedupe) -> Iterator[Stack]:
    s = external_stack(tmp_path_factory.mktemp("iso") / "data", auth, dedupe).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def secret(stack, globex_jwt) -> dict:
    """globex pushes an image into globex/secret through the gateway."""
    g = bearer(token(stack, globex_jwt))
    config, layer = image()
    config_digest = push_blob(stack, "globex/secret", config, g)
    layer_digest = push_blob(stack, "globex/secret", layer, g)
    body = manifest(config, [layer])
    r = put_manifest(stack.url, "globex/secret", "v1", body, g)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(body)
    return {
        "config": config_digest,
        "layer": layer_digest,
        "layer_bytes": layer,
        "manifest": sha256(body),
        "manifest_bytes": body,
    }


# --- tests --------------------------------------------------------------------------------


def test_the_stand_in_really_is_vulnerable(dedupe, secret):
    """Sent directly, the attacks below succeed: a missing gateway check would be caught."""
    base, d = dedupe.url, secret["layer"]
    assert requests.head(f"{base}/v2/acme/x/blobs/{d}", timeout=10).status_code == 200
    r = requests.get(f"{base}/v2/acme/x/blobs/{d}", timeout=10)
    assert r.status_code == 200 and r.content == secret["layer_bytes"]
    r = requests.get(f"{base}/v2/acme/x/blobs/{d}", headers={"Range": "bytes=0-3"}, timeout=10)
    assert r.status_code == 206 and r.content == secret["layer_bytes"][:4]
    r = requests.get(
        f"{base}/v2/acme/x/manifests/{secret['manifest']}",
        headers={"Accept": OCI_MANIFEST},
        timeout=10,
    )
    assert r.status_code == 200 and r.content == secret["manifest_bytes"]
    r = requests.post(
        f"{base}/v2/acme/direct/blobs/uploads/",
        params={"mount": d, "from": "acme/anything"},
        timeout=10,
    )
    assert r.status_code == 201  # `from` ignored: linked from globex/secret
    # A manifest referencing globex's blobs is accepted (by digest, untagged: no backfill food).
    doc = json.loads(secret["manifest_bytes"])
    doc["annotations"] = {"by": "acme"}  # another manifest, same (globex's) references
    body = json.dumps(doc).encode()
    r = put_manifest(base, "acme/direct", sha256(body), body, {})
    assert r.status_code == 201, r.text


def test_another_tenants_digests_are_unknown_and_never_reach_the_backend(
    stack, dedupe, secret, acme_jwt
):
    a = bearer(token(stack, acme_jwt))
    mark = len(dedupe.requests)
    for d in (secret["layer"], secret["config"]):
        url = f"{stack.url}/v2/acme/x/blobs/{d}"
        r = requests.head(url, headers=a, timeout=10)
        assert r.status_code == 404 and r.content == b""
        for extra in ({}, {"Range": "bytes=0-3"}):
            r = requests.get(url, headers={**a, **extra}, timeout=10)
            assert r.status_code == 404, (extra, r.status_code)
            assert code(r) == "BLOB_UNKNOWN"
        r = requests.delete(url, headers=a, timeout=10)
        assert r.status_code == 404 and code(r) == "BLOB_UNKNOWN"

    url = f"{stack.url}/v2/acme/x/manifests/{secret['manifest']}"
    r = requests.get(url, headers={**a, "Accept": OCI_MANIFEST}, timeout=10)
    assert r.status_code == 404 and code(r) == "MANIFEST_UNKNOWN"
    r = requests.head(url, headers={**a, "Accept": OCI_MANIFEST}, timeout=10)
    assert r.status_code == 404 and r.content == b""
    r = requests.delete(url, headers=a, timeout=10)
    assert r.status_code == 404 and code(r) == "MANIFEST_UNKNOWN"

    for source in ("acme/anything", "globex/secret"):
        r = requests.post(
            f"{stack.url}/v2/acme/x/blobs/uploads/",
            params={"mount": secret["layer"], "from": source},
            headers=a,
            timeout=10,
        )
        assert r.status_code == 202, (source, r.status_code, r.text)  # plain upload, not 201
        assert r.headers["Location"].startswith("/v2/acme/x/blobs/uploads/")

    # A manifest referencing globex's layer, alone or next to a config acme does own.
    own_config = push_blob(stack, "acme/x", b'{"acme": "config"}', a)
    for config in (secret["config"], own_config):
        doc = json.loads(secret["manifest_bytes"])
        doc["config"]["digest"] = config
        r = put_manifest(stack.url, "acme/x", "v1", json.dumps(doc).encode(), a)
        assert r.status_code == 400, r.text
        assert code(r) == "MANIFEST_BLOB_UNKNOWN"
        missing = r.json()["errors"][0]["detail"]
        assert secret["layer"] in missing and own_config not in missing

    # The mount attempts linked nothing.
    assert head(stack, "acme/x", secret["layer"], a) == 404

    seen = since(dedupe, mark)
    secrets = (secret["layer"], secret["config"], secret["manifest"])
    # globex's own repository is read by the gateway's walk of the backend (backfill.py), which
    # may still be going on a loaded machine: not acme's doing. Anything else is a leak.
    leaked = [
        s
        for s in seen
        if any(d in s.path or d in str(s.query) for d in secrets)
        and not s.path.startswith("/v2/globex/secret/")
    ]
    assert leaked == []
    mounts = [s for s in seen if s.path.startswith("/v2/acme/") and "mount" in s.query]
    assert mounts == []
    assert not any("from" in s.query for s in seen if s.path.startswith("/v2/acme/"))
    assert not any(s.method == "PUT" and "/manifests/" in s.path for s in seen)
    # The upload starts themselves did reach it, as plain uploads.
    posts = [s for s in seen if s.method == "POST" and s.path == "/v2/acme/x/blobs/uploads/"]
    assert len(posts) == 3  # two degraded mounts + own_config's upload


def test_a_kept_mount_cannot_smuggle_in_another_tenants_digest(stack, dedupe, secret, acme_jwt):
    """`?mount=<own>&from=<own repo>&digest=<theirs>`: Zot (like the stand-in) acts on the mount
    alone and answers 201 with only `Location` (no Docker-Content-Digest). The gateway must not
    then record the unverified `digest` parameter as the tenant's."""
    a = bearer(token(stack, acme_jwt))
    own = push_blob(stack, "acme/smuggle", image()[1], a)
    theirs = secret["layer"]
    r = requests.post(
        f"{stack.url}/v2/acme/smuggle/blobs/uploads/",
        params={"mount": own, "from": "acme/smuggle", "digest": theirs},
        headers={**a, **OCTETS},
        timeout=10,
    )
    assert r.status_code in (201, 202, 400), r.text
    mark = len(dedupe.requests)
    assert head(stack, "acme/smuggle", theirs, a) == 404
    r = requests.get(f"{stack.url}/v2/acme/smuggle/blobs/{theirs}", headers=a, timeout=10)
    assert r.status_code == 404 and r.content != secret["layer_bytes"]
    assert not any(theirs in s.path for s in since(dedupe, mark))


def test_uploading_bytes_the_tenant_lacks_creates_its_record(stack, dedupe, acme_jwt, globex_jwt):
    g, a = bearer(token(stack, globex_jwt)), bearer(token(stack, acme_jwt))
    _, layer = image()
    d = push_blob(stack, "globex/mine", layer, g)
    assert head(stack, "acme/mine", d, a) == 404
    assert push_blob(stack, "acme/mine", layer, a) == d  # 201: acme has the bytes itself
    assert head(stack, "acme/mine", d, a) == 200
    r = requests.get(f"{stack.url}/v2/acme/mine/blobs/{d}", headers=a, timeout=10)
    assert r.status_code == 200 and r.content == layer
    # Claiming a digest without its bytes creates nothing.
    _, other = image()
    gd = push_blob(stack, "globex/mine", other, g)
    r = requests.post(
        f"{stack.url}/v2/acme/mine/blobs/uploads/",
        params={"digest": gd},
        data=b"not the bytes",
        headers={**a, **OCTETS},
        timeout=10,
    )
    assert r.status_code == 400 and code(r) == "DIGEST_INVALID"
    assert head(stack, "acme/mine", gd, a) == 404


def test_a_mount_within_the_tenant_is_kept(stack, dedupe, acme_jwt):
    a = bearer(token(stack, acme_jwt))
    _, layer = image()
    d = push_blob(stack, "acme/a", layer, a)
    mark = len(dedupe.requests)
    r = requests.post(
        f"{stack.url}/v2/acme/b/blobs/uploads/",
        params={"mount": d, "from": "acme/a"},
        headers=a,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"/v2/acme/b/blobs/{d}"
    r = requests.get(f"{stack.url}/v2/acme/b/blobs/{d}", headers=a, timeout=10)
    assert r.status_code == 200 and r.content == layer
    posts = [s for s in since(dedupe, mark) if s.method == "POST"]
    assert [(p.path, p.query) for p in posts] == [
        ("/v2/acme/b/blobs/uploads/", {"mount": [d], "from": ["acme/a"]})
    ]


def test_a_restart_keeps_the_ledger(tmp_path, auth, dedupe, acme_jwt, globex_jwt):
    # Loose blobs, referenced by no tag: the startup backfill cannot rediscover them, so only
    # the persisted ledger can know whose they are.
    s = external_stack(tmp_path / "data", auth, dedupe).start()
    try:
        a, g = bearer(token(s, acme_jwt)), bearer(token(s, globex_jwt))
        mine = push_blob(s, "acme/keep", image()[1], a)
        theirs = push_blob(s, "globex/keep", image()[1], g)
        assert (head(s, "acme/keep", mine, a), head(s, "acme/keep", theirs, a)) == (200, 404)
        assert s.stop() == 0
        assert (tmp_path / "data" / "ledger" / "ledger.db").exists()
        s.start()
        a, g = bearer(token(s, acme_jwt)), bearer(token(s, globex_jwt))  # new process, new key
        assert head(s, "acme/keep", mine, a) == 200
        assert head(s, "acme/keep", theirs, a) == 404
        assert head(s, "globex/keep", theirs, g) == 200
        assert head(s, "globex/keep", mine, g) == 404
    finally:
        s.stop()


def test_backfill_records_images_already_in_the_backend(
    tmp_path, auth, dedupe, secret, acme_jwt, globex_jwt
):
    config, layer = image()
    config_digest = direct_upload(dedupe.url, "acme/legacy", config)
    layer_digest = direct_upload(dedupe.url, "acme/legacy", layer)
    body = manifest(config, [layer])
    r = put_manifest(dedupe.url, "acme/legacy", "old", body, {})
    assert r.status_code == 201, r.text

    s = external_stack(tmp_path / "data", auth, dedupe).start()  # fresh data dir, empty ledger
    try:
        a, g = bearer(token(s, acme_jwt)), bearer(token(s, globex_jwt))
        r = requests.get(
            f"{s.url}/v2/acme/legacy/manifests/old",
            headers={**a, "Accept": OCI_MANIFEST},
            timeout=10,
        )
        assert r.status_code == 200 and r.content == body
        r = requests.get(
            f"{s.url}/v2/acme/legacy/manifests/{sha256(body)}",
            headers={**a, "Accept": OCI_MANIFEST},
            timeout=10,
        )
        assert r.status_code == 200 and r.content == body
        for d, data in ((config_digest, config), (layer_digest, layer)):
            r = requests.get(f"{s.url}/v2/acme/legacy/blobs/{d}", headers=a, timeout=10)
            assert r.status_code == 200 and r.content == data
        # globex's image was backfilled for globex, not for acme, and vice versa.
        for d in (secret["layer"], secret["config"]):
            assert head(s, "acme/legacy", d, a) == 404
            assert head(s, "globex/secret", d, g) == 200
        r = requests.get(
            f"{s.url}/v2/acme/legacy/manifests/{secret['manifest']}", headers=a, timeout=10
        )
        assert r.status_code == 404 and code(r) == "MANIFEST_UNKNOWN"
        assert head(s, "globex/secret", layer_digest, g) == 404
    finally:
        s.stop()


def test_backfill_skips_poisoned_stored_manifests_and_records_the_rest(
    tmp_path, auth, dedupe, acme_jwt
):
    """Stored content is hostile too: a manifest nested 5 000 deep (Go reads it; Python's
    json would raise RecursionError), and an index of itself, sorted before everyone else's
    repositories, must neither abort nor stall the walk."""
    config, layer = image()
    direct_upload(dedupe.url, "acme/after-poison", config)
    direct_upload(dedupe.url, "acme/after-poison", layer)
    body = manifest(config, [layer])
    assert put_manifest(dedupe.url, "acme/after-poison", "v1", body, {}).status_code == 201
    deep = b'{"schemaVersion": 2, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    dedupe.store("aaa/poison", "deep", OCI_MANIFEST, deep)
    dedupe.store("aaa/poison", "dup", OCI_MANIFEST, b'{"layers": [], "Layers": []}')

    started = time.monotonic()
    s = external_stack(tmp_path / "data", auth, dedupe).start()
    try:
        a = bearer(token(s, acme_jwt))
        r = requests.get(
            f"{s.url}/v2/acme/after-poison/manifests/{sha256(body)}",
            headers={**a, "Accept": OCI_MANIFEST},
            timeout=30,
        )
        assert r.status_code == 200 and r.content == body
        assert time.monotonic() - started < 20  # not the 60 s backfill wait
        # Worker 0's walk logs the skip in its own time: the request above may have been
        # answered by another worker (or by its own walk of that one repository) first.
        wait_for(lambda: "skipping a manifest of aaa/poison" in s.log.read_text(), 10)
        log = s.log.read_text()
        assert "Addon error" not in log and "Traceback" not in log
    finally:
        s.stop()


def raw_upload_start(stack: Stack, raw_target: str, tok: str) -> tuple[int, str]:
    """POST with the target exactly as given (curl and requests would drop a fragment)."""
    conn = Conn(stack.port)
    try:
        conn.send(
            f"POST {raw_target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        answer = conn.read_answer("POST")
    finally:
        conn.close()
    assert answer is not None
    return answer.status, answer.body.decode()


@pytest.mark.parametrize(
    "query",
    [
        "digest={G}#&mount={G}&from=globex/secret",  # the reproduced attack
        "#&mount={G}&from=globex/secret",  # the 201-vs-202 existence oracle
        "digest={G};mount={G};from=globex/secret",
        "mount={G}&from=globex/secret&from=acme/x",
        "mount={G}&from=acme%2Fx",  # an own `from` does not make globex's digest acme's
        "%6Dount={G}&fr%6Fm=globex%2Fsecret",
    ],
)
def test_no_query_trick_mounts_or_reveals_another_tenants_blob(
    stack, dedupe, secret, acme_jwt, query
):
    tok = token(stack, acme_jwt)
    g = secret["layer"]
    mark = len(dedupe.requests)
    status, body = raw_upload_start(
        stack, "/v2/acme/steal/blobs/uploads/?" + query.format(G=g), tok
    )
    # Refused as ambiguous (400), or a plain upload start (202) whatever globex holds: the
    # same answer as for a digest nobody has, so no existence oracle either.
    assert status in (400, 202), (status, body)
    for seen in since(dedupe, mark):
        assert "mount" not in seen.query and "globex" not in str(seen.query), seen
    assert head(stack, "acme/steal", g, bearer(tok)) == 404
    r = requests.get(f"{stack.url}/v2/acme/steal/blobs/{g}", headers=bearer(tok), timeout=10)
    assert r.status_code == 404 and secret["layer_bytes"] not in r.content


def test_concurrent_pushes_keep_each_tenants_ledger_exact(stack, acme_jwt, globex_jwt):
    headers = {
        "acme": bearer(token(stack, acme_jwt)),
        "globex": bearer(token(stack, globex_jwt)),
    }
    pushed: dict[str, list[tuple[str, str]]] = {"acme": [], "globex": []}  # (kind, digest)
    lock = threading.Lock()
    start = threading.Barrier(8)

    def work(i: int) -> None:
        tenant = ("acme", "globex")[i % 2]
        h, repo = headers[tenant], f"{tenant}/conc-{i}"
        config, layer = image()
        start.wait(30)
        digests = [push_blob(stack, repo, blob, h) for blob in (config, layer, os.urandom(999))]
        r = put_manifest(stack.url, repo, "v1", manifest(config, [layer]), h)
        assert r.status_code == 201, r.text
        with lock:
            pushed[tenant] += [("blobs", d) for d in digests]
            pushed[tenant].append(("manifests", r.headers["Docker-Content-Digest"]))

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(work, i) for i in range(8)]:
            f.result()

    assert len(pushed["acme"]) == len(pushed["globex"]) == 16
    for tenant, other in (("acme", "globex"), ("globex", "acme")):
        h, repo = headers[tenant], f"{tenant}/check"
        for want, digests in ((200, pushed[tenant]), (404, pushed[other])):
            for kind, d in digests:
                r = requests.head(f"{stack.url}/v2/{repo}/{kind}/{d}", headers=h, timeout=10)
                assert r.status_code == want, (tenant, kind, d)
