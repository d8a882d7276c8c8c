"""Health for orchestrators: /livez (restart?) and /readyz (send traffic?) beside /healthz,
on a stack of its own with an auth stand-in that can go away."""

from __future__ import annotations

import subprocess

import pytest
import requests

from tests.support.stack import ROOT, Stack, wait_for
from tests.support.standins.auth import AuthStandin

pytestmark = pytest.mark.e2e


def get(stack: Stack, path: str) -> requests.Response:
    return requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}{path}", timeout=10)


def probe(stack: Stack, path: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command (and an exec readiness probe)."""
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "addons.cli.probe", path],
        env={"REGISTRY_ADMIN_ADDR": stack.env["REGISTRY_ADMIN_ADDR"]},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_livez_readyz_and_auth_reachability(tmp_path):
    auth = AuthStandin().start()
    stack = Stack(tmp_path / "data", auth.url, REGISTRY_WORKERS="1").start()
    try:
        wait_for(lambda: get(stack, "/readyz").json().get("auth") == "ok")
        ready = get(stack, "/readyz").json()
        assert ready["status"] == "ready" and ready["auth"] == "ok", ready
        assert get(stack, "/livez").status_code == 200
        assert get(stack, "/healthz").json()["auth"] == "ok"
        assert probe(stack, "/livez").returncode == 0

        # The backend down: still alive (no restart), not ready (no traffic), named.
        stack.supervisorctl("stop", "backend")
        try:
            assert get(stack, "/livez").status_code == 200
            r = get(stack, "/readyz")
            assert r.status_code == 503 and r.json()["not_ready"] == ["backend"], r.text
            assert probe(stack, "/livez").returncode == 0
            not_ready = probe(stack, "/readyz")
            assert not_ready.returncode == 1 and "backend" in not_ready.stdout
        finally:
            stack.supervisorctl("start", "backend")
        stack.wait_ready()
        wait_for(lambda: get(stack, "/readyz").status_code == 200)

        # Auth unreachable: reported, but neither unready nor down (issued tokens still work).
        auth.stop()
        wait_for(lambda: get(stack, "/readyz").json()["auth"] == "unreachable", timeout=10)
        r = get(stack, "/readyz")
        assert r.status_code == 200 and r.json()["auth"] == "unreachable", r.text
        r = get(stack, "/healthz")
        assert r.status_code == 200 and r.json()["auth"] == "unreachable", r.text

        # No gateway worker serving: not alive.
        stack.supervisorctl("stop", "gateway:*")
        wait_for(lambda: get(stack, "/livez").status_code == 503, timeout=15)
        assert get(stack, "/readyz").json()["not_ready"] == ["gateway"]
        assert probe(stack, "/livez").returncode == 1
    finally:
        stack.stop()
