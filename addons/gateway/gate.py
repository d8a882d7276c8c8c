"""The gate: after the deciding addons, forward exactly what they decided, or answer.

- Forward: an allowed registry request leaves with the canonical target rebuilt from the
  gateway's own parse (`target.canonical` of the path and the decided parameters): the
  backend never parses bytes the gateway did not.
- Answer: what a deciding addon answers itself (`respond()`: a refusal, a catalog page) is
  delivered without ever buffering a request body. mitmproxy reads and buffers the whole body
  of a flow answered from `requestheaders`, and crashes a flow that both streams and has a
  response set there. So a request answered with a large (or chunked) body is streamed
  instead, every chunk discarded, to a tiny local sink that answers 204 at once; the real
  answer replaces that one in the `response` hook. Small bodies (≤ 64 KiB declared) are
  simply answered: buffering them costs nothing.
- Deny by default: a flow nobody allowed, or one whose checks did not all complete, is refused.

`fail_closed` guards every deciding hook: an exception refuses the flow (or, once it is too
late to answer cleanly, cuts the connection) instead of letting it through half-decided, which
is what mitmproxy does on its own (it logs "Addon error" and runs the next addon).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from addons.clients import backend_credential
from addons.config import mirrors
from addons.decisions import routes, target
from addons.engine import oci
from addons.gateway.record import answered, record, respond

__all__ = ["Gate", "answered", "fail_closed", "has_large_body", "respond"]  # answer helpers

logger = logging.getLogger(__name__)

SMALL_BODY = 64 * 1024
_SINK_ANSWER = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


def has_large_body(request: http.Request) -> bool:
    if "transfer-encoding" in request.headers:
        return True
    length = request.headers.get("content-length", "0")
    return not re.fullmatch(r"[0-9]{1,18}", length) or int(length) > SMALL_BODY


def internal_error(flow: http.HTTPFlow) -> http.Response:
    return oci.error_response(500, "UNKNOWN", "internal gateway error", method=flow.request.method)


def _failed(flow: http.HTTPFlow, phase: str, kill: bool) -> None:
    logger.exception("gateway error in %s; refusing the request", phase)
    record(flow).decision = "deny:internal-error"
    if phase == "requestheaders" and not kill:
        respond(flow, internal_error(flow))  # the gate delivers it, body or not
    elif phase == "request" and not flow.request.stream and not kill:
        flow.response = internal_error(flow)  # body read, nothing forwarded yet
    elif phase == "response" and flow.response is not None and not flow.response.stream:
        flow.response = internal_error(flow)
    else:  # too late for an answer of ours: cut the connection rather than pass anything on
        flow.kill()


def fail_closed(hook: Callable[..., Any] | None = None, *, kill: bool = False) -> Any:
    """Decorator for deciding hooks, sync or async. `kill=True` for the gate's own hooks:
    when the gate itself fails there is nobody left to deliver a refusal.

    The guard calls the hook through its `__wrapped__` attribute, so that a test can replace
    any one hook's body with one that raises (tests/unit/test_fail_closed.py)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def guarded_async(self: Any, flow: http.HTTPFlow) -> None:
                try:
                    await guarded_async.__wrapped__(self, flow)  # type: ignore[attr-defined]
                except Exception:
                    _failed(flow, fn.__name__, kill)

            guarded_async.fail_closed = True  # type: ignore[attr-defined]
            return guarded_async

        @functools.wraps(fn)
        def guarded(self: Any, flow: http.HTTPFlow) -> None:
            try:
                guarded.__wrapped__(self, flow)  # type: ignore[attr-defined]
            except Exception:
                _failed(flow, fn.__name__, kill)

        guarded.fail_closed = True  # type: ignore[attr-defined]
        return guarded

    return wrap(hook) if hook is not None else wrap


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


class Gate:
    """Runs after the deciding addons, before the access log."""

    def __init__(self) -> None:
        self.sink: asyncio.Server | None = None
        self.sink_port = 0

    async def running(self) -> None:
        self.sink = await asyncio.start_server(_sink_connection, "127.0.0.1", 0)
        self.sink_port = self.sink.sockets[0].getsockname()[1]

    async def done(self) -> None:
        if self.sink is not None:
            self.sink.close()

    @fail_closed(kill=True)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if flow.response is not None:
            return
        if not answered(flow) and not rec.allowed and rec.kind != "token":
            # Deny by default: nothing reaches the backend without an explicit allow.
            rec.decision = "deny:undecided"
            respond(flow, internal_error(flow))
        response = rec.answer
        if response is None:
            if rec.kind == "registry":
                self.forward(flow)
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
        flow.request.stream = rec.discard_in
        response.headers["connection"] = "close"

    @staticmethod
    def forward(flow: http.HTTPFlow) -> None:
        """The request target the backend gets: rebuilt from the decided path and params."""
        rec = record(flow)
        if rec.target is None:
            raise RuntimeError("an allowed registry request without a parsed target")
        if rec.holds and flow.request.stream:
            raise RuntimeError("a request with checks pending must be buffered")
        if flow.request.data.method not in routes.METHODS:  # intake refuses these first
            raise RuntimeError("a method not spelled exactly as the API's reached the gate")
        flow.request.authority = ""  # origin-form: a host named by the client is never used
        path = rec.target.path
        if rec.repository is not None and mirrors.is_mirror(rec.repository):
            # Read from its mirror (addons/gateway/mirror.py): Distribution's proxy instance
            # of that upstream, or the backend itself (Zot).
            addr, path = mirrors.forward_target(rec.repository, path)
            if addr is not None:
                host, _, port = addr.rpartition(":")
                flow.request.scheme, flow.request.host, flow.request.port = "http", host, int(port)
        flow.request.path = target.canonical(path, rec.params)
        # The run's backend credential, in place of anything the client sent (RegistryAccess
        # already removed that): the backend answers nobody else.
        credential = backend_credential.header()
        if credential is not None:
            flow.request.headers["authorization"] = credential
        else:
            flow.request.headers.pop("authorization", None)

    @fail_closed(kill=True)
    def request(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if flow.response is not None or answered(flow):
            return
        # Token requests are answered by the gateway, never forwarded; a registry request
        # whose body checks did not complete is not forwarded either.
        if rec.kind == "token" or rec.holds:
            rec.decision = "deny:undecided"
            flow.response = internal_error(flow)

    @fail_closed(kill=True)
    def response(self, flow: http.HTTPFlow) -> None:
        response = record(flow).answer
        if response is not None and flow.response is not response:
            flow.response = response
