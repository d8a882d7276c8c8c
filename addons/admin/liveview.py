"""The live view of traffic (contract §6 `GET /`), the admin program's side: the pages and
streams that serve what the feed (feed.py) holds.

It serves the page (package data under addons/admin/static/, with the newest rows drawn in:
rows.py) and its APIs: Server-Sent Events (`/live/events`), a long-poll JSON alternative
(`/live/flows`), one flow with its headers (`/live/flow/<id>`), the overview
(`/live/overview`) and a mitmproxy flow file of what is shown (`/live/flows.mitm`). While a
viewer is connected or polls, the feed tells the workers to stream.

A viewer that does not read fast enough loses flows (counted, and shown to it) rather than
making the program hold more: each has a queue of VIEWER_QUEUE flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from addons.admin import http as adminhttp
from addons.admin.feed import CONTROL_TTL, WorkerFeed
from addons.admin.flowexport import flow_file
from addons.admin.flows import RING_SIZE, Entry, Filters
from addons.admin.rows import rows_html

BACKLOG_ON_CONNECT = 1000  # flows a new viewer gets at once
MAX_BATCH = 500  # flows in one event
VIEWER_QUEUE = 5000  # flows queued for one viewer before drops
OVERVIEW_EVERY = 1.0
HEARTBEAT = 15.0
POLL_WAIT = 25.0  # seconds a long poll waits for a flow at most
FIRST_ROWS = 200  # rows drawn into the page itself (the first paint shows them, scripts or not)
WARM_WAIT = 2.5  # seconds a page waits for the workers' backlog when nobody was looking
WARM_MORE = 0.5  # and then for the other workers' after the first one's
WRITE_TIMEOUT = 10.0  # a viewer that reads nothing for this long is let go

STATIC = {
    "/": ("live.html", "text/html; charset=utf-8"),
    "/static/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/static/live.css": ("live.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

Answer = tuple[int, str, bytes, dict[str, str]]


def _json(status: int, payload: Any) -> Answer:
    return status, "application/json", json.dumps(payload).encode(), {}


@dataclass(eq=False)  # one per connection, hashed by identity
class Viewer:
    """One connected page: a bounded queue of flows to send it, and what it lost."""

    limit: int = VIEWER_QUEUE
    queue: deque[Entry] = field(default_factory=deque)
    dropped: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, entry: Entry) -> None:
        if len(self.queue) >= self.limit:
            self.dropped += 1
        else:
            self.queue.append(entry)
        self.wake.set()

    def take(self, n: int = MAX_BATCH) -> list[Entry]:
        return [self.queue.popleft() for _ in range(min(n, len(self.queue)))]


def static_file(name: str) -> bytes:
    return (resources.files("addons.admin") / "static" / name).read_bytes()


class LiveView:
    """The live view's pages, APIs and event streams, over the ring and overview of the feed
    it holds."""

    def __init__(
        self,
        state_dir: Path,
        csrf_token: str,
        workers_streaming: Callable[[], int] = lambda: 0,
        ring_size: int = RING_SIZE,
    ) -> None:
        self.feed = WorkerFeed(state_dir, ring_size, wanted=self.wanted, deliver=self.deliver)
        self.csrf_token = csrf_token
        self.workers_streaming = workers_streaming
        self.viewers: set[Viewer] = set()
        self.streams: set[asyncio.StreamWriter] = set()  # closed when the program stops
        self.epoch = os.urandom(4).hex()  # event ids of another run of this program are stale
        self.polled_until = 0.0  # a long poll keeps the workers streaming until then
        self._pages = {path: static_file(name) for path, (name, _) in STATIC.items()}

    async def start(self) -> None:
        await self.feed.start()

    def close(self) -> None:
        for writer in self.streams:
            writer.close()
        self.feed.close()

    def wanted(self) -> bool:
        return bool(self.viewers) or time.monotonic() < self.polled_until

    def deliver(self, entry: Entry) -> None:
        for viewer in self.viewers:
            viewer.push(entry)

    # --- what the page reads --------------------------------------------------------------------

    def stats(self, viewer: Viewer | None = None) -> dict[str, Any]:
        return {
            "ring": len(self.feed.ring.entries),
            "capacity": self.feed.ring.entries.maxlen,
            "evicted": self.feed.ring.evicted,
            "dropped_by_workers": self.feed.dropped_by_workers(),
            "dropped_for_viewer": viewer.dropped if viewer is not None else 0,
            "bad_input": self.feed.bad_input,
            "workers_streaming": self.workers_streaming(),
            "viewers": len(self.viewers),
            "feed_error": self.feed.feed_error,
        }

    def overview_payload(self, viewer: Viewer | None = None) -> dict[str, Any]:
        return {**self.feed.overview.snapshot(time.time()), "stats": self.stats(viewer)}

    def event_id(self, entry_id: int) -> str:
        return f"{self.epoch}-{entry_id}"

    def parse_event_id(self, value: str | None) -> int | None:
        """The ring id in an event id of this run of the program, else None."""
        epoch, _, number = (value or "").partition("-")
        return int(number) if epoch == self.epoch and number.isdigit() else None

    def route(self, request: adminhttp.Request) -> Answer | None:
        """The view's pages and JSON APIs (the event stream is `stream`); None: not ours."""
        path = request.path
        if request.method != "GET":
            return None
        if path in STATIC:
            body = self._pages[path]
            if path == "/":  # the page carries the token its state-changing requests send
                body = body.replace(b"{{csrf_token}}", self.csrf_token.encode())
                body = body.replace(b"{{rows}}", b"")  # `page` draws them
            return 200, STATIC[path][1], body, {}
        if path == "/live/overview":
            return _json(200, self.overview_payload())
        if path.startswith("/live/flow/"):
            number = path.removeprefix("/live/flow/")
            entry = self.feed.ring.get(int(number)) if number.isdigit() else None
            if entry is None:
                return _json(404, {"error": "no such flow in the ring (any more)"})
            return _json(200, entry.full())
        return None

    async def page(self) -> Answer:
        """`GET /`: the page with the newest FIRST_ROWS flows already in its table, so that
        its first paint shows them (a screenshot, a slow script). When nobody was looking,
        the workers were not streaming: ask them, and wait (bounded) for their backlog."""
        if not self.wanted():
            self.polled_until = time.monotonic() + CONTROL_TTL + WARM_WAIT
            self.feed.write_control()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.feed.arrived.wait(), WARM_WAIT)
                await asyncio.sleep(WARM_MORE)  # the other workers' backlogs
        newest = self.feed.ring.after(self.feed.ring.last_id - FIRST_ROWS, FIRST_ROWS)
        newest.sort(key=lambda e: e.flow.get("end") or 0)  # as the page orders them
        rows = rows_html([e.flow for e in reversed(newest)])
        body = self._pages["/"].replace(b"{{csrf_token}}", self.csrf_token.encode())
        return 200, STATIC["/"][1], body.replace(b"{{rows}}", rows.encode()), {}

    async def download(self, request: adminhttp.Request) -> Answer:
        """`GET /live/flows.mitm?<filters>`: the ring's matching flows as a mitmproxy flow
        file, built in a thread (10 000 flows take a while; /healthz must not wait)."""
        filters = Filters.from_query(request.query)
        entries = [e for e in self.feed.ring.entries if filters.match(e.flow)]
        data = await asyncio.to_thread(lambda: flow_file([e.full() for e in entries]))
        name = time.strftime("live-%Y%m%dT%H%M%SZ.flows", time.gmtime())
        disposition = {"Content-Disposition": f'attachment; filename="{name}"'}
        return 200, "application/octet-stream", data, disposition

    async def poll(self, request: adminhttp.Request) -> Answer:
        """`GET /live/flows?since=<event id>&wait=<s>`: the flows after `since` (the newest
        BACKLOG_ON_CONNECT without it), waiting up to `wait` s for one. Keeps the workers
        streaming while polls keep coming."""
        self.polled_until = time.monotonic() + CONTROL_TTL + POLL_WAIT
        if not self.feed.control_on:
            self.feed.write_control()
        since = self.parse_event_id(request.query.get("since"))
        try:
            wait = min(max(float(request.query.get("wait", "0")), 0.0), POLL_WAIT)
        except ValueError:
            wait = 0.0
        start = since if since is not None else self.feed.ring.last_id - BACKLOG_ON_CONNECT
        if wait and self.feed.ring.last_id <= start:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.feed.arrived.wait(), wait)
        filters = Filters.from_query(request.query)
        entries = self.feed.ring.after(start, BACKLOG_ON_CONNECT)
        return _json(
            200,
            {
                "last": self.event_id(self.feed.ring.last_id),
                "reset": since is None,
                "flows": [e.flow for e in entries if filters.match(e.flow)],
                "stats": self.stats(),
            },
        )

    async def stream(
        self, request: adminhttp.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """`GET /live/events`: Server-Sent Events. `flows` events carry summaries without
        headers (a JSON list; the event id is the last flow's), `overview` events the chart
        and per-tenant numbers every OVERVIEW_EVERY s, and a comment line keeps idle
        connections open. A reconnecting EventSource sends Last-Event-ID: it gets what it
        missed, as far as the ring still holds it; without one it gets `reset` and the newest
        BACKLOG_ON_CONNECT flows."""
        since = self.parse_event_id(request.header("last-event-id"))
        writer.write(adminhttp.head(200, "text/event-stream; charset=utf-8", None, {}))
        viewer = Viewer()
        self.viewers.add(viewer)
        self.streams.add(writer)
        if not self.feed.control_on:
            self.feed.write_control()  # the workers start within their next second
        closed = asyncio.ensure_future(reader.read(1))  # a viewer never sends: EOF = gone
        try:
            if since is None:
                writer.write(b"event: reset\ndata: {}\n\n")
                backlog = self.feed.ring.after(
                    self.feed.ring.last_id - BACKLOG_ON_CONNECT, BACKLOG_ON_CONNECT
                )
            else:
                backlog = self.feed.ring.after(since, VIEWER_QUEUE)
            for i in range(0, len(backlog), MAX_BATCH):
                writer.write(self.flows_event(backlog[i : i + MAX_BATCH]))
            next_overview = next_beat = 0.0
            while not closed.done():
                now = time.monotonic()
                if now >= next_overview:
                    payload = json.dumps(self.overview_payload(viewer), separators=(",", ":"))
                    writer.write(f"event: overview\ndata: {payload}\n\n".encode())
                    next_overview = now + OVERVIEW_EVERY
                if now >= next_beat:
                    writer.write(b": keep-alive\n\n")
                    next_beat = now + HEARTBEAT
                entries = viewer.take()
                if entries:
                    writer.write(self.flows_event(entries))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                if not viewer.queue:
                    viewer.wake.clear()
                    timeout = max(0.05, next_overview - time.monotonic())
                    woken = asyncio.ensure_future(viewer.wake.wait())
                    await asyncio.wait(
                        [closed, woken], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    woken.cancel()
        except (OSError, TimeoutError):
            pass  # gone, or not reading
        finally:
            self.viewers.discard(viewer)
            self.streams.discard(writer)
            closed.cancel()
            writer.close()

    def flows_event(self, entries: list[Entry]) -> bytes:
        data = "[" + ",".join(e.brief for e in entries) + "]"
        return f"id: {self.event_id(entries[-1].id)}\nevent: flows\ndata: {data}\n\n".encode()
