"""Two nodes on one bucket with the isolation ledger in PostgreSQL (REGISTRY_LEDGER_URL=
postgresql://…) instead of the bucket: the same promises as tests/test_e2e_nodes.py, on a
real PostgreSQL server; node A gets the password from PGPASSWORD, node B in the URL (and
it is on no command line)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import skopeo_copy
from tests.images import image_manifest, layout_blobs, oci_layout
from tests.postgres import PASSWORD, Postgres
from tests.rawhttp import Conn
from tests.stack import Stack, wait_for
from tests.standins.auth import tabbify_jwt
from tests.standins.seaweed import SeaweedS3
from tests.test_e2e_gateway import bearer, push_blob, sha256, token
from tests.test_e2e_nodes import BUCKET, node_env

pytestmark = pytest.mark.e2e
POLICY = """
[[quota]]
tenants = ["initech"]
bytes = "100kB"

[[immutable]]
repositories = ["acme/releases/**"]
tags = ["v*"]
"""
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed-nodes-pg")).start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, s3: SeaweedS3, postgres: Postgres, auth
) -> Iterator[tuple[Stack, Stack]]:
    root = tmp_path_factory.mktemp("nodes-pg")
    shared = root / "shared"
    shared.mkdir()
    (shared / "http-secret").write_text(os.urandom(24).hex() + "\n")
    (shared / "token-keys").write_text(os.urandom(24).hex() + "\n")
    (shared / "token-keys").chmod(0o600)
    (shared / "policy.toml").write_text(POLICY)
    ledger = postgres.database()
    a, b = Stack(root / "a", auth.url), Stack(root / "b", auth.url)
    members = f"127.0.0.1:{a.backend_port},127.0.0.1:{b.backend_port}"
    for stack in (a, b):
        stack.env.update(node_env(s3, shared, members))
    # The two ways to give the password: libpq's variable (A), or in the URL (B).
    a.env.update(REGISTRY_LEDGER_URL=ledger, PGPASSWORD=PASSWORD)
    b.env["REGISTRY_LEDGER_URL"] = ledger.replace("registry@", f"registry:{PASSWORD}@")
    a.start(wait=False)
    b.start(wait=False)
    try:
        a.wait_ready(60)
        b.wait_ready(60)
        yield a, b
    finally:
        for stack in (a, b):
            if stack.proc is not None:
                stack.stop()


def test_push_through_one_node_pull_through_the_other(nodes, acme_jwt, tmp_path):
    a, b = nodes
    pushed = oci_layout(tmp_path / "src", "v1")
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", f"docker://{a.host}/acme/app:v1", acme_jwt)
    assert r.returncode == 0, r.stderr
    r = skopeo_copy(f"docker://{b.host}/acme/app:v1", f"oci:{tmp_path / 'out'}:v1", acme_jwt)
    assert r.returncode == 0, r.stderr
    assert layout_blobs(tmp_path / "out") == pushed["blobs"]
    h = bearer(token(b, acme_jwt))
    listed = requests.get(f"{b.url}/v2/_catalog", headers=h, timeout=10).json()["repositories"]
    assert listed == ["acme/app"]


def test_isolation_holds_across_nodes(nodes, acme_jwt, globex_jwt):
    a, b = nodes
    blob = os.urandom(4096)
    digest = push_blob(a, "acme/private", blob, bearer(token(a, acme_jwt)))
    globex_b, acme_b = bearer(token(b, globex_jwt)), bearer(token(b, acme_jwt))
    r = requests.head(f"{b.url}/v2/globex/steal/blobs/{digest}", headers=globex_b, timeout=10)
    assert r.status_code == 404
    r = requests.get(f"{b.url}/v2/acme/private/blobs/{digest}", headers=acme_b, timeout=10)
    assert r.status_code == 200 and r.content == blob


def healthz(node: Stack) -> requests.Response:
    return requests.get(f"http://{node.env['REGISTRY_ADMIN_ADDR']}/healthz", timeout=5)


def test_a_database_outage_refuses_pushes_and_ends_by_itself(nodes, postgres, acme_jwt):
    """Never a 201 that was not recorded: 503 while the database is away, then pushes work
    again on both nodes without a restart."""
    a, b = nodes
    h = bearer(token(a, acme_jwt))
    postgres.stop()
    try:
        r = requests.post(f"{a.url}/v2/acme/outage/blobs/uploads/", headers=h, timeout=10)
        location, blob = r.headers["Location"], os.urandom(1024)
        r = requests.put(
            a.url + location,
            params={"digest": "sha256:" + hashlib.sha256(blob).hexdigest()},
            data=blob,
            headers={**h, "Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert r.status_code == 503 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
        wait_for(lambda: healthz(a).status_code == 503 and "ledger" in healthz(a).text, 15)
    finally:
        postgres.restart()
    for node in (a, b):
        wait_for(lambda n=node: healthz(n).status_code == 200, timeout=30)
    digest = push_blob(b, "acme/outage", os.urandom(1024), bearer(token(b, acme_jwt)))
    r = requests.head(f"{a.url}/v2/acme/outage/blobs/{digest}", headers=h, timeout=10)
    assert r.status_code == 200


def test_the_password_is_nowhere_on_a_command_line(nodes) -> None:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert PASSWORD.encode() not in cmdline


def test_a_quota_holds_across_nodes(nodes) -> None:
    """The PostgreSQL ledger keeps sizes: what initech stored through A counts on B."""
    a, b = nodes
    jwt = tabbify_jwt({"network": "initech"})
    push_blob(a, "initech/app", os.urandom(60_000), bearer(token(a, jwt)))
    h = bearer(token(b, jwt))
    blob = os.urandom(60_000)
    r = requests.post(f"{b.url}/v2/initech/app/blobs/uploads/", headers=h, timeout=10)
    r = requests.put(
        b.url + r.headers["Location"],
        params={"digest": "sha256:" + hashlib.sha256(blob).hexdigest()},
        data=blob,
        headers={**h, "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["errors"][0]["message"] == "quota exceeded"
    push_blob(b, "initech/app", os.urandom(40_000), h)  # what still fits, fits
    metrics = f"http://{b.env['REGISTRY_ADMIN_ADDR']}/metrics"
    wait_for(
        lambda: (
            'tabbify_tenant_usage_bytes{tenant="initech"} 100000'
            in requests.get(metrics, timeout=5).text
        ),
        timeout=20,
    )


def test_two_first_pushes_of_an_immutable_tag_on_two_nodes_store_only_one(nodes, acme_jwt):
    """The claim is taken in PostgreSQL too: node B refuses while node A's push is between
    its check and its store."""
    a, b = nodes
    h = bearer(token(a, acme_jwt))
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(4).hex()})
    layer = os.urandom(64)
    push_blob(a, "acme/releases/app", config.encode(), h)
    push_blob(a, "acme/releases/app", layer, h)
    body = image_manifest((sha256(config.encode()), len(config)), [(sha256(layer), len(layer))])
    first = Conn(a.port)
    try:
        first.send(
            f"PUT /v2/acme/releases/app/manifests/v1.0 HTTP/1.1\r\nHost: {a.host}\r\n"
            f"Authorization: {h['Authorization']}\r\nContent-Type: {OCI_MANIFEST}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        interim = first.read_answer("PUT")  # A's checks ran: its claim is held
        assert interim is not None and interim.status == 100, interim
        url = f"{b.url}/v2/acme/releases/app/manifests/v1.0"
        second = requests.put(url, data=body, headers={**h, "Content-Type": OCI_MANIFEST},
                              timeout=10)  # fmt: skip
        assert second.status_code == 403, second.text
        assert "a push of this tag is in progress" in second.text
        assert first.send(body)
        stored = first.read_answer("PUT")
        assert stored is not None and stored.status == 201, stored
    finally:
        first.close()
    again = requests.put(url, data=body, headers={**h, "Content-Type": OCI_MANIFEST}, timeout=10)
    assert again.status_code == 403 and "in progress" not in again.text  # stored: immutable
