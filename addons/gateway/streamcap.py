"""The cap of a streamed push under a quota: a body without a length (chunked) reserves its
bytes in the ledger as they stream.

It cannot reserve its length up front, as a body with a Content-Length does (accounting.py:
`Accounting._reserve_upload`). So StreamCap, the body's stream callable, forwards chunks while
the ledger's grants for this body cover them, and asks for more (a quarter of what is left of
the quota at a time, `grant_size`) before they run out. Once the quota has nothing more for
it, its connection is cut: a streamed request can get no answer of ours, so the 403 is
written on the wire and the connection closed (`cut_connection`).

The bookkeeping (the upload session's reservations, the ledger, the quota decision) is
accounting.py's: StreamCap asks it through `Grants` (the Accounting addon), and grows the
request's reservation (`InFlight`) by what it is granted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol

from mitmproxy import ctx, http

from addons.decisions import quota
from addons.engine import oci
from addons.gateway.record import FlowRecord, record
from addons.storage.ledger import Reservation

logger = logging.getLogger(__name__)

MIN_GRANT = 64 * 1024  # what a streamed body reserves at a time: at least …
MAX_GRANT = 64 * 1024 * 1024  # … and at most
HOLD = 4 * 1024 * 1024  # a streamed body's bytes waiting for an ask, at most


@dataclass
class InFlight:
    """What one request reserved in an upload session (the ledger's `pending`)."""

    tenant: str
    session: str  # `<repository>@<upload id>`, or a placeholder for an upload start
    reserved: int = 0
    start: bool = False  # an upload start (POST): renamed once the backend names the session
    done: bool = False  # settled: a grant that comes back later is given back at once
    gone: bool = False  # and the session with it (completed, cancelled, unknown)
    cap: StreamCap | None = None  # a body without a length: counted as it streams

    def sent(self, rec: FlowRecord) -> int:
        return self.cap.sent if self.cap is not None else rec.bytes_in


class Grants(Protocol):
    """What the cap asks of the bookkeeping (accounting.Accounting)."""

    async def reserve(
        self, upload: InFlight, adding: int, limit: int, force: bool = False, upto: bool = False
    ) -> Reservation: ...

    async def give_back(self, upload: InFlight, granted: int) -> None: ...

    def quota_rule(self, flow: http.HTTPFlow) -> str: ...


def grant_size(room: int) -> int:
    """What a streamed body asks the ledger for at a time: a quarter of what is left of the
    quota (so that the tenant's other uploads still find room), within MIN/MAX_GRANT."""
    return min(max(room // 4, MIN_GRANT), MAX_GRANT)


@dataclass
class StreamCap:
    """The stream callable of a body without a length, under a quota. Chunks go on while the
    bytes the ledger reserved for this body (`granted`) cover them; once half of the last
    grant is used it asks for more (a quarter of what is left of the quota, off the event
    loop); chunks past the grant wait in memory (at most HOLD bytes) until the answer, and
    the connection is cut once the quota has nothing more for them. A body whose end
    arrives while an ask is on its way goes on if what waits is within what was left of the
    quota at the last answer: a push that fits is not cut because the ledger is slower than
    the link. That is the one case it may pass the quota, when the tenant's other uploads
    took that room meanwhile: by at most that room per body. Called by
    mitmproxy for every chunk, on the event loop: no I/O here. Returns the chunks to forward
    (a list: an empty bytes value would end a chunked body upstream)."""

    accounting: Grants
    flow: http.HTTPFlow
    upload: InFlight
    limit: int
    granted: int  # bytes the ledger reserved for this body
    step: int  # what the next ask is for
    others: int  # the tenant's other bytes, as of the last answer
    room: int  # what was left of the quota after the last answer
    sent: int = 0  # forwarded
    held: list[bytes] = field(default_factory=list)
    held_bytes: int = 0
    asking: int = 0  # bytes the ask on its way is for (0: none)
    denied: bool = False  # the quota has nothing more for this body
    cut: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.cut:
            return []
        if chunk:
            self.held.append(chunk)
            self.held_bytes += len(chunk)
        out = self._release(self.granted)
        if self.held:
            if self.denied:
                self.stop("quota exceeded", self.held_bytes)
                return [record(self.flow).count_in(c) for c in out]  # covered: they go
            if not chunk:  # the end: it goes on if what was left at the last answer covers it
                if self.held_bytes > self.room:
                    self.stop("quota exceeded", self.held_bytes)
                    return []
                out += self._release(self.sent + self.held_bytes)
            elif self.held_bytes > HOLD:
                self.stop("quota exceeded", self.held_bytes)
                return []
        if not self.asking and not self.denied and self._left() < self.step // 2:
            self.asking = self.step + max(-self._left(), 0)  # and what already waits
            task = asyncio.get_running_loop().create_task(self._ask(self.asking))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        count = record(self.flow).count_in
        return [count(c) for c in out]

    def _left(self) -> int:
        return self.granted - self.sent - self.held_bytes

    def _release(self, upto: int) -> list[bytes]:
        """The held chunks (split where needed) that fit below `upto` bytes forwarded."""
        out: list[bytes] = []
        while self.held and self.sent < upto:
            c = self.held[0]
            take = min(len(c), upto - self.sent)
            out.append(c[:take])
            if take == len(c):
                self.held.pop(0)
            else:
                self.held[0] = c[take:]
            self.sent += take
            self.held_bytes -= take
        return out

    async def _ask(self, want: int) -> None:
        try:
            got = await self.accounting.reserve(self.upload, want, self.limit, upto=True)
        except Exception as e:  # the ledger cannot count this body: stop it (fail closed)
            logger.warning("quota: cannot reserve for a streamed upload: %s", e)
            self.stop("quota-unchecked", 0, (503, "UNAVAILABLE", "cannot check the quota now"))
            return
        finally:
            self.asking = 0
        if self.upload.done:  # the request ended meanwhile (cut, or the client went away)
            await self.accounting.give_back(self.upload, got.granted)
            return
        # `got.used` counts this body's earlier grants and the tenant's other bytes now.
        self.others = got.used - self.granted
        self.granted += got.granted
        self.upload.reserved += got.granted
        if got.reason == "uploads":  # forgotten meanwhile, and no place left for it
            message = "too many unfinished uploads"
            self.stop(message, 0, (429, "TOOMANYREQUESTS", message))
            return
        self.denied = got.granted < want
        self.room = self.limit - got.used - got.granted
        self.step = grant_size(self.room)

    def stop(self, why: str, more: int, answer: tuple[int, str, str] | None = None) -> None:
        """Cut the connection: the backend gets a truncated body and confirms no blob; the
        client gets the 403 (or `answer`) written ahead of the close (mitmproxy cannot answer
        a request whose body streams)."""
        if self.cut:
            return
        self.cut = True
        self.held.clear()
        record(self.flow).decision = f"deny:{why}"
        used = self.others + self.granted
        message = quota.refusal(used, self.limit, more, self.accounting.quota_rule(self.flow))
        status, code, message = answer or (403, "DENIED", message)
        wire = oci.wire_error(status, code, message, method=self.flow.request.method)
        cut_connection(self.flow, wire)


def cut_connection(flow: http.HTTPFlow, answer: bytes) -> None:
    """Write `answer` to the client and close its connection (the connection sweeper's way,
    connections.py): whatever the client still sends is never read, and the backend's
    connection closes with it."""
    proxy = ctx.master.addons.get("proxyserver")
    handler = proxy.connections.get(flow.client_conn.id) if proxy is not None else None
    io = handler.transports.get(handler.client) if handler is not None else None
    if io is None or io.handler is None or io.handler.done():
        return
    if io.writer is not None and not io.writer.is_closing():
        io.writer.write(answer)
    io.handler.cancel("quota")
