"""Trying tenants as the README shows it: `tabbify-registry dev-auth` prints one JWT per
tenant, a registry runs with REGISTRY_AUTH_URL pointing at it, skopeo logs in with a printed
JWT, pushes and pulls; another tenant's JWT is refused in that namespace."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import skopeo_copy
from tests.support.images import oci_layout
from tests.support.stack import CLI, Stack, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def dev_auth() -> Iterator[tuple[str, dict[str, str], subprocess.Popen[str]]]:
    listen = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [CLI, "dev-auth", "--listen", listen, "--tenant", "acme", "--tenant", "globex"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    tokens = dict(proc.stdout.readline().split() for _ in range(2))
    yield f"http://{listen}", tokens, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_dev_auth_tokens_log_in_push_and_pull_with_skopeo(tmp_path, dev_auth):
    url, tokens, proc = dev_auth
    assert sorted(tokens) == ["acme", "globex"]
    stack = Stack(tmp_path / "data", url).start()
    try:
        oci_layout(tmp_path / "src", "v1")
        ref = f"docker://{stack.host}/acme/demo:v1"
        r = skopeo_copy(f"oci:{tmp_path / 'src'}:v1", ref, tokens["acme"])
        assert r.returncode == 0, r.stderr
        r = skopeo_copy(ref, f"oci:{tmp_path / 'out'}:v1", tokens["acme"])
        assert r.returncode == 0, r.stderr
        # The other tenant's JWT is a valid login, but not in acme's namespace.
        r = skopeo_copy(ref, f"oci:{tmp_path / 'other'}:v1", tokens["globex"])
        assert r.returncode != 0 and "denied" in r.stderr.lower(), r.stderr
        # A JWT dev-auth did not print is refused.
        r = skopeo_copy(ref, f"oci:{tmp_path / 'forged'}:v1", tokens["acme"][:-4] + "AAAA")
        assert r.returncode != 0
    finally:
        assert stack.stop() == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_dev_auth_refuses_a_non_loopback_listen_with_one_line():
    r = subprocess.run(
        [CLI, "dev-auth", "--listen", "0.0.0.0:5003"], capture_output=True, text=True, timeout=30
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "loopback" in lines[0], r.stderr
    assert r.stdout == ""  # no token printed for a server that does not run
