"""Patches to mitmproxy 12.3.1's HTTP/1 engine, applied once by the gateway process.

mitmproxy is pinned (pyproject.toml) because of these; each is covered by end-to-end tests
(tests/test_e2e_hostile.py, test_e2e_lifecycle.py) that fail without it.

1. Error pages: mitmproxy answers malformed requests and an unreachable backend with HTML that
   no hook can restyle, quoting its own internals. We answer OCI JSON (`oci.protocol_error`).
2. Bounded heads: mitmproxy buffers a request head, and h11 a chunk-size line, without limit
   (mitmproxy's own "FIXME: protect against header size DoS"): 1 MiB head, 64 KiB chunk line.
3. A leading empty line before the request line is ignored (RFC 9112 §2.2) instead of leaving
   the client waiting: h11 drops one such line per call and mitmproxy then waits for more data.
4. Reads of up to 256 KiB instead of 64 KiB: every read is one trip through mitmproxy's
   layers and our hooks, and pulls were bound by that per-read work. Measured (1 GiB, same
   session, ratio to direct): 64 KiB push 1.03-1.10x / pull 0.41-0.49x; 1 MiB push 0.79x /
   pull 0.48-0.62x; 256 KiB push 0.85-0.88x / pull 0.53-0.66x. Memory stays bounded.
5. Plain HTTP only (the `PlainHttpOnly` addon, placed before mitmproxy's NextLayer): mitmproxy
   would answer a TLS ClientHello on the plain port with a certificate from its own generated
   CA and serve the API over it. A plain `HTTP/1.1 400` answers it instead (as Go's HTTP
   server does), so TLS-first clients see "server gave HTTP response to HTTPS client" and fall
   back to HTTP for an insecure registry (see `RefuseTls`).
6. Header fields as the backend reads them: at most MAX_HEADERS (431 above; mitmproxy has no
   limit and some of its lookups are quadratic in the count), names that are RFC 9110 tokens,
   values without control characters. mitmproxy keeps an obs-fold continuation inside the
   value ("a\r\n b") where Go joins it with a space: a folded or CR-bearing value is 400.
7. Error answers to HEAD requests carry no body (mitmproxy's would desynchronise the client's
   keep-alive connection when the backend is down), and always a complete OCI answer.
8. Connection lifetimes (addons/connections.py): every Http1Server layer is tracked so that a
   head that does not complete in time (408) and an idle keep-alive connection are closed,
   and `handle_stream` admits a new connection only under the connection caps.
10. Body bytes of a message with a Content-Length pass straight through: h11's buffer would
   copy each chunk three times (append, a slice only to test emptiness, extract) and
   mitmproxy once more. A chunk that arrives with nothing buffered before it is handed on as
   it is; anything else (a buffered remainder, the message's end, a pipelined next message)
   takes mitmproxy's own path. Measured on large pulls (see README, Benchmarks).
9. Several worker processes on one port: the listening socket is bound with SO_REUSEPORT
   (the kernel spreads new connections over the workers) and a deeper accept backlog.
   `run` checks the port is free before it starts them, so another program's socket is never
   shared by accident.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Generator
from typing import Any

import h11
from h11._readers import ChunkedReader, ContentLengthReader
from mitmproxy import http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, mode_servers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import RequestHeaders, ResponseProtocolError

from addons import connections, dispatch, oci

MAX_HEAD = 1 << 20  # as Go's http.DefaultMaxHeaderBytes
MAX_HEADERS = 100  # registry clients send fewer than 20
MAX_CHUNK_LINE = 64 * 1024  # a chunk-size line (with extensions) or the trailer section
READ_SIZE = 256 * 1024
MITMPROXY_READ = 65535  # what mitmproxy's ConnectionHandler asks for

_handle_event = _http1.Http1Connection._handle_event
_read_headers = _http1.Http1Server.read_headers
_server_init = _http1.Http1Server.__init__
_server_send = _http1.Http1Server.send
_mark_done = _http1.Http1Connection.mark_done
_make_body_reader = _http1.make_body_reader
_stream_read = asyncio.StreamReader.read
_handle_stream = mode_servers.ServerInstance.handle_stream
_listen = mode_servers.AsyncioServerInstance.listen
BACKLOG = 1024

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than HTAB


def head_problem(request: http.Request) -> tuple[int, str] | None:
    """Why a parsed request head must not go further (status, message), or None."""
    fields = request.headers.fields
    if len(fields) > MAX_HEADERS:
        return 431, f"more than {MAX_HEADERS} header fields"
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return 400, "invalid header field name"
        if _BAD_VALUE.search(value):
            return 400, "invalid header field value (control character or line folding)"
    return None


def _refuse_head(self: Any, status: int, message: str) -> Generator[Any, Any, None]:
    self.buf = type(self.buf)()  # drop it now (and keep mitmproxy's close-time log small)
    code = "SIZE_INVALID" if status == 431 else "UNSUPPORTED"
    yield commands.SendData(self.conn, oci.wire_error(status, code, message))
    yield commands.CloseConnection(self.conn)
    self.state = self.done


def _checked_read_headers(self: Any, event: events.Event) -> Generator[Any, Any, bool]:
    """mitmproxy's head parser, stopped at a head that fails `head_problem`. True = refused."""
    for command in _read_headers(self, event):
        if isinstance(command, ReceiveHttp) and isinstance(command.event, RequestHeaders):
            problem = head_problem(command.event.request)
            if problem is not None:
                yield from _refuse_head(self, *problem)
                return True
            connections.head_done(self)
        yield command
    return False


def read_headers(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    if isinstance(event, events.DataReceived):
        connections.head_bytes(self)
    if (yield from _checked_read_headers(self, event)):
        return
    for _ in range(4):  # parse what is buffered after leading empty lines
        if not (
            self.state == self.read_headers and self.buf and isinstance(event, events.DataReceived)
        ):
            break
        before = len(self.buf)
        if (yield from _checked_read_headers(self, events.DataReceived(self.conn, b""))):
            return
        if len(self.buf) == before:
            break
    if self.state == self.read_headers and len(self.buf) > MAX_HEAD:
        yield from _refuse_head(self, 431, "request head too large")


def handle_event(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    """Content-Length body bytes straight through, when nothing is buffered before them."""
    reader = getattr(self, "body_reader", None)
    if (
        isinstance(event, events.DataReceived)
        and isinstance(reader, ContentLengthReader)
        and event.data
        and not self.buf
        and reader._remaining > 0
        and self.state == self.read_body
    ):
        data = event.data
        take = min(len(data), reader._remaining)
        reader._remaining -= take
        chunk = data[:take] if take < len(data) else data
        yield ReceiveHttp(self.ReceiveData(self.stream_id, chunk))
        if reader._remaining == 0:  # the message's end (and whatever follows): mitmproxy's path
            yield from _handle_event(self, events.DataReceived(self.conn, data[take:]))
        return
    yield from _handle_event(self, event)


def server_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _server_init(self, *args, **kwargs)
    connections.track(self)


def mark_done(self: Any, **kwargs: bool) -> Generator[Any, Any, None]:
    yield from _mark_done(self, **kwargs)
    if isinstance(self, _http1.Http1Server) and self.state == self.read_headers:
        connections.waiting(self)


def server_send(self: Any, event: Any) -> Generator[Any, Any, None]:
    """mitmproxy's own error answers (backend unreachable, …) as complete OCI answers, with
    no body for HEAD."""
    if (
        isinstance(event, ResponseProtocolError)
        and not self.response
        and self.conn.state & ConnectionState.CAN_WRITE
        and (status := event.code.http_status_code()) is not None
    ):
        method = self.request.method if self.request else "GET"
        yield commands.SendData(
            self.conn, oci.protocol_error_response(status, event.message, method=method)
        )
        yield commands.CloseConnection(self.conn)
        return
    yield from _server_send(self, event)


async def listen(self: Any, host: str, port: int) -> list[Any]:
    """TCP: bound with SO_REUSEPORT, so that every gateway worker listens on the same port."""
    if self.mode.transport_protocol != "tcp" or port == 0:
        return await _listen(self, host, port)
    server = await asyncio.start_server(
        self.handle_stream, host, port, reuse_port=True, backlog=BACKLOG
    )
    return [server]


async def handle_stream(self: Any, reader: Any, writer: Any = None) -> None:
    """Admit a client connection only under the caps; beyond them, a short 503 and close."""
    if not connections.admit(writer):
        return
    try:
        await _handle_stream(self, reader, writer)
    except asyncio.CancelledError:
        pass  # shutdown: nothing awaits this task (and Python 3.12.1 would log it as an error)
    finally:
        connections.release(writer)


class BoundedChunkedReader(ChunkedReader):
    def __call__(self, buf: Any) -> Any:
        event = super().__call__(buf)
        if event is None and len(buf) > MAX_CHUNK_LINE:  # still waiting for a line
            raise h11.RemoteProtocolError("chunk line too long")
        return event


def make_body_reader(expected_size: int | None) -> Any:
    return BoundedChunkedReader() if expected_size is None else _make_body_reader(expected_size)


async def read_larger(self: asyncio.StreamReader, n: int = -1) -> bytes:
    if n == MITMPROXY_READ:
        self._limit = max(self._limit, READ_SIZE)  # type: ignore[attr-defined]
        n = READ_SIZE
    return await _stream_read(self, n)


_applied = False


def apply() -> None:
    """Patch mitmproxy's engine once per process (the gateway; in-process tests)."""
    global _applied
    if _applied:
        return
    _applied = True
    dispatch.apply()  # hook dispatch without mitmproxy's per-call overhead
    _http1.make_error_response = oci.protocol_error_response
    _http1.Http1Server.__init__ = server_init  # type: ignore[method-assign]
    _http1.Http1Connection._handle_event = handle_event  # type: ignore[method-assign]
    _http1.Http1Server.read_headers = read_headers  # type: ignore[method-assign]
    _http1.Http1Server.send = server_send  # type: ignore[method-assign]
    _http1.Http1Connection.mark_done = mark_done  # type: ignore[method-assign]
    _http1.make_body_reader = make_body_reader
    asyncio.StreamReader.read = read_larger  # type: ignore[method-assign]
    mode_servers.ServerInstance.handle_stream = handle_stream  # type: ignore[method-assign]
    mode_servers.AsyncioServerInstance.listen = listen  # type: ignore[method-assign]


TLS_LINGER = 2.0  # seconds to wait for the client to close after the answer


def _tls_refusal() -> bytes:
    body = oci.error_body(
        "UNSUPPORTED", "this registry port speaks plain HTTP, not TLS: use http:// (insecure)"
    )
    response = http.Response.make(
        400,
        body,
        {
            "Content-Type": "application/json",
            "Connection": "close",
            oci.API_VERSION_HEADER[0]: oci.API_VERSION_HEADER[1],
        },
    )
    return http1.assemble_response(response)


TLS_REFUSAL = _tls_refusal()


class RefuseTls(layer.Layer):
    """Answers a TLS ClientHello with a plain `HTTP/1.1 400` and closes the connection.

    Go's HTTP client (Docker, containerd, containers/image) tries TLS first and falls back to
    plain HTTP for an insecure registry only when the server answers in HTTP ("http: server
    gave HTTP response to HTTPS client", which is also the message a user who forgot
    `--tls-verify=false` sees); a bare close is "EOF", which `docker manifest` does not retry
    over HTTP. After the answer only our side is closed, so a ClientHello still arriving is
    not answered with a reset that could discard the answer; the rest closes when the client
    does, or after `TLS_LINGER` seconds.
    """

    closed = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        client = self.context.client
        if isinstance(event, events.Start):
            yield commands.SendData(client, TLS_REFUSAL)
            yield commands.CloseTcpConnection(client, half_close=True)
            yield commands.RequestWakeup(TLS_LINGER)
        elif isinstance(event, events.ConnectionClosed | events.Wakeup) and not self.closed:
            self.closed = True
            yield commands.CloseConnection(client)
        # DataReceived (the rest of the ClientHello): discarded


class PlainHttpOnly:
    """No TLS on the gateway's port: on the mesh, WireGuard is the encryption."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is None and starts_like_tls_record(nextlayer.data_client()):
            nextlayer.layer = RefuseTls(nextlayer.context)
