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
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import h11
from h11._readers import ChunkedReader
from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import _http1

from addons import oci

MAX_HEAD = 1 << 20  # as Go's http.DefaultMaxHeaderBytes
MAX_CHUNK_LINE = 64 * 1024  # a chunk-size line (with extensions) or the trailer section
READ_SIZE = 256 * 1024
MITMPROXY_READ = 65535  # what mitmproxy's ConnectionHandler asks for

_read_headers = _http1.Http1Server.read_headers
_make_body_reader = _http1.make_body_reader
_stream_read = asyncio.StreamReader.read


def read_headers(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    yield from _read_headers(self, event)
    for _ in range(4):  # parse what is buffered after leading empty lines
        if not (
            self.state == self.read_headers and self.buf and isinstance(event, events.DataReceived)
        ):
            break
        before = len(self.buf)
        yield from _read_headers(self, events.DataReceived(self.conn, b""))
        if len(self.buf) == before:
            break
    if self.state == self.read_headers and len(self.buf) > MAX_HEAD:
        self.buf = type(self.buf)()  # drop it now (and keep mitmproxy's close-time log small)
        yield commands.SendData(
            self.conn, oci.protocol_error_response(431, "request head too large")
        )
        yield commands.CloseConnection(self.conn)
        self.state = self.done


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


def apply() -> None:
    _http1.make_error_response = oci.protocol_error_response
    _http1.Http1Server.read_headers = read_headers  # type: ignore[method-assign]
    _http1.make_body_reader = make_body_reader
    asyncio.StreamReader.read = read_larger  # type: ignore[method-assign]


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
