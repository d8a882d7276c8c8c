"""clients/backend.py against a real local HTTP server: credential, bounds, timeouts, redirects,
paging, and the one "cannot answer" outcome."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from addons.clients import backend, backend_credential

AUTH = backend_credential.authorization("tabbify-registry:secret")


class Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        Handler.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        path = self.path
        if path == "/v2/":
            self._send(200, b"{}")
        elif path == "/huge" or path.startswith("/v2/big/"):  # 8 MiB, without a length
            self.send_response(200)
            self.end_headers()
            for _ in range(128):
                self.wfile.write(b"x" * 65536)
        elif path == "/trickle":  # one byte every 0.1 s, for a minute
            self.send_response(200)
            self.send_header("Content-Length", "600")
            self.end_headers()
            for _ in range(600):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/silent":  # headers never come
            time.sleep(30)
        elif path == "/redirect":
            self._send(302, b"", Location="http://127.0.0.1:1/elsewhere")
        elif path.startswith("/v2/_catalog"):
            if "last=b" in path:
                self._send(200, b'{"repositories": ["c"]}')
            elif "last=a" in path:
                self._send(200, b'{"repositories": ["b"]}', Link="</v2/_catalog?last=b>; rel=next")
            else:
                self._send(200, b'{"repositories": ["a"]}', Link="</v2/_catalog?last=a>; rel=next")
        elif path.startswith("/v2/away/tags/list"):
            self._send(200, b'{"tags": ["t"]}', Link="<http://127.0.0.1:1/v2/x>; rel=next")
        else:
            self._send(404, b"")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_every_request_carries_the_runs_credential(server: str) -> None:
    Handler.seen.clear()
    client = backend.Client(server, authorization=AUTH)
    assert client.get("/v2/", 100).status == 200
    assert asyncio.run(_async_get(server, "/v2/", 100)).status == 200
    assert [s["authorization"] for s in Handler.seen] == [AUTH, AUTH]
    assert all(s["accept-encoding"] == "identity" for s in Handler.seen)


def test_the_process_credential_is_the_default(server: str, monkeypatch) -> None:
    monkeypatch.setattr(backend_credential, "_current", AUTH)
    Handler.seen.clear()
    backend.Client(server).get("/v2/", 100)
    assert Handler.seen[-1]["authorization"] == AUTH


async def _async_get(base: str, path: str, limit: int, **kw: float) -> backend.Answer:
    client = backend.AsyncClient(base, authorization=AUTH, **kw)
    try:
        return await client.get(path, limit)
    finally:
        await client.close()


def test_a_body_over_its_bound_is_refused_not_read(server: str) -> None:
    client = backend.Client(server, authorization=AUTH)
    with pytest.raises(backend.TooLarge):
        client.get("/huge", backend.MAX_MANIFEST)
    with pytest.raises(backend.TooLarge):
        asyncio.run(_async_get(server, "/huge", backend.MAX_MANIFEST))
    assert len(client.get("/huge", 16 << 20).body) == 8 << 20  # within the bound: read


def test_a_trickling_answer_ends_at_the_deadline(server: str) -> None:
    client = backend.Client(server, authorization=AUTH, timeout=2, deadline=1.0)
    start = time.monotonic()
    with pytest.raises(backend.Unavailable, match="too slow"):
        client.get("/trickle", 1000)
    assert time.monotonic() - start < 3
    start = time.monotonic()
    with pytest.raises(backend.Unavailable, match="too slow"):
        asyncio.run(_async_get(server, "/trickle", 1000, timeout=2, deadline=1.0))
    assert time.monotonic() - start < 3


def test_a_silent_backend_times_out_as_unavailable(server: str) -> None:
    client = backend.Client(server, authorization=AUTH, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(backend.Unavailable) as e:
        client.get("/silent", 100)
    assert e.value.status is None and time.monotonic() - start < 3
    with pytest.raises(backend.Unavailable):
        asyncio.run(_async_get(server, "/silent", 100, timeout=0.5))


def test_an_unreachable_backend_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with pytest.raises(backend.Unavailable):
        backend.Client(f"http://127.0.0.1:{port}", authorization=AUTH).get("/v2/", 10)
    with pytest.raises(backend.Unavailable):
        asyncio.run(_async_get(f"http://127.0.0.1:{port}", "/v2/", 10))


def test_redirects_are_answers_never_followed(server: str) -> None:
    answer = backend.Client(server, authorization=AUTH).get("/redirect", 100)
    assert answer.status == 302
    with pytest.raises(backend.Unavailable) as e:
        answer.expect(200)
    assert e.value.status == 302


def test_listings_follow_next_pages_on_the_backend_only(server: str) -> None:
    client = backend.Client(server, authorization=AUTH)
    assert list(client.pages("/v2/_catalog?n=1", "repositories")) == ["a", "b", "c"]
    assert list(client.pages("/v2/away/tags/list", "tags")) == ["t"]  # the link elsewhere ends it
    assert list(client.pages("/v2/none/tags/list", "tags")) == []  # 404: empty


def test_gc_never_reads_a_manifest_over_the_bound(server: str) -> None:
    """gc read the backend's answers whole (requests' `.content`); now within 4 MiB."""
    from addons.cli import gc

    with pytest.raises(backend.TooLarge):
        gc.Backend(server).manifest("big/app", "v1")


def test_a_proxy_in_the_environment_is_not_used(server: str, monkeypatch) -> None:
    """The backend is asked directly, whatever HTTP_PROXY says (httpx follows it by default)."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert backend.Client(server, authorization=AUTH).get("/v2/", 100).status == 200
