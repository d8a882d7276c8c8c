"""The operator's view (contract §6): /healthz, /metrics and redacted debug captures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests
from mitmproxy import io

from tests.e2e.test_gateway import bearer, push_blob, token
from tests.support.stack import ROOT, Stack, wait_for

pytestmark = pytest.mark.e2e


def admin(stack: Stack) -> str:
    return "http://" + stack.env["REGISTRY_ADMIN_ADDR"]


def test_healthz_names_what_is_down(registry):
    # Right after start the workers publish, and the ledger is whole once worker 0's start-up
    # walk has run (an empty backend: at once).
    wait_for(lambda: requests.get(f"{admin(registry)}/healthz", timeout=10).status_code == 200, 10)
    # Auth's reachability is probed every 2 s from the admin program's start.
    wait_for(lambda: requests.get(f"{admin(registry)}/healthz", timeout=10).json()["auth"] == "ok")
    r = requests.get(f"{admin(registry)}/healthz", timeout=10)
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "backend": "ok",
        "gateway": "ok",
        "mesh": "absent",
        "ledger": "ok",
        "auth": "ok",
    }
    registry.supervisorctl("stop", "backend")
    try:
        r = requests.get(f"{admin(registry)}/healthz", timeout=10)
        assert r.status_code == 503
        assert r.json() == {
            "status": "down",
            "backend": "down",
            "gateway": "ok",
            "mesh": "absent",
            "ledger": "ok",
            "auth": "ok",
        }
    finally:
        registry.supervisorctl("start", "backend")
    registry.wait_ready()


def test_metrics_count_requests_bytes_and_token_exchanges(registry, acme_jwt):
    t = bearer(token(registry, acme_jwt))
    push_blob(registry, "acme/metered", b"x" * 10_000, t)
    requests.get(f"{registry.url}/v2/globex/x/tags/list", headers=t, timeout=10)
    requests.get(f"{registry.url}/auth/token", auth=("x", "not.a.jwt"), timeout=10)
    text = ""

    def value(prefix: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))

    expected = {
        'tabbify_requests_total{status_class="2xx",decision="allow"}': 2,
        'tabbify_requests_total{status_class="4xx",decision="deny"}': 1,
        'tabbify_bytes_total{direction="in"}': 10_000,
        'tabbify_token_exchanges_total{outcome="granted"}': 1,
        'tabbify_token_exchanges_total{outcome="rejected"}': 1,
        "tabbify_auth_latency_seconds_count": 2,
        "tabbify_backend_latency_seconds_count": 2,
    }

    def published() -> bool:
        # Each worker publishes its counters once a second, on its own: the requests above
        # may have gone to different workers, so wait until every count is in.
        nonlocal text
        text = requests.get(f"{admin(registry)}/metrics", timeout=10).text
        return all(value(name) >= least for name, least in expected.items())

    try:
        wait_for(published, 10)
    except TimeoutError:
        missing = {n: value(n) for n, least in expected.items() if value(n) < least}
        raise AssertionError(f"counts still short after 10 s: {missing}") from None
    # No tenant labels on request metrics; storage per tenant is the one exception (§8).
    labelled = [ln for ln in text.splitlines() if "acme" in ln]
    assert all(ln.startswith("tabbify_tenant_usage_bytes{") for ln in labelled), labelled


def test_outside_loopback_there_is_no_admin(registry):
    assert registry.env["REGISTRY_ADMIN_ADDR"].startswith("127.0.0.1:")
    assert (
        requests.get(f"{registry.url}/healthz", timeout=10).status_code == 404
    )  # not on the gateway


def test_a_debug_capture_is_bounded_redacted_and_readable(registry, acme_jwt):
    r = requests.post(f"{admin(registry)}/capture", params={"seconds": 30, "max_mb": 1}, timeout=10)
    assert r.status_code == 200 and r.json()["active"]
    path = r.json()["file"]
    t = token(registry, acme_jwt)
    push_blob(registry, "acme/captured", b"secret layer bytes", bearer(t))
    requests.post(
        f"{registry.url}/auth/token",
        timeout=10,
        data={"grant_type": "password", "password": acme_jwt},
    )
    wait_for(lambda: requests.get(f"{admin(registry)}/capture", timeout=5).json()["flows"] >= 4, 10)
    stopped = requests.delete(f"{admin(registry)}/capture", timeout=10).json()
    assert not stopped["active"]

    raw = Path(path).read_bytes()
    for secret in (acme_jwt, t, acme_jwt.split(".")[2], t.split(".")[2], "secret layer bytes"):
        assert secret.encode() not in raw
    with open(path, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert len(flows) >= 4
    # The status counts what the file holds, after the capture ended (and later).
    assert stopped["flows"] == len(flows)
    assert requests.get(f"{admin(registry)}/capture", timeout=5).json()["flows"] == len(flows)
    authorized = [f for f in flows if "authorization" in f.request.headers]
    assert authorized and all(f.request.headers["authorization"] == "REDACTED" for f in authorized)
    assert all(
        not f.request.raw_content and not (f.response and f.response.raw_content) for f in flows
    )
    r = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "mitmdump"), "-nr", path, "--set", "flow_detail=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "/v2/acme/captured/blobs/uploads/" in r.stdout
