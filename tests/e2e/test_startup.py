"""`tabbify-registry run` as the image runs it: the listen addresses it accepts, and what it
tells the operator at start."""

from __future__ import annotations

import contextlib
import json
import re
import socket

import pytest
import requests

from tests.e2e.test_lifecycle import login, run_cli
from tests.support.stack import Stack, free_port

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


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "[::]"])
def test_auth_on_listens_on_every_address_behind_a_published_port(
    tmp_path, auth, acme_jwt, wildcard
):
    port = free_port()
    stack = Stack(
        tmp_path / "data",
        auth.url,
        REGISTRY_LISTEN=f"{wildcard}:{port}",  # as `docker run -p` users set it, nothing more
    )
    stack.port, stack.host, stack.url = port, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    stack.start()
    try:
        token = login(stack, acme_jwt).json()["token"]
        hosts = ["127.0.0.1", other_local_address()]
        if wildcard == "[::]":
            hosts.append("[::1]")  # and IPv6, on the same port
        for host in hosts:
            url = f"http://{host}:{port}/v2/"
            challenge = requests.get(url, timeout=10)
            assert challenge.status_code == 401, host
            assert (
                f'realm="http://localhost:{port}/auth/token"'
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


def operator_lines(stack: Stack) -> list[dict]:
    """The stack's stderr: every line a JSON object (stdout's access log lines aside)."""
    lines = []
    for line in stack.log.read_text().splitlines():
        entry = json.loads(line)  # nothing that is not JSON
        if "source" in entry:
            lines.append(entry)
    return lines


def test_start_up_summary_and_a_stop_in_the_operators_terms(tmp_path, auth):
    stack = Stack(tmp_path / "data", auth.url, REGISTRY_WORKERS="2").start()
    requests.get(f"{stack.url}/v2/", timeout=10)
    assert stack.stop() == 0
    lines = operator_lines(stack)
    for entry in lines:
        assert set(entry) == {"time", "level", "source", "message"}, entry
        assert entry["level"] in ("info", "warning", "error")  # debug is off by default
        assert not re.search(r"\d\d:\d\d:\d\d", entry["message"]), entry  # one time: `time`
    said = "\n".join(e["message"] for e in lines if e["source"] == "run")
    admin = stack.env["REGISTRY_ADMIN_ADDR"]
    assert f"listening on {stack.url}" in said
    assert f"mode: Tabbify auth at {auth.url}" in said
    assert f"admin on http://{admin} (live view /, /metrics, /healthz, /livez, /readyz)" in said
    assert f"data in {stack.data_dir}" in said and "Distribution" in said
    assert "2 gateway workers" in said
    assert "stopping on SIGTERM" in said and "stopped (exit status 0)" in said
    # supervisord's own chatter stays out of the operator's view.
    text = stack.log.read_text()
    for chatter in ("CRIT", "running as root", "stopped: backend", "WARN"):
        assert chatter not in text, chatter


def test_log_level_warning_keeps_only_warnings_and_errors(tmp_path):
    stack = Stack(tmp_path / "data", None, REGISTRY_LOG_LEVEL="warning").start()
    assert requests.get(f"{stack.url}/v2/", timeout=10).status_code == 200
    stack.supervisorctl("stop", "admin")  # a stop the operator asked for: not a warning
    assert stack.stop() == 0
    assert [e for e in operator_lines(stack) if e["level"] not in ("warning", "error")] == []
    assert stack.access_log()  # the access log is not affected


def test_an_unknown_log_level_is_one_line_naming_the_variable(tmp_path):
    r = run_cli({"REGISTRY_DATA_DIR": str(tmp_path), "REGISTRY_LOG_LEVEL": "verbose"}, "run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "REGISTRY_LOG_LEVEL" in lines[0], r.stderr
