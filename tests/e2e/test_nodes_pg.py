"""Two nodes on one bucket with the isolation ledger in PostgreSQL (REGISTRY_LEDGER_URL=
postgresql://…) instead of the bucket: the same promises as tests/e2e/test_nodes.py, on a
real PostgreSQL server; node A gets the password from PGPASSWORD, node B in the URL (and
it is on no command line)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.e2e.test_gateway import bearer, push_blob, token
from tests.e2e.test_nodes import bucket_server, push_here_pull_there, shared_files, two_nodes
from tests.e2e.test_policy import held_manifest_put, put_manifest, small_manifest
from tests.support.postgres import PASSWORD, Postgres
from tests.support.stack import Stack, wait_for
from tests.support.standins.auth import tabbify_jwt
from tests.support.standins.seaweed import SeaweedS3

pytestmark = pytest.mark.e2e
POLICY = """
[[quota]]
tenants = ["initech"]
bytes = "100kB"

[[immutable]]
repositories = ["acme/releases/**"]
tags = ["v*"]
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    yield from bucket_server(tmp_path_factory.mktemp("seaweed-nodes-pg"))


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, s3: SeaweedS3, postgres: Postgres, auth
) -> Iterator[tuple[Stack, Stack]]:
    root = tmp_path_factory.mktemp("nodes-pg")
    (root / "shared").mkdir()
    shared = shared_files(root / "shared")
    (shared / "policy.toml").write_text(POLICY)
    ledger = postgres.database()
    # The two ways to give the password: libpq's variable (A), or in the URL (B).
    env_a = {"REGISTRY_LEDGER_URL": ledger, "PGPASSWORD": PASSWORD}
    env_b = {"REGISTRY_LEDGER_URL": ledger.replace("registry@", f"registry:{PASSWORD}@")}
    with two_nodes(root, auth.url, s3, shared, env_a, env_b) as both:
        yield both


def test_push_through_one_node_pull_through_the_other(nodes, acme_jwt, tmp_path):
    a, b = nodes
    assert push_here_pull_there(a, b, acme_jwt, tmp_path) == ["acme/app"]


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


def test_the_password_is_nowhere_on_a_command_line(nodes) -> None:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert PASSWORD.encode() not in cmdline


def test_a_quota_holds_across_nodes(nodes) -> None:
    """The PostgreSQL ledger keeps sizes and unfinished uploads: what initech stored, or is
    uploading, through A counts on B."""
    a, b = nodes
    jwt = tabbify_jwt({"network": "initech"})
    ha = bearer(token(a, jwt))
    push_blob(a, "initech/app", os.urandom(60_000), ha)
    h = bearer(token(b, jwt))

    def monolithic(blob: bytes) -> requests.Response:
        r = requests.post(f"{b.url}/v2/initech/app/blobs/uploads/", headers=h, timeout=10)
        return requests.put(
            b.url + r.headers["Location"],
            params={"digest": "sha256:" + hashlib.sha256(blob).hexdigest()},
            data=blob,
            headers={**h, "Content-Type": "application/octet-stream"},
            timeout=30,
        )

    # 30 kB parked in an unfinished upload through A: 20 kB more through B do not fit.
    r = requests.post(f"{a.url}/v2/initech/app/blobs/uploads/", headers=ha, timeout=10)
    r = requests.patch(
        a.url + r.headers["Location"], data=os.urandom(30_000),
        headers={**ha, "Content-Type": "application/octet-stream"}, timeout=30,
    )  # fmt: skip
    assert r.status_code == 202, r.text
    parked = r.headers["Location"]
    r = monolithic(os.urandom(20_000))
    assert r.status_code == 403, r.text
    assert r.json()["errors"][0]["message"].startswith("quota exceeded: 90000 of 100000")
    # Cancelled through A: released on B, where 60 kB more still do not fit.
    assert requests.delete(a.url + parked, headers=ha, timeout=10).status_code == 204
    r = monolithic(os.urandom(60_000))
    assert r.status_code == 403 and r.json()["errors"][0]["message"].startswith("quota exceeded")
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
    body = small_manifest(a, "acme/releases/app", h)
    first = held_manifest_put(a, "acme/releases/app", "v1.0", body, h)  # A's claim is held
    try:
        second = put_manifest(b, "acme/releases/app", "v1.0", body, h)
        assert second.status_code == 403, second.text
        assert "a push of this tag is in progress" in second.text
        assert first.send(body)
        stored = first.read_answer("PUT")
        assert stored is not None and stored.status == 201, stored
    finally:
        first.close()
    again = put_manifest(b, "acme/releases/app", "v1.0", body, h)
    assert again.status_code == 403 and "in progress" not in again.text  # stored: immutable


def test_a_database_restart_costs_no_request(nodes, postgres, acme_jwt):
    """Every worker of both nodes holds a connection the restart ends; once the database is
    back, pushes and pulls through both nodes work at once: not one 503 (each worker
    replaces its connection before using it)."""
    a, b = nodes
    h = {node.url: bearer(token(node, acme_jwt)) for node in (a, b)}
    postgres.stop()
    postgres.restart()
    # A worker whose health check met the database away fails fast for a second after (by
    # design); then every request must work, before the health checks (every 5 s) have
    # used each worker's connection again.
    time.sleep(2)
    logged = {node.url: len(node.access_log()) for node in (a, b)}
    for i in range(8):  # requests land on either worker of a node
        here, there = (a, b) if i % 2 else (b, a)
        digest = push_blob(here, "acme/restart", os.urandom(512), h[here.url])
        r = requests.get(
            f"{there.url}/v2/acme/restart/blobs/{digest}", headers=h[there.url], timeout=10
        )
        assert r.status_code == 200, r.text
    for node in (a, b):
        statuses = [e["status"] for e in node.access_log()[logged[node.url] :]]
        assert statuses and 503 not in statuses, statuses


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
    # A gateway worker that had not used its connection during the outage finds it gone at
    # its next use and replaces it first: pushes work at once.
    digest = push_blob(b, "acme/outage", os.urandom(1024), bearer(token(b, acme_jwt)))
    r = requests.head(f"{a.url}/v2/acme/outage/blobs/{digest}", headers=h, timeout=10)
    assert r.status_code == 200
