"""The backend answers only the registry's own programs (README, threat model): a local user
or process that reaches REGISTRY_BACKEND_ADDR around the gateway gets 401, whatever it asks;
through the gateway everything works; the run's credential is in a 0600 file and nowhere else
(no log, no capture, no command line)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import requests
from mitmproxy import io

from addons.clients import backend_credential
from tests.conftest import skopeo_round_trip
from tests.e2e.test_gateway import bearer, push_blob, token
from tests.support.images import oci_layout
from tests.support.stack import CLI, Stack, wait_for

pytestmark = pytest.mark.e2e


def admin(stack: Stack) -> str:
    return "http://" + stack.env["REGISTRY_ADMIN_ADDR"]


def secrets_of(stack: Stack) -> list[bytes]:
    """The credential as it could leak: its password, the line, the Basic header value."""
    line = stack.backend_credential_file.read_text().strip()
    basic = base64.b64encode(line.encode())
    return [line.partition(":")[2].encode(), line.encode(), basic]


def test_nobody_reaches_the_backend_around_the_gateway(registry, acme_jwt, tmp_path):
    h = bearer(token(registry, acme_jwt))
    digest = push_blob(registry, "acme/around", os.urandom(2048), h)
    b = registry.backend_url
    anonymous = [
        requests.get(f"{b}/v2/", timeout=10),
        requests.get(f"{b}/v2/_catalog", timeout=10),
        requests.get(f"{b}/v2/acme/around/tags/list", timeout=10),
        requests.head(f"{b}/v2/acme/around/blobs/{digest}", timeout=10),
        requests.get(f"{b}/v2/acme/around/blobs/{digest}", timeout=10),
        requests.post(f"{b}/v2/acme/around/blobs/uploads/", timeout=10),
        requests.delete(f"{b}/v2/acme/around/manifests/{digest}", timeout=10),
        # a registry token of the gateway's is nothing to the backend
        requests.get(f"{b}/v2/_catalog", headers=h, timeout=10),
        # nor a guessed credential of the right user
        requests.get(f"{b}/v2/_catalog", auth=("tabbify-registry", "guess"), timeout=10),
    ]
    assert [r.status_code for r in anonymous] == [401] * len(anonymous)
    # The blob is there, for whoever holds the run's credential (an operator, README).
    assert registry.backend_get(f"/v2/acme/around/blobs/{digest}", "HEAD").status_code == 200

    # Through the gateway, real clients push and pull as ever.
    pushed = oci_layout(tmp_path / "src", "v1")
    ref = f"docker://{registry.host}/acme/around/app:v1"
    assert skopeo_round_trip(tmp_path, ref, acme_jwt) == pushed["blobs"]
    # The catalog (the gateway's own answer, from its ledger) and a tag list (forwarded).
    r = requests.get(f"{registry.url}/v2/acme/around/app/tags/list", headers=h, timeout=10)
    assert r.status_code == 200 and r.json()["tags"] == ["v1"]
    # The gateway's health probe of the backend holds the credential too.
    health = requests.get(f"{admin(registry)}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["backend"] == "ok"


def test_the_credential_is_the_registry_users_alone(registry):
    for name in ("backend-credential", "backend-htpasswd"):
        mode = (registry.data_dir / "run" / name).stat()
        assert stat.S_IMODE(mode.st_mode) == 0o600, name
        assert mode.st_uid == os.getuid()
    line = registry.backend_credential_file.read_text().strip()
    user, _, password = line.partition(":")
    assert user == "tabbify-registry" and len(password) >= 43  # 256 random bits


def test_the_credential_is_in_no_log_capture_nor_command_line(registry, acme_jwt):
    r = requests.post(f"{admin(registry)}/capture", params={"seconds": 30, "max_mb": 1}, timeout=10)
    assert r.status_code == 200 and r.json()["active"]
    path = Path(r.json()["file"])
    h = bearer(token(registry, acme_jwt))
    push_blob(registry, "acme/captured-cred", b"layer", h)
    requests.get(f"{registry.url}/v2/acme/captured-cred/tags/list", headers=h, timeout=10)
    wait_for(lambda: requests.get(f"{admin(registry)}/capture", timeout=5).json()["flows"] >= 3)
    assert not requests.delete(f"{admin(registry)}/capture", timeout=10).json()["active"]

    leaks = secrets_of(registry)
    raw = path.read_bytes()
    assert not [s for s in leaks if s in raw]
    with open(path, "rb") as f:
        forwarded = [x for x in io.FlowReader(f).stream() if x.request.path.startswith("/v2/acme")]
    assert forwarded and all(
        x.request.headers.get("authorization") in (None, "REDACTED") for x in forwarded
    )
    # Access log (stdout) and operator log (stderr): everything the stack printed.
    printed = registry.log.read_bytes()
    assert not [s for s in leaks if s in printed]
    # No process on this machine carries it in its command line (supervisord's programs,
    # the gateway workers, the backend, the admin endpoint, gc).
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert not [s for s in leaks if s in cmdline], pid


def test_gc_goes_through_the_credential(registry, acme_jwt):
    h = bearer(token(registry, acme_jwt))
    push_blob(registry, "acme/gc-cred", os.urandom(1024), h)
    out = subprocess.run(
        [CLI, "gc", "--dry-run"], env=registry.env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["dry_run"] is True
    # Without the run's credential file (another user cannot read it), gc stops, saying why.
    moved = registry.backend_credential_file.with_name("moved")
    registry.backend_credential_file.rename(moved)
    try:
        out = subprocess.run(
            [CLI, "gc", "--dry-run"], env=registry.env, capture_output=True, text=True, timeout=300
        )
    finally:
        moved.rename(registry.backend_credential_file)
    assert out.returncode == 1 and "backend credential" in out.stderr


def test_each_run_has_its_own_credential_and_a_refused_one_is_a_gateway_fault(
    tmp_path, auth, acme_jwt
):
    stack = Stack(tmp_path / "data", auth.url, REGISTRY_WORKERS="1").start()
    try:
        first = stack.backend_auth
        h = bearer(token(stack, acme_jwt))
        digest = push_blob(stack, "acme/refused", os.urandom(512), h)
        # The backend stops taking the gateway's credential (here: its htpasswd file is
        # replaced, which Distribution re-reads): every forwarded request is the gateway's
        # fault, 502, never a login prompt naming the backend's realm.
        htpasswd = stack.data_dir / "run" / "backend-htpasswd"
        kept = htpasswd.read_bytes()
        htpasswd.write_text(backend_credential.htpasswd(backend_credential.make()))
        try:
            url = f"{stack.url}/v2/acme/refused/blobs/{digest}"
            wait_for(lambda: requests.head(url, headers=h, timeout=10).status_code == 502)
            r = requests.get(url, headers=h, timeout=10)
            assert r.status_code == 502 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert "www-authenticate" not in r.headers
            assert "tabbify-registry-backend" not in r.text
            health = requests.get(f"{admin(stack)}/healthz", timeout=10)
            assert health.status_code == 503 and health.json()["backend"] == "down"
            wait_for(lambda: b"refused the gateway's credential" in stack.log.read_bytes())
        finally:
            htpasswd.write_bytes(kept)
        wait_for(lambda: requests.head(url, headers=h, timeout=10).status_code == 200)
        stack.stop()

        stack.start()  # a new run: a new credential; the last one opens nothing any more
        assert stack.backend_auth != first
        r = requests.get(f"{stack.backend_url}/v2/_catalog", auth=first, timeout=10)
        assert r.status_code == 401
        h = bearer(token(stack, acme_jwt))
        url = f"{stack.url}/v2/acme/refused/blobs/{digest}"
        assert requests.head(url, headers=h, timeout=10).status_code == 200
    finally:
        stack.stop()
