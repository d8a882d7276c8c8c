"""Answering a request we refuse without ever buffering its body.

mitmproxy reads and buffers the whole body of a flow answered from `requestheaders`, and
crashes a flow that both streams and has a response set there. So a refused request with a
large (or chunked) body is streamed instead, with every chunk discarded, to a tiny local sink
that answers 204 at once; the real refusal replaces that answer in the `response` hook.
Small bodies (≤ 64 KiB declared) are simply answered: buffering them costs nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from addons import oci
from addons.record import record

logger = logging.getLogger(__name__)

SMALL_BODY = 64 * 1024
_KEY = "tabbify.refusal"
_SINK_ANSWER = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


def refuse(flow: http.HTTPFlow, response: http.Response) -> None:
    """Decide to answer `flow` with `response`; Refusals delivers it (call from requestheaders)."""
    flow.metadata[_KEY] = response


def refused(flow: http.HTTPFlow) -> bool:
    return _KEY in flow.metadata


def has_large_body(request: http.Request) -> bool:
    if "transfer-encoding" in request.headers:
        return True
    length = request.headers.get("content-length", "0")
    return not re.fullmatch(r"[0-9]{1,18}", length) or int(length) > SMALL_BODY


def refuse_on_error(flow: http.HTTPFlow) -> None:
    """Call from an `except` block: a bug in a deciding hook refuses the request, never lets
    it through half-decided (mitmproxy would log the exception and go on with the next addon;
    Refusals' deny-by-default is the second line of defence)."""
    logger.exception("gateway error; refusing the request")
    record(flow).decision = "deny:internal-error"
    flow.request.stream = False
    refuse(
        flow,
        oci.error_response(500, "UNKNOWN", "internal gateway error", method=flow.request.method),
    )


def fail_closed(hook: Callable[[Any, http.HTTPFlow], None]) -> Callable[[Any, http.HTTPFlow], None]:
    """Decorator for synchronous deciding hooks: see refuse_on_error."""

    @functools.wraps(hook)
    def guarded(self: Any, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception:
            refuse_on_error(flow)

    return guarded


async def _sink_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Every request we get has `Content-Length: 0` (set below): answer each head with 204."""
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(_SINK_ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


class Refusals:
    """Delivers `refuse()` decisions. Runs after the deciding addons, before the access log."""

    def __init__(self) -> None:
        self.sink: asyncio.Server | None = None
        self.sink_port = 0

    async def running(self) -> None:
        self.sink = await asyncio.start_server(_sink_connection, "127.0.0.1", 0)
        self.sink_port = self.sink.sockets[0].getsockname()[1]

    async def done(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if flow.response is not None:
            return
        if _KEY not in flow.metadata and not rec.allowed and rec.kind != "token":
            # Deny by default: nothing reaches the backend without an explicit allow.
            rec.decision = "deny:undecided"
            refuse(
                flow,
                oci.error_response(
                    500, "UNKNOWN", "request was not decided", method=flow.request.method
                ),
            )
        response = flow.metadata.get(_KEY)
        if response is None:
            return
        if not has_large_body(flow.request):
            flow.request.stream = False  # a flow that streams must never get a response here
            flow.response = response
            return
        # Large body: stream it into the void. The sink sees an empty request and answers at
        # once; mitmproxy keeps reading (and dropping) the client's body chunk by chunk.
        headers = flow.request.headers
        for name in ("transfer-encoding", "expect"):
            headers.pop(name, None)
        headers["content-length"] = "0"
        flow.request.scheme, flow.request.host, flow.request.port = (
            "http",
            "127.0.0.1",
            self.sink_port,
        )
        flow.request.stream = record(flow).discard_in
        response.headers["connection"] = "close"

    def request(self, flow: http.HTTPFlow) -> None:
        # Deny by default for token flows too: they are answered by the gateway, never forwarded.
        if record(flow).kind == "token" and flow.response is None and _KEY not in flow.metadata:
            record(flow).decision = "deny:undecided"
            flow.response = oci.error_response(
                500, "UNKNOWN", "request was not decided", method=flow.request.method
            )

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.metadata.get(_KEY)
        if response is not None and flow.response is not response:
            flow.response = response
