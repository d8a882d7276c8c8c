"""Large response bodies spliced in the kernel (addons/engine/splice.py): the client gets exactly
the backend's bytes, and every way a splice can end leaves nothing behind.

The gateway's real engine in-process (tests/support/inproc.py, anonymous mode) in front of a
backend on a raw socket that answers as each test scripts it: a body cut short, bytes beyond
the Content-Length, a chunked body. Distribution cannot be made to misbehave on demand; the
e2e test of real pulls through the whole stack is tests/e2e/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from h11._readers import ContentLengthReader
from mitmproxy import options
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.test import tflow

from addons.engine import splice
from tests.support.inproc import InProcessGateway
from tests.support.listener import serve_each
from tests.support.rawhttp import Conn
from tests.support.stack import wait_for

MIB = 1 << 20
BLOB = "/v2/acme/app/blobs/sha256:" + "a" * 64


@functools.lru_cache(maxsize=4)
def body(size: int) -> bytes:
    """`size` bytes that differ everywhere (a shifted or repeated slice would not match).
    Made once per size: making 256 MiB holds the GIL for a second or more, which the
    in-process gateway shares (a test's deadline must not count it)."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.sha256(block.to_bytes(8, "big")).digest() * 1024
        block += 1
    return bytes(out[:size])


@dataclass
class Script:
    """How the backend answers the next GET: a body of `size` bytes, of which it sends `send`
    (then closes), or all of it and `extra` bytes beyond; `chunked` frames it so."""

    size: int
    send: int | None = None
    extra: bytes = b""
    chunked: bool = False


class ScriptedBackend:
    def __init__(self) -> None:
        self.script = Script(0)
        self.accepted = 0
        self.open: set[socket.socket] = set()
        self.sock = serve_each(self._answer)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _answer(self, conn: socket.socket) -> None:
        self.accepted += 1
        self.open.add(conn)
        f = conn.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = f.readline()
                    if not line:
                        return
                    head += line
                s = self.script
                data = body(s.size)
                if s.chunked:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for i in range(0, len(data), MIB):
                        piece = data[i : i + MIB]
                        conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    conn.sendall(b"0\r\n\r\n")
                    continue
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: %d\r\n\r\n" % s.size
                )
                if s.send is not None:
                    conn.sendall(data[: s.send])
                    return
                conn.sendall(data + s.extra)
        except OSError:
            return
        finally:
            f.close()
            conn.close()
            self.open.discard(conn)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def backend() -> Iterator[ScriptedBackend]:
    b = ScriptedBackend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def gw(backend: ScriptedBackend) -> Iterator[InProcessGateway]:
    with InProcessGateway(backend.url, anonymous=True) as gateway:
        yield gateway


def spliced(gw: InProcessGateway) -> int:
    return gw.addon("accesslog").metrics.spliced


def settled(gw: InProcessGateway) -> int:
    """spliced(gw) once the flows of earlier tests have ended (a flow's count is added when
    it ends, which may come after its client has read the last byte)."""
    seen = [spliced(gw), time.monotonic()]

    def still() -> bool:
        now = spliced(gw)
        if now != seen[0]:
            seen[:] = [now, time.monotonic()]
        return time.monotonic() - seen[1] > 0.3

    wait_for(still, timeout=5)
    return seen[0]


def get(conn: Conn, path: str = BLOB) -> None:
    conn.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def to_body(conn: Conn) -> None:
    """GET the blob, check the answer is a 200 and read past its head: the body comes next."""
    get(conn)
    assert conn.file.readline().startswith(b"HTTP/1.1 200")
    while conn.file.readline() != b"\r\n":
        pass


def pull(gw: InProcessGateway) -> bytes:
    """The blob's body, over a connection of its own."""
    conn = Conn(gw.port)
    try:
        get(conn)
        answer = conn.read_answer()
    finally:
        conn.close()
    assert answer is not None and answer.status == 200
    return answer.body


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_large_body_is_spliced_and_arrives_whole(gw, backend):
    backend.script = Script(24 * MIB)
    before = settled(gw)
    conn = Conn(gw.port)
    try:
        get(conn)
        answer = conn.read_answer()
        assert answer is not None and answer.status == 200
        assert answer.body == body(24 * MIB)
        # Most of it went through the kernel; the first reads take the usual path.
        wait_for(lambda: spliced(gw) - before > 20 * MIB, timeout=5)
        # The same connection goes on: the layers saw the body's end.
        get(conn)
        again = conn.read_answer()
        assert again is not None and again.status == 200 and again.body == body(24 * MIB)
    finally:
        conn.close()
    wait_for(lambda: spliced(gw) - before > 40 * MIB, timeout=5)


def test_a_slow_reader_gets_every_byte(gw, backend):
    backend.script = Script(8 * MIB)
    conn = Conn(gw.port)
    try:
        to_body(conn)
        got = bytearray()
        while len(got) < 8 * MIB:
            got += conn.file.read1(64 * 1024)
            time.sleep(0.001)  # the gateway's side of the socket fills, and it must wait
        assert bytes(got) == body(8 * MIB)
    finally:
        conn.close()


def test_a_backend_that_closes_mid_body_closes_the_client_connection(gw, backend):
    backend.script = Script(16 * MIB, send=6 * MIB)
    fds = open_fds()
    conn = Conn(gw.port, timeout=10)
    try:
        to_body(conn)
        # To the close: never a hang; what the backend sent, and nothing more.
        assert conn.file.read() == body(6 * MIB)
    finally:
        conn.close()
    wait_for(lambda: open_fds() <= fds, timeout=5)
    backend.script = Script(2 * MIB)  # the gateway serves on
    assert pull(gw) == body(2 * MIB)


def test_a_client_that_leaves_mid_body_frees_the_backend_connection(gw, backend):
    backend.script = Script(64 * MIB)
    fds = open_fds()
    conn = Conn(gw.port)
    get(conn)
    line = conn.file.readline()
    assert line.startswith(b"HTTP/1.1 200")
    conn.sock.recv(2 * MIB)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()  # a reset, with most of the body still to come
    # The backend's connection is closed by the gateway (the backend stops sending), and
    # nothing the splice opened is left.
    wait_for(lambda: not backend.open, timeout=10)
    wait_for(lambda: open_fds() <= fds, timeout=5)


def test_bytes_beyond_the_content_length_never_reach_the_client(gw, backend):
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged"
    backend.script = Script(4 * MIB, extra=smuggled)
    conn = Conn(gw.port)
    try:
        get(conn)
        answer = conn.read_answer()
        assert answer is not None and answer.body == body(4 * MIB)
        backend.script = Script(2 * MIB)
        get(
            conn
        )  # on the same connection: the next answer is the backend's next, not the forged one
        answer = conn.read_answer()
        assert answer is None or answer.body == body(2 * MIB)
    finally:
        conn.close()


def test_what_is_not_a_plain_content_length_body_is_not_spliced(gw, backend):
    before = settled(gw)
    for script in (Script(4 * MIB, chunked=True), Script(splice.MIN_BYTES // 2)):
        backend.script = script
        assert pull(gw) == body(script.size)
    assert settled(gw) == before


def test_a_client_that_stops_reading_is_cut_off_by_the_inactivity_timeout(backend):
    """A splice waiting on a client that reads nothing is not activity: mitmproxy's
    `tcp_timeout` closes the connection as it would without the splice."""
    backend.script = Script(256 * MIB)
    body(256 * MIB)  # made before the clock runs
    with InProcessGateway(backend.url, anonymous=True, extra=("tcp_timeout=2",)) as gw:
        before = settled(gw)
        conn = Conn(gw.port)
        try:
            get(conn)
            assert conn.file.readline().startswith(b"HTTP/1.1 200")
            conn.file.read1(MIB)
            started = time.monotonic()
            # The gateway spliced what the sockets hold, then waits on this client.
            wait_for(lambda: not backend.open, timeout=15)
            assert 1.5 < time.monotonic() - started < 10
            assert 0 < settled(gw) - before < 128 * MIB
        finally:
            conn.close()


def test_the_splice_starts_only_once_the_client_buffer_is_out():
    """`_empty` waits until asyncio's write buffer is empty (its low-water mark is not
    enough: spliced bytes would overtake what waits there), then puts the limits back."""

    async def main() -> None:
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.setblocking(False)
        _, writer = await asyncio.open_connection(sock=ours)
        limits = writer.transport.get_write_buffer_limits()
        writer.write(b"x" * MIB)  # the peer reads nothing yet: most of it stays in asyncio
        assert writer.transport.get_write_buffer_size() > 0
        waiting = asyncio.ensure_future(splice._empty(writer))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        got = 0
        while not waiting.done():
            try:
                got += len(peer.recv(1 << 16))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await waiting
        assert writer.transport.get_write_buffer_size() == 0
        assert writer.transport.get_write_buffer_limits() == limits
        writer.close()
        peer.close()

    asyncio.run(main())


def test_an_error_in_the_splice_ends_the_flow_and_the_connection(gw, backend, monkeypatch):
    def unforeseen(*args: object) -> None:
        raise RuntimeError("a splice path nobody foresaw")

    monkeypatch.setattr(splice, "_open", unforeseen)
    backend.script = Script(8 * MIB)
    conn = Conn(gw.port, timeout=10)
    try:
        to_body(conn)
        got = conn.file.read()  # a short body and a close, never a hang
        assert len(got) < 8 * MIB and got == body(8 * MIB)[: len(got)]
    finally:
        conn.close()
    wait_for(lambda: not backend.open, timeout=5)


def client_layer(size: int = 8 * MIB, passed: int = 256 * 1024) -> Any:
    """An Http1Client in the middle of an answer's body, as the engine leaves it."""
    flow = tflow.tflow(resp=True)
    opts = options.Options()
    opts.add_option("store_streamed_bodies", bool, False, "as mitmproxy's proxyserver adds it")
    context = Context(flow.client_conn, opts)
    context.server = flow.server_conn
    layer = _http1.Http1Client(context)
    layer.request, layer.response = flow.request, flow.response
    layer.request.method = "GET"
    layer.response.headers["content-length"] = str(size)
    layer.response.stream = splice.PassThrough(lambda n: None)
    layer.response.stream(b"x" * passed)
    layer.body_reader = ContentLengthReader(size)
    layer.body_reader._remaining = size - passed
    layer.state = layer.read_body
    return layer


@pytest.mark.parametrize(
    "change",
    [
        lambda layer: setattr(layer.request, "method", "HEAD"),
        lambda layer: setattr(layer.response, "stream", lambda chunk: chunk),  # an addon reads
        lambda layer: setattr(layer.response, "stream", True),
        lambda layer: layer.response.headers.__setitem__("content-length", "9"),  # rewritten
        lambda layer: layer.response.headers.__setitem__("transfer-encoding", "chunked"),
        lambda layer: setattr(layer.body_reader, "_remaining", splice.MIN_BYTES - 1),
        lambda layer: layer.buf.__iadd__(b"x"),  # bytes already buffered in the layer
        lambda layer: setattr(layer.conn, "tls", True),
        lambda layer: setattr(layer.context.client, "tls", True),
        lambda layer: setattr(layer.context.client, "alpn", b"h2"),
        lambda layer: setattr(layer.context.options, "store_streamed_bodies", True),
        lambda layer: setattr(layer, "state", layer.read_headers),
    ],
)
def test_a_body_is_spliced_only_when_nothing_can_differ(change):
    layer = client_layer()
    assert splice.ready(layer) == 8 * MIB - 256 * 1024
    change(layer)
    assert splice.ready(layer) == 0


def test_nothing_is_spliced_before_the_first_bytes_went_through_the_stream():
    """Until then the head may still wait in a paused layer (a hook not done)."""
    layer = client_layer(passed=0)
    assert splice.ready(layer) == 0


def test_where_splice_is_refused_the_body_takes_the_usual_path(gw, backend, monkeypatch):
    """A sandbox or seccomp profile without splice(2) for sockets: the pull still works, through
    the engine, and no later body tries again."""
    calls = []

    def refused(*args: object, **kw: object) -> int:
        calls.append(args)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "splice", refused)
    monkeypatch.setattr(splice, "available", True)
    backend.script = Script(8 * MIB)
    before = settled(gw)
    for _ in range(2):
        assert pull(gw) == body(8 * MIB)
    assert len(calls) == 1 and splice.available is False
    assert settled(gw) == before


def test_beyond_the_splices_a_worker_holds_at_once_bodies_take_the_usual_path(
    gw, backend, monkeypatch
):
    """Each splice holds four descriptors, which the connection caps leave room for only up
    to MAX_ACTIVE splices: more large pulls at once are carried by the engine."""
    monkeypatch.setattr(splice, "MAX_ACTIVE", 0)
    backend.script = Script(8 * MIB)
    before = settled(gw)
    assert pull(gw) == body(8 * MIB)
    assert settled(gw) == before
    assert splice.active == 0
