"""Whatever ends a flow, nothing a client sends leaves per-flow state behind.

The gateway's real engine in-process (tests/support/inproc.py, anonymous mode) in front of a backend
that takes every request and never answers. An exception inside mitmproxy's HTTP/1 layer (here
made to happen: the chunked body reader raises) used to be logged as "mitmproxy has crashed!"
and nothing else: no answer, the connection left open, no `error` hook, so the write stayed
counted in flight and every `gc` waited for it. And the freeze's count itself must drop a
flow that cannot act any more even when no hook said it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from mitmproxy.test import tflow

from addons.engine import connections, hardening
from addons.engine.framing import MAX_HEAD
from addons.gateway.freeze import WriteFreeze
from tests.support.inproc import InProcessGateway
from tests.support.listener import serve_each
from tests.support.rawhttp import Conn
from tests.support.stack import wait_for

MIB = 1 << 20


class SilentBackend:
    """Accepts connections, reads whatever comes, never answers."""

    def __init__(self) -> None:
        self.conns: list[socket.socket] = []
        self.sock = serve_each(self._drain)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _drain(self, conn: socket.socket) -> None:
        self.conns.append(conn)
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture(scope="module")
def gw() -> Iterator[InProcessGateway]:
    backend = SilentBackend()
    with InProcessGateway(backend.url, anonymous=True) as gateway:
        yield gateway
    backend.close()


def test_an_exception_in_the_engine_answers_400_and_ends_the_flow(gw, monkeypatch):
    def unforeseen(self: object, buf: object) -> None:
        raise RuntimeError("an engine path nobody foresaw")

    monkeypatch.setattr(hardening.BoundedChunkedReader, "__call__", unforeseen)
    freeze = gw.addon("writefreeze")
    conn = Conn(gw.port, timeout=5.0)
    try:
        started = time.monotonic()
        conn.send(
            b"PATCH /v2/acme/app/blobs/uploads/u HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        answer = conn.read_answer()
        assert answer is not None and answer.status == 400, answer
        assert answer.header("connection") == "close"
        assert b'"UNSUPPORTED"' in answer.body
        assert time.monotonic() - started < 2.0
        assert conn.closed()
    finally:
        conn.close()
    # The flow ended through mitmproxy's error hook: not one write left in flight.
    wait_for(lambda: freeze.in_flight() == 0, 3)


def counted_flow(freeze: WriteFreeze, age: float = 0.0, closed_ago: float | None = None):
    flow = tflow.tflow()
    flow.live = True
    flow.timestamp_created = time.time() - age
    flow.client_conn.timestamp_end = None if closed_ago is None else time.time() - closed_ago
    freeze._in_flight[flow.id] = (flow, frozenset(), None)  # as _admit records a write
    return flow


def test_the_freeze_stops_counting_a_flow_that_cannot_act_any_more():
    """No `response`/`error` hook for any of these flows: the count still drops."""
    freeze = WriteFreeze()
    counted_flow(freeze)  # a write going on
    counted_flow(freeze, closed_ago=1.0)  # its client just left: the backend may finish it
    assert freeze.in_flight() == 2
    counted_flow(freeze, closed_ago=connections.CLOSED_GRACE + 1)  # client gone for good
    counted_flow(freeze, age=connections.MAX_FLOW_AGE + 1)  # held by a client for too long
    done = counted_flow(freeze)
    done.live = False  # mitmproxy finished it
    assert freeze.in_flight() == 2


def test_a_client_flooding_during_its_answer_is_closed_with_the_buffer_bounded(gw):
    """Bytes sent while an answer is still to come (the backend here never answers) wait in
    the engine's buffer: beyond a request head's worth, the connection is closed."""
    conn = Conn(gw.port, timeout=5.0)
    try:
        conn.send(b"GET /v2/acme/app/blobs/sha256:" + b"a" * 64 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: any(s.state == s.wait for s in connections.servers.values()), 3)
        sent = 0
        while sent < 64 * MIB and conn.send(b"x" * MIB):
            sent += MIB
            assert all(len(s.buf) <= MAX_HEAD for s in connections.servers.values())
        assert sent < 16 * MIB  # refused soon after the bound, not after the whole flood
        assert conn.closed()
    finally:
        conn.close()


class CountingBackend:
    """Answers a chunked PATCH with 202 once its body has come whole; counts the bytes."""

    def __init__(self) -> None:
        self.received = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PATCH(self) -> None:
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    outer.received += len(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class SlowHeads:
    """A request hook that takes a while (a GC freeze, a quota waiting for room)."""

    async def requestheaders(self, flow: Any) -> None:
        if flow.request.method == "PATCH":
            await asyncio.sleep(1.5)


def test_a_body_sent_during_a_slow_hook_waits_in_the_kernel_not_in_memory():
    """While a hook runs, the engine does not read its client: the client's sends block once
    the sockets' buffers are full (before, 1.2 GB were held in 3.5 s), and the body then
    arrives whole."""
    backend = CountingBackend()
    with InProcessGateway(backend.url, anonymous=True) as gw:
        gw.loop.call_soon_threadsafe(gw.master.addons.add, SlowHeads())
        wait_for(lambda: gw.addon("slowheads") is not None, 3)
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(
            b"PATCH /v2/acme/app/blobs/uploads/u1 HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (MIB, b"x" * MIB)
        sock.settimeout(0.5)
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < 256:
                sock.sendall(chunk)
                sent += 1
        assert sent < 32, f"{sent} MiB taken in while the hook ran"
        sock.settimeout(30)
        for _ in range(sent, 40):  # the hook is done: the rest flows
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
        assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 202")
        sock.close()
        assert backend.received == 40 * MIB
    backend.server.shutdown()
