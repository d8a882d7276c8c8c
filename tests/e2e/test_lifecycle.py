"""Faults and lifecycle: auth down, gateway restarts, anonymous mode, refused configs, PID 1."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import skopeo, skopeo_copy
from tests.support.images import oci_layout
from tests.support.stack import CLI, Stack, free_port, wait_for
from tests.support.standins.auth import AuthStandin, tabbify_jwt

pytestmark = pytest.mark.e2e
GIB = 1 << 30


class Zeros:
    """A body of `size` zero bytes, produced 1 MiB at a time (never held in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.chunk = bytes(1 << 20)

    def __len__(self) -> int:
        return self.left

    def read(self, n: int = -1) -> bytes:
        n = len(self.chunk) if n < 0 else min(n, len(self.chunk))
        n = min(n, self.left)
        self.left -= n
        return self.chunk[:n]

    def __iter__(self):
        while data := self.read():
            yield data


def login(stack: Stack, credential: str) -> requests.Response:
    return requests.get(
        f"{stack.url}/auth/token",
        params={"service": "tabbify-registry"},
        auth=("x", credential),
        timeout=30,
    )


def peak_rss_mb(pids: dict[str, int]) -> float:
    """The largest peak RSS (VmHWM) of the gateway workers, in MB."""
    peaks = []
    for pid in pids.values():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    assert peaks, "no VmHWM"
    return max(peaks)


def test_auth_down_keeps_issued_tokens_and_refuses_new_logins(tmp_path, acme_jwt):
    auth = AuthStandin(slow_seconds=30).start()
    stack = Stack(tmp_path / "data", auth.url).start()
    try:
        t = login(stack, acme_jwt).json()["token"]
        h = {"Authorization": f"Bearer {t}"}
        for mode in ("error", "garbage", "redirect", "slow"):
            auth.mode = mode
            started = time.monotonic()
            r = login(stack, acme_jwt)
            assert r.status_code == 503, (mode, r.status_code)
            assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert time.monotonic() - started < 8, mode  # bounded by the auth timeout (5 s)
        auth.stop()  # connection refused from now on
        calls = auth.calls
        r = login(stack, acme_jwt)
        assert r.status_code == 503
        # Tokens already issued keep working: verification is local.
        r = requests.get(f"{stack.url}/v2/acme/x/tags/list", headers=h, timeout=10)
        assert r.status_code == 404  # reached the backend: NAME_UNKNOWN, not 401/503
        assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        assert auth.calls == calls
    finally:
        stack.stop()


def test_rejected_and_tenantless_credentials(registry):
    r = login(registry, tabbify_jwt({"sub": "x"})[:-4] + "AAAA")  # bad signature at auth
    assert r.status_code == 401 and r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    r = login(registry, tabbify_jwt({"sub": "Not/A/Tenant"}))
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"
    r = requests.get(f"{registry.url}/auth/token", timeout=10)
    assert r.status_code == 401


def test_restarted_gateway_workers_keep_issued_tokens_valid(registry, acme_jwt, tmp_path):
    oci_layout(tmp_path / "src", "v1")
    ref = f"docker://{registry.host}/acme/restart:v1"
    r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", ref, acme_jwt)
    assert r.returncode == 0, r.stderr
    old = login(registry, acme_jwt).json()["token"]
    manifest = f"{registry.url}/v2/acme/restart/manifests/v1"
    bearer = {
        "Authorization": f"Bearer {old}",
        "Accept": "application/vnd.oci.image.manifest.v1+json",
    }
    before = registry.gateway_pids()
    assert "gateway:gateway-0: stopped" in registry.supervisorctl("restart", "gateway:*")
    after = registry.gateway_pids()
    assert len(after) == registry.workers and not set(after.values()) & set(before.values())
    registry.wait_ready()
    # Restarted workers still share the run's key: a token issued before verifies on all of
    # them (several requests: new connections land on every worker).
    for _ in range(8):
        assert requests.get(manifest, headers=bearer, timeout=10).status_code == 200
    r = skopeo("inspect", "--tls-verify=false", "--creds", f"x:{acme_jwt}", ref)
    assert r.returncode == 0, r.stderr


def test_a_new_run_makes_a_new_key_and_clients_recover_through_the_challenge(
    tmp_path, auth, acme_jwt
):
    stack = Stack(tmp_path / "data", auth.url).start()
    try:
        old = login(stack, acme_jwt).json()["token"]
        assert stack.stop() == 0
        stack.start()
        # The new run has a new key: the old token is dead, the challenge says where to go.
        r = requests.get(
            f"{stack.url}/v2/acme/x/tags/list",
            headers={"Authorization": f"Bearer {old}"},
            timeout=10,
        )
        assert r.status_code == 401 and "realm=" in r.headers["WWW-Authenticate"]
        new = login(stack, acme_jwt).json()["token"]
        r = requests.get(
            f"{stack.url}/v2/acme/x/tags/list",
            headers={"Authorization": f"Bearer {new}"},
            timeout=10,
        )
        assert r.status_code == 404  # through, to a repository that does not exist
    finally:
        stack.stop()


def test_a_killed_gateway_worker_is_restarted_while_the_others_serve(registry):
    pids = registry.gateway_pids()
    name, pid = sorted(pids.items())[0]
    os.kill(pid, 9)
    # The other workers keep answering while supervisord brings this one back (once the
    # kernel has closed the dead one's socket: connections racing the kill are its own).
    time.sleep(0.2)
    for _ in range(10):
        assert requests.get(f"{registry.url}/v2/", timeout=5).status_code == 401
    wait_for(lambda: registry.gateway_pids().get(name) not in (None, pid), 20)
    registry.wait_ready()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_refused_1gib_upload_is_answered_without_buffering(registry, acme_jwt, framing):
    """No token, and another tenant's repo: the body is drained, never held in memory."""
    globex = login(registry, tabbify_jwt({"sub": "globex"})).json()["token"]
    for headers in ({}, {"Authorization": f"Bearer {globex}"}):
        h = {**headers, "Content-Type": "application/octet-stream"}
        # A sized reader makes requests send Content-Length; a generator makes it chunked.
        body = Zeros(GIB) if framing == "content-length" else iter(Zeros(GIB))
        started = time.monotonic()
        r = requests.put(
            f"{registry.url}/v2/acme/big/blobs/uploads/x?digest=sha256:{'0' * 64}",
            data=body,
            headers=h,
            timeout=120,
        )
        assert r.status_code == (403 if headers else 401), r.text
        assert r.json()["errors"][0]["code"] in ("UNAUTHORIZED", "DENIED")
        assert time.monotonic() - started < 60
    rss = peak_rss_mb(registry.gateway_pids())
    print(f"gateway peak RSS after refused 1 GiB uploads ({framing}): {rss:.0f} MB")
    assert rss < 200


def test_anonymous_dev_mode(tmp_path):
    stack = Stack(tmp_path / "data", None).start()
    try:
        assert requests.get(f"{stack.url}/v2/", timeout=10).status_code == 200
        oci_layout(tmp_path / "src", "v1")
        ref = f"docker://{stack.host}/anyone/app:v1"
        r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", ref)
        assert r.returncode == 0, r.stderr
        r = skopeo_copy(ref, f"oci:{tmp_path / 'out'}:v1")
        assert r.returncode == 0, r.stderr
        assert requests.get(f"{stack.url}/auth/token", timeout=10).status_code == 404
        catalog = requests.get(f"{stack.url}/v2/_catalog", timeout=10)
        assert catalog.status_code == 200 and "anyone/app" in catalog.json()["repositories"]
    finally:
        assert stack.stop() == 0


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [CLI, *args], env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REGISTRY_LISTEN": "10.1.2.3:5000"}, "REGISTRY_LISTEN"),  # anonymous off loopback
        ({"REGISTRY_STORAGE": "ceph"}, "REGISTRY_STORAGE"),
        ({"REGISTRY_STORAGE": "s3"}, "REGISTRY_S3_BUCKET"),
        ({"REGISTRY_LISTEN": "localhost:5000"}, "REGISTRY_LISTEN"),
        ({"REGISTRY_BACKEND": "nginx"}, "REGISTRY_BACKEND"),
        ({"REGISTRY_BACKEND_ADDR": "10.0.0.1:5001"}, "REGISTRY_BACKEND_ADDR"),
        (  # Distribution reads one CA file: two different ones are ambiguous
            {
                "REGISTRY_BACKEND": "distribution",
                "REGISTRY_STORAGE": "s3",
                "REGISTRY_S3_BUCKET": "b",
                "REGISTRY_S3_REGION": "r",
                "AWS_CA_BUNDLE": "/etc/ssl/private-ca.pem",
                "SSL_CERT_FILE": "/etc/ssl/other.pem",
            },
            "AWS_CA_BUNDLE",
        ),
    ],
)
def test_refused_settings_stop_startup_with_one_line(tmp_path, env, variable):
    r = run_cli({"REGISTRY_DATA_DIR": str(tmp_path), **env}, "run")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], r.stderr


def test_run_exits_nonzero_when_the_backend_cannot_start(tmp_path):
    with socket.socket() as squatter:  # the backend's port is taken
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        r = run_cli(
            {
                "REGISTRY_DATA_DIR": str(tmp_path),
                "REGISTRY_BACKEND": "distribution",
                "REGISTRY_LISTEN": f"127.0.0.1:{free_port()}",
                "REGISTRY_BACKEND_ADDR": f"127.0.0.1:{port}",
            },
            "run",
            timeout=90,
        )
    assert r.returncode == 1
    assert "backend could not start" in r.stderr


def test_sigterm_stops_everything_and_one_data_dir_has_one_stack(tmp_path):
    stack = Stack(tmp_path / "data", None).start()
    second = run_cli({**stack.env, "REGISTRY_LISTEN": f"127.0.0.1:{free_port()}"}, "run")
    assert second.returncode != 0 and "REGISTRY_DATA_DIR" in second.stderr
    assert stack.stop() == 0
    for port in (stack.port, stack.backend_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing left listening


def test_config_prints_the_rendered_backend_config(tmp_path):
    r = run_cli({"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_BACKEND": "zot"}, "config")
    assert r.returncode == 0, r.stderr
    import json

    config = json.loads(r.stdout)
    assert config["storage"]["rootDirectory"] == str(tmp_path / "zot-cache")
    assert config["http"]["compat"] == ["docker2s2"]


def test_backend_down_and_malformed_requests_get_oci_errors_not_html(registry, acme_jwt):
    t = login(registry, acme_jwt).json()["token"]
    assert "backend: stopped" in registry.supervisorctl("stop", "backend")
    try:
        r = requests.get(
            f"{registry.url}/v2/acme/x/tags/list",
            headers={"Authorization": f"Bearer {t}"},
            timeout=10,
        )
        assert r.status_code == 502
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert str(registry.backend_port) not in r.text
        # The gateway still answers what it decides itself.
        assert requests.get(f"{registry.url}/v2/", timeout=10).status_code == 401
    finally:
        registry.supervisorctl("start", "backend")
    registry.wait_ready()
    with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as s:
        s.sendall(
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        answer = s.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 400") and '"errors"' in answer and "<html" not in answer


def test_a_backend_binary_that_is_missing_is_one_line(tmp_path):
    r = run_cli(
        {"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_BACKEND": "zot", "PATH": "/nonexistent"},
        "run",
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "REGISTRY_BACKEND=zot" in lines[0], r.stderr
