"""Tabbify auth client (contract §4): judge() for every branch, and AuthClient against a
real loopback stand-in of `POST /v1/validate`.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from addons.clients.authservice import AuthClient, judge, tenant_from_claims

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhY21lIn0.c2lnbmF0dXJl"

# --- judge ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"network": "acme"},
        {"claims": {"network": "acme"}},
        {"network": "acme", "sub": "user-123"},
        {"claims": {"network": "acme", "sub": "someone"}, "network": "globex"},
        {"sub": "acme"},
        {"claims": {"sub": "acme"}},
        {"network": None, "sub": "acme"},
    ],
)
def test_2xx_with_a_tenant_is_granted(payload):
    for status in (200, 201, 204, 299):
        verdict = judge(status, payload)
        assert verdict.outcome == "granted"
        assert verdict.tenant == "acme"


def test_network_is_preferred_over_sub():
    assert judge(200, {"network": "acme", "sub": "globex"}).tenant == "acme"
    assert judge(200, {"claims": {"sub": "globex", "network": "acme"}}).tenant == "acme"


@pytest.mark.parametrize(
    "claims",
    [
        {"network": "Acme"},
        {"network": "acme/x"},
        {"network": ""},
        {"network": 42},
        {"network": ["acme"]},
        {"network": {"name": "acme"}},
        {"network": True},
        {"network": "acme/x", "sub": "acme"},  # an invalid network does not fall back to sub
        {"sub": "Acme"},
        {"sub": "acme/x"},
        {"sub": ""},
        {"sub": 7},
        {"sub": "../globex"},
        {"sub": "acme "},
        {},
        {"email": "a@acme.example"},
    ],
)
def test_2xx_without_a_usable_tenant_is_refused(claims):
    for payload in (claims, {"claims": claims}):
        verdict = judge(200, payload)
        assert verdict.outcome == "refused", payload
        assert verdict.tenant is None


@pytest.mark.parametrize("payload", [None, [], ["acme"], "acme", 1, True])
def test_2xx_without_a_json_object_is_unavailable(payload):
    verdict = judge(200, payload)
    assert verdict.outcome == "unavailable"
    assert verdict.tenant is None


@pytest.mark.parametrize("claims", [None, "acme", ["acme"], 1])
def test_2xx_with_malformed_claims_is_unavailable(claims):
    verdict = judge(200, {"claims": claims, "network": "acme"})
    assert verdict.outcome == "unavailable"
    assert verdict.tenant is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 499])
def test_4xx_is_rejected(status):
    verdict = judge(status, {"network": "acme"})
    assert verdict.outcome == "rejected"
    assert verdict.tenant is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599, 300, 301, 302, 304, 307, 308, 100])
def test_5xx_and_3xx_are_unavailable(status):
    verdict = judge(status, {"network": "acme"})
    assert verdict.outcome == "unavailable"
    assert verdict.tenant is None


def test_tenant_from_claims():
    assert tenant_from_claims({"network": "acme", "sub": "x"}) == "acme"
    assert tenant_from_claims({"sub": "acme"}) == "acme"
    assert tenant_from_claims({"network": "a-c.m_e", "sub": "x"}) == "a-c.m_e"
    assert tenant_from_claims({}) is None
    assert tenant_from_claims({"network": "ACME"}) is None
    assert tenant_from_claims({"network": 1, "sub": "acme"}) is None


# --- AuthClient against a loopback stand-in ---------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    base: str
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


GRANT = json.dumps({"claims": {"network": "acme", "sub": "user-1"}}).encode()


def make_handler(state: StandIn) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None):
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            state.seen.append(Seen("POST", self.path, dict(self.headers.items()), body))
            behaviour = self.path.split("/")[1]
            if behaviour == "granted":
                self.answer(200, GRANT)
            elif behaviour == "rejected":
                self.answer(401, b'{"error":"invalid token"}')
            elif behaviour == "broken":
                self.answer(500, b'{"error":"boom"}')
            elif behaviour == "garbage":
                self.answer(200, b"<html>not json</html>", {"Content-Type": "text/html"})
            elif behaviour == "slow":
                state.release.wait(10)
                self.answer(200, GRANT)
            elif behaviour == "huge":
                self.answer(
                    200, b'{"claims": {"network": "acme", "x": "' + b"a" * (1 << 20) + b'"}}'
                )
            elif behaviour == "drip":
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(100):
                    if state.release.wait(0.2):
                        break
                    self.wfile.write(b" ")
                    self.wfile.flush()
            elif behaviour == "redirect":
                self.answer(302, GRANT, {"Location": f"{state.base}/granted/v1/validate"})
            else:
                self.answer(404, b"{}")

        def do_GET(self) -> None:
            state.seen.append(Seen("GET", self.path, dict(self.headers.items()), b""))
            self.answer(200, GRANT)

    return Handler


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(StandIn("")))
    state = StandIn(f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = make_handler(state)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def test_granted_and_the_request_it_sends(standin):
    verdict = asyncio.run(AuthClient(f"{standin.base}/granted", timeout=2).validate(JWT))
    assert verdict.outcome == "granted"
    assert verdict.tenant == "acme"
    assert verdict.seconds >= 0
    [seen] = standin.seen
    assert seen.method == "POST"
    assert seen.path == "/granted/v1/validate"
    assert seen.headers["Authorization"] == f"Bearer {JWT}"
    assert seen.headers["Content-Type"] == "application/json"
    assert json.loads(seen.body) == {"token": JWT}


def test_trailing_slash_in_base_url(standin):
    verdict = asyncio.run(AuthClient(f"{standin.base}/granted/", timeout=2).validate(JWT))
    assert verdict.outcome == "granted"
    assert standin.seen[0].path == "/granted/v1/validate"


def test_401_is_rejected(standin):
    verdict = asyncio.run(AuthClient(f"{standin.base}/rejected", timeout=2).validate(JWT))
    assert verdict.outcome == "rejected"
    assert verdict.tenant is None


def test_500_is_unavailable(standin):
    verdict = asyncio.run(AuthClient(f"{standin.base}/broken", timeout=2).validate(JWT))
    assert verdict.outcome == "unavailable"
    assert verdict.tenant is None


def test_garbage_body_with_200_is_unavailable(standin):
    verdict = asyncio.run(AuthClient(f"{standin.base}/garbage", timeout=2).validate(JWT))
    assert verdict.outcome == "unavailable"
    assert verdict.tenant is None


def test_slow_auth_is_unavailable_quickly(standin):
    timeout = 0.3
    started = time.monotonic()
    verdict = asyncio.run(AuthClient(f"{standin.base}/slow", timeout=timeout).validate(JWT))
    elapsed = time.monotonic() - started
    assert verdict.outcome == "unavailable"
    assert verdict.tenant is None
    assert elapsed < timeout + 1


def test_a_huge_answer_is_unavailable_and_not_read_whole(standin):
    verdict = asyncio.run(AuthClient(f"{standin.base}/huge", timeout=2).validate(JWT))
    assert verdict.outcome == "unavailable" and "too much" in verdict.reason


def test_a_dripping_answer_is_cut_at_the_deadline(standin):
    started = time.monotonic()
    verdict = asyncio.run(AuthClient(f"{standin.base}/drip", timeout=0.5).validate(JWT))
    assert verdict.outcome == "unavailable"
    assert time.monotonic() - started < 2


def test_connection_refused_is_unavailable():
    # A bound socket that never listens: connecting to its port is refused, and nobody else
    # can take the port while we hold it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        started = time.monotonic()
        verdict = asyncio.run(AuthClient(f"http://127.0.0.1:{port}", timeout=2).validate(JWT))
    assert verdict.outcome == "unavailable"
    assert verdict.tenant is None
    assert time.monotonic() - started < 2


def test_redirect_is_unavailable_and_not_followed(standin):
    verdict = asyncio.run(AuthClient(f"{standin.base}/redirect", timeout=2).validate(JWT))
    assert verdict.outcome == "unavailable"
    assert verdict.tenant is None
    assert [s.path for s in standin.seen] == ["/redirect/v1/validate"]


def test_proxy_environment_is_ignored(standin, monkeypatch):
    """No proxy variable sits between the gateway and auth (the JWT would travel to it)."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    verdict = asyncio.run(AuthClient(f"{standin.base}/granted", timeout=2).validate(JWT))
    assert verdict.outcome == "granted"
