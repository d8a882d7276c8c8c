"""A ledger that lost records, on a running stack: what a client and an operator see.

The isolation ledger (SQLite under `$REGISTRY_DATA_DIR/ledger/`) is deleted, made read-only or
lost after a restart while the registry runs. Rule: a ledger that lost records answers 503
(UNAVAILABLE, "the registry's ledger is being rebuilt") for anything it does not hold until it
is whole again, rebuilt from the backend by itself; never a 4xx that blames the client, never
a grant of another tenant's content; `/healthz` is 503 and names the ledger meanwhile.

The backend is the Zot-like stand-in (it serves any digest from any repository, as Zot's dedupe
does), so a request the gateway would let through for another tenant would succeed: the
stand-in's request log shows it never got there. Its catalog can be made to fail
(`catalog_fails`): the rebuild cannot finish while it does, which holds the "lost" state long
enough to look at it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.e2e.test_gateway import bearer, push_blob, sha256, token
from tests.e2e.test_isolation import (
    OCI_MANIFEST,
    code,
    external_stack,
    head,
    image,
    manifest,
    put_manifest,
)
from tests.support.stack import Stack, wait_for
from tests.support.standins.dedupe_registry import DedupeRegistry

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="chattr needs root"),
]


def admin(stack: Stack) -> str:
    return f"http://{stack.env['REGISTRY_ADMIN_ADDR']}"


def health(stack: Stack) -> tuple[int, dict]:
    r = requests.get(f"{admin(stack)}/healthz", timeout=10)
    return r.status_code, r.json()


def ledger_file(stack: Stack) -> Path:
    return stack.data_dir / "ledger" / "ledger.db"


def unavailable(r: requests.Response) -> bool:
    """503 UNAVAILABLE saying the ledger is being rebuilt (HEAD answers carry no body)."""
    if r.status_code != 503:
        return False
    return r.request.method == "HEAD" or (
        code(r) == "UNAVAILABLE" and "ledger is being rebuilt" in r.text
    )


@pytest.fixture
def dedupe() -> Iterator[DedupeRegistry]:
    standin = DedupeRegistry().start()
    yield standin
    standin.catalog_fails = False
    standin.stop()


@pytest.fixture
def stack(tmp_path: Path, auth, dedupe) -> Iterator[Stack]:
    s = external_stack(tmp_path / "data", auth, dedupe).start()
    wait_for(lambda: health(s)[1].get("ledger") == "ok", 30)
    yield s
    s.stop()


def push_image(stack: Stack, repo: str, h: dict[str, str]) -> dict:
    config, layer = image()
    push_blob(stack, repo, config, h)
    push_blob(stack, repo, layer, h)
    body = manifest(config, [layer])
    r = put_manifest(stack.url, repo, "v1", body, h)
    assert r.status_code == 201, r.text
    return {"config": config, "layer": layer, "body": body, "digest": sha256(body)}


def another_manifest(img: dict) -> bytes:
    """A new manifest (another digest) referencing the same config and layer."""
    body = manifest(img["config"], [img["layer"]])
    return body[:-1] + b', "annotations": {"n": "' + os.urandom(4).hex().encode() + b'"}}'


def pull(stack: Stack, repo: str, img: dict, h: dict[str, str]) -> None:
    r = requests.get(
        f"{stack.url}/v2/{repo}/manifests/{img['digest']}",
        headers={**h, "Accept": OCI_MANIFEST},
        timeout=10,
    )
    assert r.status_code == 200 and r.content == img["body"], r.text
    for blob in (img["config"], img["layer"]):
        r = requests.get(f"{stack.url}/v2/{repo}/blobs/{sha256(blob)}", headers=h, timeout=10)
        assert r.status_code == 200 and r.content == blob


def wait_rebuilding(stack: Stack, why: str) -> dict:
    """/healthz says 503 and names the ledger (and why) once a worker noticed."""
    found: dict = {}

    def rebuilding() -> bool:
        status, body = health(stack)
        found.update(body)
        return status == 503 and body.get("ledger") == "rebuilding"

    wait_for(rebuilding, 15)
    assert found["status"] == "down" and why in found.get("ledger_reason", ""), found
    return found


def wait_whole(stack: Stack) -> float:
    """Until /healthz is 200 with the ledger ok; how long that took."""
    started = time.monotonic()

    def whole() -> bool:
        status, body = health(stack)
        return status == 200 and body.get("ledger") == "ok"

    wait_for(whole, 30)
    return time.monotonic() - started


# --- (a) the ledger file deleted while the registry runs ---------------------------------------


def test_a_deleted_ledger_answers_503_until_rebuilt_and_never_grants_another_tenant(
    stack, dedupe, acme_jwt, globex_jwt
):
    a, g = bearer(token(stack, acme_jwt)), bearer(token(stack, globex_jwt))
    mine = push_image(stack, "acme/app", a)
    push_image(stack, "globex/own", g)
    layer = sha256(mine["layer"])
    assert head(stack, "globex/own", layer, g) == 404

    dedupe.catalog_fails = True  # the rebuild cannot finish yet
    ledger_file(stack).unlink()
    wait_rebuilding(stack, "replaced")
    mark = len(dedupe.requests)
    # Another tenant: neither a grant nor a 404 the ledger cannot vouch for. Ever a 503.
    for _ in range(4):
        r = requests.head(f"{stack.url}/v2/globex/own/blobs/{layer}", headers=g, timeout=30)
        assert unavailable(r), r.status_code
        r = requests.get(
            f"{stack.url}/v2/globex/own/manifests/{mine['digest']}", headers=g, timeout=30
        )
        assert unavailable(r), (r.status_code, r.text)
    # The owner, in a new repository, referencing what it pushed before: never a 4xx. The
    # workers put back what they still knew (they confirmed these pushes): 201, or 503.
    body = another_manifest(mine)
    r = put_manifest(stack.url, "acme/copy", "v1", body, a)
    assert r.status_code == 201 or unavailable(r), (r.status_code, r.text)
    r = requests.get(f"{stack.url}/v2/_catalog", headers=a, timeout=30)
    assert unavailable(r), (r.status_code, r.text)  # a catalog missing names is no answer
    asked = {s.path for s in dedupe.requests[mark:]}  # the walks' requests aside
    assert f"/v2/globex/own/blobs/{layer}" not in asked
    assert f"/v2/globex/own/manifests/{mine['digest']}" not in asked

    dedupe.catalog_fails = False  # the backend answers: the rebuild runs by itself
    print(f"deleted ledger: whole again {wait_whole(stack):.1f} s after the backend answered")
    a, g = bearer(token(stack, acme_jwt)), bearer(token(stack, globex_jwt))
    pull(stack, "acme/app", mine, a)
    r = put_manifest(stack.url, "acme/copy", "v1", body, a)
    assert r.status_code == 201, r.text
    assert head(stack, "globex/own", layer, g) == 404
    r = requests.get(f"{stack.url}/v2/globex/own/manifests/{mine['digest']}", headers=g, timeout=10)
    assert r.status_code == 404 and code(r) == "MANIFEST_UNKNOWN"
    r = requests.get(f"{stack.url}/v2/_catalog", headers=a, timeout=10)
    assert r.status_code == 200 and r.json()["repositories"] == ["acme/app", "acme/copy"]


# --- (c) the gateway restarted, then the ledger deleted -----------------------------------------


def test_after_a_restart_a_lost_ledger_is_503_for_the_owners_manifest_until_rebuilt(
    stack, dedupe, acme_jwt
):
    a = bearer(token(stack, acme_jwt))
    base = push_image(stack, "acme/base", a)
    stack.supervisorctl("restart", "gateway:*")  # new processes: nothing known in memory
    # The new worker 0 has done its start-up walk (the first one's line, then its own).
    wait_for(lambda: stack.log.read_text().count("ledger backfill") >= 2, 30)
    wait_for(lambda: health(stack)[1].get("ledger") == "ok", 30)

    dedupe.catalog_fails = True
    ledger_file(stack).unlink()
    wait_rebuilding(stack, "replaced")
    a = bearer(token(stack, acme_jwt))
    body = another_manifest(base)
    for _ in range(3):
        r = put_manifest(stack.url, "acme/app", "v2", body, a)
        assert unavailable(r), (r.status_code, r.text)  # never MANIFEST_BLOB_UNKNOWN

    dedupe.catalog_fails = False
    wait_whole(stack)
    r = put_manifest(stack.url, "acme/app", "v2", body, a)
    assert r.status_code == 201, r.text
    pull(stack, "acme/base", base, a)


def test_a_push_right_after_a_restart_and_a_deletion_is_never_blamed_on_the_client(stack, acme_jwt):
    """As `docker push` of a new tag sharing a layer pushed before the restart: the new
    config blob's record is the write that finds the ledger gone (its file is recreated with
    what this process knows: almost nothing), then the manifest referencing the earlier
    layer. Before, that manifest got the gateway's own 400 MANIFEST_BLOB_UNKNOWN."""
    a = bearer(token(stack, acme_jwt))
    base = push_image(stack, "acme/app", a)
    stack.supervisorctl("restart", "gateway:*")
    wait_for(lambda: stack.log.read_text().count("ledger backfill") >= 2, 30)
    ledger_file(stack).unlink()
    a = bearer(token(stack, acme_jwt))
    for i in range(4):
        config, _ = image()
        push_blob(stack, "acme/app", config, a)
        r = put_manifest(stack.url, "acme/app", f"v2-{i}", manifest(config, [base["layer"]]), a)
        assert r.status_code == 201 or unavailable(r), (i, r.status_code, r.text)
    wait_whole(stack)
    r = put_manifest(stack.url, "acme/app", "v3", another_manifest(base), a)
    assert r.status_code == 201, r.text


# --- (b) the ledger made read-only ---------------------------------------------------------------


def test_a_read_only_ledger_is_reported_without_any_push_and_refuses_writes_with_503(
    stack, acme_jwt
):
    """Root ignores file modes: `chattr +i` makes the file immutable, for root too (SQLite's
    write fails with EPERM)."""
    a = bearer(token(stack, acme_jwt))
    kept = push_blob(stack, "acme/ro", os.urandom(1000), a)
    path = ledger_file(stack)
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        # Nobody pushes: the health check's own write finds it.
        found: dict = {}

        def down() -> bool:
            status, body = health(stack)
            found.update(body)
            return status == 503 and body.get("ledger") == "down"

        wait_for(down, 15)
        assert "read-only" in found.get("ledger_reason", ""), found
        blob = os.urandom(1000)
        r = requests.post(f"{stack.url}/v2/acme/ro/blobs/uploads/", headers=a, timeout=10)
        assert r.status_code == 202
        r = requests.put(
            stack.url + r.headers["Location"],
            params={"digest": sha256(blob)},
            data=blob,
            headers={**a, "Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert r.status_code == 503 and code(r) == "UNAVAILABLE", r.text
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    wait_for(lambda: health(stack)[1].get("ledger") == "ok", 20)
    assert head(stack, "acme/ro", kept, a) == 200
