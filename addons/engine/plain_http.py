"""Plain HTTP only: a TLS ClientHello on the gateway's port gets a plain `HTTP/1.1 400`.

mitmproxy would answer it with a certificate from its own generated CA and serve the API over
it. A plain 400 answers it instead (as Go's HTTP server does), so TLS-first clients see "server
gave HTTP response to HTTPS client" and fall back to HTTP for an insecure registry. An addon on
mitmproxy's public `next_layer` hook, placed before its NextLayer (addons/gateway/chain.py).
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer

from addons.engine import oci

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
