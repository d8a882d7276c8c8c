"""The cap of a streamed push under a quota: a body without a length (chunked) reserves its
bytes in the ledger as they stream.

It cannot reserve its length up front, as a body with a Content-Length does (uploads.py:
`Uploads.open`). So StreamCap, the body's stream callable, forwards chunks while
the ledger's grants for this body cover them, and asks for more (a quarter of what is left of
the quota at a time, `grant_size`) before they run out. Once the quota has nothing more for
it, its connection is cut: a streamed request can get no answer of ours, so the 403 is
written on the wire and the connection closed (`cut_connection`).

Reserving ahead means that the tenant's other uploads may hold room they will not use: each
keeps what is left of its last grant until it ends. An answer that falls short while they
hold room is not final (`worth_waiting`): the body asks again until they give it back
(WAIT_OTHERS at most), and its end waits for that answer (engine/bodyend.py). Two layers
that fit the quota together are never refused for each other's grants.

The bookkeeping (the upload session's reservations, the ledger, the quota decision) is
uploads.py's: StreamCap asks it through `Grants` (`uploads.Uploads`), and grows the
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
WAIT_OTHERS = 5.0  # seconds an upload that does not fit waits for others' room to come back
# … holding at most this much of its body meanwhile (one engine read's worth): a client that
# keeps sending while it waits is cut, so waiting costs no more memory than a connection does
WAIT_HOLD = 256 * 1024
RETRY = (0.05, 0.5)  # seconds between two asks meanwhile: first, at most


def retry_in(waited: float) -> float:
    """The pause before asking again after `waited` seconds of refusals: about as long again
    (doubling), within RETRY, so a tenant's waiting requests cost the ledger a few asks each."""
    return min(max(waited, RETRY[0]), RETRY[1])


def worth_waiting(got: Reservation, own: int, waited: float) -> bool:
    """A refusal or short grant worth asking again after `waited` seconds of them: requests
    other than this one (which holds `own` of the tenant's reserved bytes) still hold room,
    which they give back when they end, and WAIT_OTHERS is not over."""
    return got.pending - own > 0 and waited < WAIT_OTHERS


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
    """What the cap asks of the bookkeeping (uploads.Uploads)."""

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
    loop); chunks past the grant wait in memory (at most HOLD bytes) until the answer. An
    answer that falls short while the tenant's other requests hold room is asked again
    (backing off, WAIT_OTHERS at most, holding at most WAIT_HOLD bytes); otherwise the quota
    has nothing more for this body, and its connection is cut once a chunk goes past what
    it was granted. Its end waits for an answer on its way (`waits_at_end`, `finish`): what
    it forwards never passes what it was granted. Called by mitmproxy for every chunk, on
    the event loop: no I/O here. Returns the chunks to forward (a list: an empty bytes value
    would end a chunked body upstream)."""

    accounting: Grants
    flow: http.HTTPFlow
    upload: InFlight
    limit: int
    granted: int  # bytes the ledger reserved for this body
    step: int  # what the next ask is for
    others: int  # the tenant's other bytes, as of the last answer
    sent: int = 0  # forwarded
    held: list[bytes] = field(default_factory=list)
    held_bytes: int = 0
    asking: int = 0  # bytes the ask on its way is for (0: none)
    denied: bool = False  # the quota has nothing more for this body
    cut: bool = False
    short_since: float | None = None  # answers fall short, others holding room, since then
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.cut:
            return []
        if chunk:
            self.held.append(chunk)
            self.held_bytes += len(chunk)
        out = self._release(self.granted)
        hold = HOLD if self.short_since is None else WAIT_HOLD
        if self.held and (self.denied or not chunk or self.held_bytes > hold):
            # Nothing more will be granted; or the end, which waited for the last answer
            # (`finish`); or too much waiting for one.
            self.stop("quota exceeded", self.held_bytes)
        elif not self.asking and not self.denied and self._left() < self.step // 2:
            self.asking = self.step + max(-self._left(), 0)  # and what already waits
            task = asyncio.get_running_loop().create_task(self._ask(self.asking))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        count = record(self.flow).count_in
        return [count(c) for c in out]

    def waits_at_end(self) -> tuple[list[bytes], bool]:
        """At the body's end, before mitmproxy hands it over (engine/bodyend.py): the chunks
        granted meanwhile go on now, and True if the rest waits for an answer on its way
        (so only what waits, at most WAIT_HOLD once others are waited for, stays held)."""
        if self.cut:
            return [], False
        count = record(self.flow).count_in
        out = [count(c) for c in self._release(self.granted)]
        return out, bool(self.asking and self.held)

    async def finish(self) -> None:
        """Until the answer for the bytes that wait has come (WAIT_OTHERS at most, plus the
        ledger's time)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

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
        loop = asyncio.get_running_loop()
        try:
            while True:
                got = await self.accounting.reserve(self.upload, want, self.limit, upto=True)
                if self.upload.done:  # the request ended meanwhile (cut, or the client left)
                    await self.accounting.give_back(self.upload, got.granted)
                    return
                own = self.upload.reserved  # before this answer's grant
                # `got.used` counts this body's earlier grants and the tenant's other bytes.
                self.others = got.used - self.granted
                self.granted += got.granted
                self.upload.reserved += got.granted
                self.step = grant_size(self.limit - got.used - got.granted)
                if got.reason == "uploads":  # forgotten meanwhile, and no place left for it
                    message = "too many unfinished uploads"
                    self.stop(message, 0, (429, "TOOMANYREQUESTS", message))
                    return
                short = got.granted < want
                if not short:
                    self.short_since = None
                elif self.short_since is None:
                    self.short_since = loop.time()
                waited = loop.time() - self.short_since if short else 0.0
                if short and (not worth_waiting(got, own, waited) or -self._left() > WAIT_HOLD):
                    self.denied = True
                    return
                if self._left() >= 0 or self.cut:
                    return  # what waits is covered: the next chunks ask again
                if short:
                    await asyncio.sleep(retry_in(waited))  # for the others to give room back
                    if self.cut:
                        return
                # What waits (only chunks come in meanwhile: never less), and, with room, the
                # next step.
                want = -self._left() + (0 if short else self.step)
        except Exception as e:  # the ledger cannot count this body: stop it (fail closed)
            logger.warning("quota: cannot reserve for a streamed upload: %s", e)
            self.stop("quota-unchecked", 0, (503, "UNAVAILABLE", "cannot check the quota now"))
        finally:
            self.asking = 0

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
