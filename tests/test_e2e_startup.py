"""`tabbify-registry run` as the image runs it: the listen addresses it accepts, and what it
tells the operator at start."""

from __future__ import annotations

import contextlib
import socket

import pytest
import requests

from tests.stack import Stack, free_port
from tests.test_e2e_lifecycle import login, run_cli

pytestmark = pytest.mark.e2e


def other_local_address() -> str:
    """A local IPv4 address other than 127.0.0.1: the host's own (a UDP "connection" sends
    nothing), else another loopback one."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        address = s.getsockname()[0]
        if address != "127.0.0.1":
            return address
    return "127.0.0.2"


def test_auth_on_listens_on_every_address_behind_a_published_port(tmp_path, auth, acme_jwt):
    port = free_port()
    stack = Stack(
        tmp_path / "data",
        auth.url,
        REGISTRY_LISTEN=f"0.0.0.0:{port}",
        REGISTRY_EXTERNAL_URL=f"http://127.0.0.1:{port}",
    )
    stack.port, stack.host, stack.url = port, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    stack.start()
    try:
        token = login(stack, acme_jwt).json()["token"]
        for host in ("127.0.0.1", other_local_address()):
            url = f"http://{host}:{port}/v2/"
            challenge = requests.get(url, timeout=10)
            assert challenge.status_code == 401, host
            assert (
                f'realm="http://127.0.0.1:{port}/auth/token"'
                in challenge.headers["WWW-Authenticate"]
            )
            answer = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert answer.status_code == 200, host
    finally:
        assert stack.stop() == 0


@pytest.mark.parametrize("listen", ["0.0.0.0", "[::]"])
def test_anonymous_mode_on_every_address_is_one_line_naming_the_variable(tmp_path, listen):
    r = run_cli(
        {"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_LISTEN": f"{listen}:{free_port()}"}, "run"
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "REGISTRY_LISTEN" in lines[0] and "loopback" in lines[0]
