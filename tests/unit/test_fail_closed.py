"""Every deciding hook fails closed: made to raise, it never lets a request through.

The gateway's real engine runs in-process (tests/support/inproc.py) in front of a scripted backend
that records what reaches it. For each hook of each deciding addon, the hook's body is
replaced by one that raises (through `__wrapped__`, see gate.fail_closed), then a request that
the hook normally passes is sent:

- a request-phase hook (requestheaders, request) that raises: the client gets 500 (or, for the
  gate itself, the connection is cut) and the backend receives nothing;
- a response-phase hook that raises: the client never receives the backend's success.

A control run without the fault shows each request does succeed normally, and a meta test
checks that no deciding hook is missing from the table.
"""

from __future__ import annotations

import inspect
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from addons.gateway.access import RegistryAccess
from addons.gateway.gate import Gate
from addons.gateway.intake import Intake
from addons.gateway.isolation import TenantIsolation
from addons.gateway.token_endpoint import TokenEndpoint
from tests.support.inproc import InProcessGateway
from tests.support.standins.auth import AuthStandin, tabbify_jwt

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")
DECIDING = (Intake, TokenEndpoint, RegistryAccess, TenantIsolation, Gate)


class ScriptedBackend:
    """Answers like a registry would for the few requests below; records every request."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def answer(self, status: int, body: bytes = b"", **headers: str) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_one(self) -> None:
                backend.seen.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                path = self.path.partition("?")[0]
                port = self.server.server_address[1]
                if path.endswith("/boom/tags/list"):
                    detail = b'{"errors":[{"code":"UNKNOWN","message":"/var/lib/secret/x"}]}'
                    return self.answer(500, detail, Content_Type="application/json")
                if path.endswith("/tags/list"):
                    return self.answer(200, b'{"name":"acme/app","tags":[]}')
                if path.endswith("/blobs/uploads/") and self.command == "POST":
                    where = f"http://127.0.0.1:{port}/v2/acme/app/blobs/uploads/u1"
                    return self.answer(202, Location=where)
                if "/blobs/uploads/" in path and self.command == "PUT":
                    return self.answer(201, Docker_Content_Digest=D2)
                if "/manifests/" in path and self.command == "PUT":
                    return self.answer(201, Docker_Content_Digest=D2)
                if f"/blobs/{D1}" in path:
                    return self.answer(200, b"blob-bytes")
                return self.answer(404)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@dataclass
class Setup:
    gw: InProcessGateway
    backend: ScriptedBackend
    auth: AuthStandin


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    backend, auth = ScriptedBackend(), AuthStandin().start()
    ledger = tmp_path_factory.mktemp("fc") / "ledger.db"
    with InProcessGateway(backend.url, ledger=ledger, auth_url=auth.url) as gw:
        gw.addon("tenantisolation").ledger.add("acme", [D1])
        yield Setup(gw, backend, auth)
    auth.stop()
    backend.stop()


Send = Callable[[Setup], requests.Response]


def registry(
    method: str, path: str, data: bytes = b"", headers: dict[str, str] | None = None
) -> Send:
    def send(s: Setup) -> requests.Response:
        sent = {"Authorization": f"Bearer {s.gw.token('acme')}", **(headers or {})}
        return requests.request(method, s.gw.url + path, headers=sent, data=data, timeout=10)

    return send


def token_request(s: Setup) -> requests.Response:
    jwt = tabbify_jwt({"sub": "u", "network": "acme"})
    return requests.get(s.gw.url + "/auth/token", auth=("x", jwt), timeout=10)


MANIFEST = json.dumps({"schemaVersion": 2, "layers": [{"digest": D1, "size": 10}]}).encode()
OCI = "application/vnd.oci.image.manifest.v1+json"
TAGS = registry("GET", "/v2/acme/app/tags/list")
BOOM = registry("GET", "/v2/acme/boom/tags/list")
UPLOAD_START = registry("POST", "/v2/acme/app/blobs/uploads/")
UPLOAD_END = registry("PUT", f"/v2/acme/app/blobs/uploads/u1?digest={D2}", data=b"x")
BLOB = registry("GET", f"/v2/acme/app/blobs/{D1}")
# Refused with a large body: the gate streams it into its sink and swaps in the refusal.
FOREIGN_LARGE = registry("PATCH", "/v2/globex/app/blobs/uploads/u1", data=b"x" * (1 << 20))
PUSH = registry("PUT", "/v2/acme/app/manifests/v1", data=MANIFEST, headers={"Content-Type": OCI})

# (addon, hook) → the request the hook has work to do for, and its normal status.
CASES: dict[tuple[type, str], tuple[Send, int]] = {
    (Intake, "requestheaders"): (TAGS, 200),
    (TokenEndpoint, "requestheaders"): (token_request, 200),
    (TokenEndpoint, "request"): (token_request, 200),
    (RegistryAccess, "requestheaders"): (TAGS, 200),
    (RegistryAccess, "responseheaders"): (UPLOAD_START, 202),
    (RegistryAccess, "response"): (BOOM, 500),
    (TenantIsolation, "requestheaders"): (BLOB, 200),
    (TenantIsolation, "request"): (PUSH, 201),
    (TenantIsolation, "responseheaders"): (UPLOAD_END, 201),
    (TenantIsolation, "response"): (UPLOAD_END, 201),
    (Gate, "requestheaders"): (TAGS, 200),
    (Gate, "request"): (PUSH, 201),
    (Gate, "response"): (FOREIGN_LARGE, 403),
}
IDS = [f"{addon.__name__}.{hook}" for addon, hook in CASES]


def test_every_hook_of_every_deciding_addon_is_guarded_and_tried():
    for addon in DECIDING:
        for hook in HOOKS:
            if hasattr(addon, hook):
                assert getattr(getattr(addon, hook), "fail_closed", False), (addon, hook)
                assert (addon, hook) in CASES, (addon, hook)


@pytest.mark.parametrize(("key", "case"), CASES.items(), ids=IDS)
def test_the_request_succeeds_without_a_fault(setup, key, case):
    send, status = case
    assert send(setup).status_code == status


def boom(*args: object) -> None:
    raise RecursionError("injected fault")


async def aboom(*args: object) -> None:
    raise RecursionError("injected fault")


@pytest.mark.parametrize(("key", "case"), CASES.items(), ids=IDS)
def test_a_hook_that_raises_fails_closed(setup, monkeypatch, key, case):
    addon, hook = key
    send, _ = case
    guarded = getattr(addon, hook)
    is_async = inspect.iscoroutinefunction(guarded.__wrapped__)
    monkeypatch.setattr(guarded, "__wrapped__", aboom if is_async else boom)
    before = len(setup.backend.seen)
    try:
        answer = send(setup)
    except requests.ConnectionError:
        answer = None  # cut: the gate itself failed, or it was too late to answer
    reached = setup.backend.seen[before:]
    if hook in ("requestheaders", "request"):
        assert reached == [], f"{key} let a request through: {reached}"
    if answer is not None:
        assert answer.status_code == 500, (key, answer.status_code, answer.text)
        assert json.loads(answer.content)["errors"][0]["code"] == "UNKNOWN"
        assert b"secret" not in answer.content


class BrokenDb:
    def __init__(self, fail: Callable[..., None]) -> None:
        self.fail = fail

    def __enter__(self) -> BrokenDb:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, *args: object) -> None:
        self.fail()

    executemany = execute


def test_a_fault_in_the_ledger_never_confirms_a_push(setup, monkeypatch):
    ledger = setup.gw.addon("tenantisolation").ledger

    def broken(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    # The write itself fails inside SQLite: the ledger turns that into LedgerUnavailable.
    monkeypatch.setattr(ledger, "_connection", lambda verify: BrokenDb(broken))
    answer = UPLOAD_END(setup)
    assert answer.status_code == 503
    assert json.loads(answer.content)["errors"][0]["code"] == "UNAVAILABLE"
