"""The end of a streamed request body may wait for an addon (hardening patch 15).

mitmproxy hands a streamed body's end to the stream callable (`stream(b"")`) and forwards
what it returns at once: the callable is synchronous, so what it cannot decide yet it must
decide then. A body streamed under a quota (gateway/streamcap.py) can end while the ledger's
answer for its last bytes is still on its way, or while the tenant's other uploads still hold
room they will give back. Before the end is handed on, a stream callable that says so
(`ending_waits()`) gets a hook, `streamed_request_end`, in which an addon awaits the answer;
the end then goes through mitmproxy's own path. Nothing else changes: every other body, and
this one once decided, takes mitmproxy's unchanged code.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from mitmproxy import http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._events import RequestEndOfMessage

_state_stream_request_body = HttpStream.state_stream_request_body


@dataclass
class StreamedRequestEndHook(commands.StartHook):
    """A streamed request body has ended; its stream callable has not yet been told. An addon
    may await here what the callable needs to decide on the bytes it still holds."""

    name = "streamed_request_end"
    flow: http.HTTPFlow


def state_stream_request_body(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    if isinstance(event, RequestEndOfMessage):
        ending_waits = getattr(self.flow.request.stream, "ending_waits", None)
        if ending_waits is not None and ending_waits():
            yield StreamedRequestEndHook(self.flow)
    yield from _state_stream_request_body(self, event)


def patches() -> list[tuple[Any, str, Any]]:
    return [(HttpStream, "state_stream_request_body", state_stream_request_body)]
