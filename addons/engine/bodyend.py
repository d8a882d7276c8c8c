"""The end of a streamed request body may wait for an addon (hardening patch 15).

mitmproxy hands a streamed body's end to the stream callable (`stream(b"")`) and forwards
what it returns at once: the callable is synchronous, so what it cannot decide yet it must
decide then. A body streamed under a quota (gateway/streamcap.py) can end while the ledger's
answer for its last bytes is still on its way, or while the tenant's other uploads still hold
room they will give back. Before the end is handed on, a stream callable that has
`waits_at_end()` is asked: the chunks it can forward now go on, and if the rest waits, a
hook, `streamed_request_end`, lets an addon await the answer; the end then goes through
mitmproxy's own path. Every other body, and this one once decided, takes mitmproxy's
unchanged code.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import RequestData, RequestEndOfMessage

_state_stream_request_body = HttpStream.state_stream_request_body


@dataclass
class StreamedRequestEndHook(commands.StartHook):
    """A streamed request body has ended; its stream callable has not yet been told. An addon
    may await here what the callable needs to decide on the bytes it still holds."""

    name = "streamed_request_end"
    flow: http.HTTPFlow


def state_stream_request_body(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    if isinstance(event, RequestEndOfMessage):
        waits_at_end = getattr(self.flow.request.stream, "waits_at_end", None)
        if waits_at_end is not None:
            ready, wait = waits_at_end()
            for chunk in ready:  # as mitmproxy forwards what a stream callable returns
                if self.context.options.store_streamed_bodies:
                    self.request_body_buf += chunk
                yield SendHttp(RequestData(self.stream_id, chunk), self.context.server)
            if wait:
                yield StreamedRequestEndHook(self.flow)
    yield from _state_stream_request_body(self, event)


def patches() -> list[tuple[Any, str, Any]]:
    return [(HttpStream, "state_stream_request_body", state_stream_request_body)]
