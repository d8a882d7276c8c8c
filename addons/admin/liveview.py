"""The live view of traffic (contract §6 `GET /`), the admin program's side.

The gateway workers send redacted flow summaries only while a viewer is connected
(addons/gateway/flowfeed.py); this side:

- receives them on a unix datagram socket, `<state dir>/liveview.sock` (mode 0600),
  dropping repeats (by worker pid and sequence number),
- keeps the last RING_SIZE in a ring (the oldest go: counted as `evicted`), and per-second
  counts per tenant over the last OVERVIEW_WINDOW seconds for the overview,
- tells the workers to stream while a viewer is connected, by writing
  `<state dir>/liveview.json` (`until`: a few seconds ahead, renewed every second while
  someone looks; `seen`: the last sequence number it holds of each worker),
- serves the page (package data under addons/admin/static/) and its APIs: Server-Sent
  Events (`/live/events`), a long-poll JSON alternative (`/live/flows`), one flow with its
  headers (`/live/flow/<id>`), the overview (`/live/overview`) and a mitmproxy flow file of
  what is shown (`/live/flows.mitm`).

A viewer that does not read fast enough loses flows (counted, and shown to it) rather than
making the program hold more: each has a queue of VIEWER_QUEUE flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

from addons import runstate
from addons.admin import http as adminhttp
from addons.admin.flowexport import flow_file
from addons.runstate import write_json

logger = logging.getLogger("admin")

RING_SIZE = 10_000
BACKLOG_ON_CONNECT = 1000  # flows a new viewer gets at once
MAX_BATCH = 500  # flows in one event
VIEWER_QUEUE = 5000  # flows queued for one viewer before drops
OVERVIEW_WINDOW = 600  # seconds of per-tenant counts kept
CHART_SECONDS = 300  # seconds the chart shows
TABLE_SECONDS = 60  # seconds the per-tenant table sums
MAX_TENANTS = 20
OVERVIEW_EVERY = 1.0
HEARTBEAT = 15.0
CONTROL_EVERY = 1.0
CONTROL_TTL = 5.0  # seconds the workers keep streaming without a renewal
POLL_WAIT = 25.0  # seconds a long poll waits for a flow at most
FIRST_ROWS = 200  # rows drawn into the page itself (the first paint shows them, scripts or not)
WARM_WAIT = 2.5  # seconds a page waits for the workers' backlog when nobody was looking
WARM_MORE = 0.5  # and then for the other workers' after the first one's
WRITE_TIMEOUT = 10.0  # a viewer that reads nothing for this long is let go
RECV_BUFFER = 4 << 20
FORGET_AFTER = 3600.0  # seconds after which a silent worker pid is forgotten
MAX_SUN_PATH = 107
HEADERS = ("request_headers", "response_headers")
BODIES = ("request_body", "response_body", "body_cut", "body_dropped")
BODY_BUDGET = 32 << 20  # bytes of bodies the ring keeps (10 000 flows: the oldest lose theirs)
STATIC = {
    "/": ("live.html", "text/html; charset=utf-8"),
    "/static/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/static/live.css": ("live.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

Answer = tuple[int, str, bytes, dict[str, str]]


def _json(status: int, payload: Any) -> Answer:
    return status, "application/json", json.dumps(payload).encode(), {}


@dataclass(slots=True)
class Entry:
    id: int
    flow: dict[str, Any]  # the flow without its headers, with `id`: table, filters, overview
    brief: str  # its JSON, as pages get it
    headers: str | None = None  # JSON {"request_headers", "response_headers"}, as sent
    bodies: str | None = None  # JSON {"request_body", "response_body", "body_cut"}, as sent

    def full(self) -> dict[str, Any]:
        """The flow with its headers and bodies, parsed only when someone opens it or
        downloads it."""
        extra: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            parsed = json.loads(self.headers) if self.headers else None
            if isinstance(parsed, dict):
                extra = {k: parsed.get(k) for k in HEADERS}
        with contextlib.suppress(ValueError):
            parsed = json.loads(self.bodies) if self.bodies else None
            if isinstance(parsed, dict):
                extra.update((k, parsed[k]) for k in BODIES if k in parsed)
        return {**self.flow, **extra}


class FlowRing:
    """The last `capacity` flows, with ids that grow by one: a flow is found by arithmetic."""

    def __init__(self, capacity: int = RING_SIZE, body_budget: int = BODY_BUDGET) -> None:
        self.entries: deque[Entry] = deque(maxlen=capacity)
        self.last_id = 0
        self.evicted = 0
        self.body_budget = body_budget
        self.with_bodies: deque[Entry] = deque()  # oldest first
        self.body_bytes = 0

    def keep_bodies(self, entry: Entry) -> None:
        """Bodies stay while all fit `body_budget` (the oldest go first), not as long as
        their flow: a flow the ring lets go lets its bodies go too."""
        if entry.bodies is None:
            return
        self.with_bodies.append(entry)
        self.body_bytes += len(entry.bodies)
        while self.with_bodies and (
            self.body_bytes > self.body_budget
            or self.with_bodies[0].id <= self.last_id - len(self.entries)
        ):
            oldest = self.with_bodies.popleft()
            self.body_bytes -= len(oldest.bodies or "")
            oldest.bodies = '{"body_dropped":true}'

    def add(
        self,
        flow: dict[str, Any],
        brief: str | None = None,
        headers: str | None = None,
        bodies: str | None = None,
    ) -> Entry:
        """`brief`: the JSON text `flow` was read from, reused as it is (the id spliced in);
        without it, the headers in `flow` are split off and the rest encoded here."""
        self.last_id += 1
        if brief is None or "id" in flow or not brief.startswith("{"):
            found = {k: flow.pop(k) for k in HEADERS if k in flow}
            if headers is None and found:
                headers = json.dumps(found, separators=(",", ":"))
            flow["id"] = self.last_id
            brief = json.dumps(flow, separators=(",", ":"))
        else:
            flow["id"] = self.last_id
            brief = f'{{"id":{self.last_id},' + brief[1:]
        if len(self.entries) == self.entries.maxlen:
            self.evicted += 1
        entry = Entry(self.last_id, flow, brief, headers, bodies)
        self.entries.append(entry)
        self.keep_bodies(entry)
        return entry

    def get(self, entry_id: int) -> Entry | None:
        if not self.entries:
            return None
        i = entry_id - self.entries[0].id
        return self.entries[i] if 0 <= i < len(self.entries) else None

    def after(self, entry_id: int, limit: int) -> list[Entry]:
        """The flows after `entry_id`, oldest first; the newest `limit` of them."""
        n = min(max(self.last_id - entry_id, 0), len(self.entries), limit)
        return list(islice(self.entries, len(self.entries) - n, None))


def status_class(flow: dict[str, Any]) -> str:
    status = flow.get("status")
    return f"{status // 100}xx" if isinstance(status, int) else "none"


@dataclass(frozen=True)
class Filters:
    """The view's filters; the page applies the same ones to what it shows."""

    tenant: str | None = None  # exact; "-" = no tenant
    repository: str = ""  # a substring
    status: str | None = None  # "2xx" … "5xx", "none"
    decision: str | None = None  # "allow" | "deny"

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Filters:
        return cls(
            tenant=query.get("tenant") or None,
            repository=query.get("repository", ""),
            status=query.get("status") or None,
            decision=query.get("decision") or None,
        )

    def match(self, flow: dict[str, Any]) -> bool:
        if self.tenant is not None and (flow.get("tenant") or "-") != self.tenant:
            return False
        if self.repository and self.repository not in str(flow.get("repository") or ""):
            return False
        if self.status is not None and status_class(flow) != self.status:
            return False
        if self.decision is not None:
            verdict = str(flow.get("decision") or "").partition(":")[0]
            if verdict != self.decision:
                return False
        return True


class Overview:
    """Per-second counts per tenant: requests, 4xx, 5xx or failed, bytes in, bytes out."""

    def __init__(self, window: int = OVERVIEW_WINDOW) -> None:
        self.window = window
        self.seconds: dict[int, dict[str, list[int]]] = {}

    def add(self, flow: dict[str, Any], now: float) -> None:
        end = flow.get("end")
        second = int(end if isinstance(end, int | float) else now)
        if second <= now - self.window or second > now + 5:
            return
        tenant = str(flow.get("tenant") or "-")
        row = self.seconds.setdefault(second, {}).setdefault(tenant, [0, 0, 0, 0, 0])
        status = flow.get("status")
        row[0] += 1
        if isinstance(status, int) and 400 <= status < 500:
            row[1] += 1
        elif not isinstance(status, int) or status >= 500 or flow.get("error"):
            row[2] += 1
        for i, key in ((3, "bytes_in"), (4, "bytes_out")):
            value = flow.get(key)
            row[i] += value if isinstance(value, int) else 0

    def prune(self, now: float) -> None:
        for second in [s for s in self.seconds if s <= now - self.window]:
            del self.seconds[second]

    def snapshot(self, now: float) -> dict[str, Any]:
        self.prune(now)
        last = int(now)
        first = last - CHART_SECONDS + 1
        series: dict[str, list[int]] = {
            k: [0] * CHART_SECONDS for k in ("requests", "4xx", "5xx", "bytes_in", "bytes_out")
        }
        tenants: dict[str, list[int]] = {}
        sparks: dict[str, list[int]] = {}
        for second, rows in self.seconds.items():
            if not first <= second <= last:
                continue
            i = second - first
            for tenant, row in rows.items():
                for key, value in zip(series, row, strict=True):
                    series[key][i] += value
                sparks.setdefault(tenant, [0] * (CHART_SECONDS // 10))[i // 10] += row[0]
                if second > last - TABLE_SECONDS:
                    total = tenants.setdefault(tenant, [0, 0, 0, 0, 0])
                    for j, value in enumerate(row):
                        total[j] += value
        table = []
        for tenant in sorted(sparks, key=lambda t: -sum(sparks[t]))[:MAX_TENANTS]:
            requests, client, server, bytes_in, bytes_out = tenants.get(tenant, [0] * 5)
            table.append(
                {
                    "tenant": tenant,
                    "requests": requests,
                    "rps": round(requests / TABLE_SECONDS, 2),
                    "client_error_rate": round(client / requests, 4) if requests else 0,
                    "error_rate": round(server / requests, 4) if requests else 0,
                    "bytes_in_per_s": round(bytes_in / TABLE_SECONDS),
                    "bytes_out_per_s": round(bytes_out / TABLE_SECONDS),
                    "spark": sparks[tenant],
                }
            )
        return {"end": last, "seconds": CHART_SECONDS, "series": series, "tenants": table}


def _bytes(n: object) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return ""
    value, units, i = float(n), ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{round(value)} B"
    return f"{value:.1f} {units[i]}" if value < 10 else f"{value:.0f} {units[i]}"


def _ms(n: object) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return ""
    return f"{n / 1000:.2f} s" if n >= 1000 else f"{n:.1f} ms"


_DIGEST = re.compile(r"^(sha256|sha512):([0-9a-f]{12})[0-9a-f]+$")


def _text(value: object) -> str:
    return "" if value is None else str(value)


def row_cells(flow: dict[str, Any]) -> list[tuple[str, str]]:
    """(class, text) of each cell of a flow's row: what live.js `row` draws."""
    status = flow.get("status")
    verdict = _text(flow.get("decision")).partition(":")
    reason = [f"rule {flow['rule']}"] if flow.get("rule") else []
    if verdict[2]:
        reason.append(verdict[2])
    if flow.get("error"):
        reason.append(f"error: {flow['error']}")
    reference = _text(flow.get("reference"))
    digest = _DIGEST.match(reference)
    repository = flow.get("repository")
    return [
        ("c-time", _text(flow.get("time"))[11:23]),
        ("c-tenant", _text(flow.get("tenant")) or "-"),
        ("c-subject", _text(flow.get("subject"))),
        ("c-method", _text(flow.get("method"))),
        ("c-repository", _text(repository))
        if repository
        else ("c-repository path", _text(flow.get("target")).split("?")[0]),
        ("c-reference", f"{digest[1]}:{digest[2]}…" if digest else reference),
        ("c-status", "—" if status is None else _text(status)),
        ("c-decision", verdict[0]),
        ("c-rule", " · ".join(reason)),
        ("c-in num", _bytes(flow.get("bytes_in"))),
        ("c-out num", _bytes(flow.get("bytes_out"))),
        ("c-duration num", _ms(flow.get("duration_ms"))),
        ("c-backend num", _ms(flow.get("backend_ms"))),
        ("c-host", _text(flow.get("host"))),
        ("c-agent", _text(flow.get("user_agent"))),
    ]


def rows_html(flows: list[dict[str, Any]]) -> str:
    """The newest flows as table rows, every value escaped into a text node (no script runs:
    the page's CSP forbids inline script, and nothing here is markup a client wrote)."""
    out = []
    for flow in flows:
        status = flow.get("status")
        klass = f"{status // 100}xx" if isinstance(status, int) else "none"
        verdict = _text(flow.get("decision")).partition(":")[0]
        cells = "".join(
            f'<td class="{c}">{html.escape(t, quote=False)}</td>' for c, t in row_cells(flow)
        )
        out.append(
            f'<tr class="flow s{klass} d-{html.escape(verdict)}" data-id="{int(flow["id"])}" '
            f'title="{html.escape(_text(flow.get("method")) + " " + _text(flow.get("target")))}"'
            f">{cells}</tr>"
        )
    return "\n".join(out)


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


class Feed(asyncio.DatagramProtocol):
    def __init__(self, live: LiveView) -> None:
        self.live = live

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.live.receive(data, time.time())

    def error_received(self, exc: Exception) -> None:  # nothing to answer on a datagram socket
        pass


def static_file(name: str) -> bytes:
    return (resources.files("addons.admin") / "static" / name).read_bytes()


class LiveView:
    def __init__(
        self,
        state_dir: Path,
        csrf_token: str,
        workers_streaming: Callable[[], int] = lambda: 0,
        ring_size: int = RING_SIZE,
    ) -> None:
        self.state_dir = state_dir
        self.csrf_token = csrf_token
        self.workers_streaming = workers_streaming
        self.ring = FlowRing(ring_size)
        self.overview = Overview()
        self.viewers: set[Viewer] = set()
        self.streams: set[asyncio.StreamWriter] = set()  # closed when the program stops
        self.epoch = os.urandom(4).hex()  # event ids of another run of this program are stale
        self.seen: dict[int, int] = {}  # worker pid -> last sequence number received
        self.heard: dict[int, float] = {}  # worker pid -> when
        self.worker_dropped: dict[int, int] = {}  # worker pid -> its count
        self.retired_dropped = 0  # the counts of workers gone for an hour
        self.bad_input = 0  # datagrams or flow lines that could not be read
        self.polled_until = 0.0  # a long poll keeps the workers streaming until then
        self.control_on = False
        self.arrived = asyncio.Event()  # set, and replaced, whenever flows arrive
        self.feed_error: str | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._pages = {path: static_file(name) for path, (name, _) in STATIC.items()}

    # --- the feed -------------------------------------------------------------------------------

    async def start(self) -> None:
        path = self.state_dir / runstate.LIVEVIEW_SOCKET
        if len(os.fsencode(path)) > MAX_SUN_PATH:
            self.feed_error = f"{path}: too long for a unix socket"
            logger.warning("live view: %s; the view gets no flows", self.feed_error)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock.bind(str(path))
            os.chmod(path, 0o600)
            for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
                if option is None:
                    continue
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, RECV_BUFFER)
                    break
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(lambda: Feed(self), sock=sock)
        self.write_control()
        self._task = asyncio.create_task(self._control_loop())

    def close(self) -> None:
        for writer in self.streams:
            writer.close()
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.close()
        with contextlib.suppress(OSError):
            write_json(self.state_dir / runstate.LIVEVIEW, {"until": 0})

    def receive(self, data: bytes, now: float) -> int:
        """One datagram of a worker (addons/gateway/flowfeed.py: a JSON head line, then one line per
        flow, `<brief JSON> TAB <headers JSON>`); returns the flows kept. What cannot be read
        is counted in `bad_input`."""
        head_line, _, body = data.partition(b"\n")
        try:
            head = json.loads(head_line)
            pid = head["pid"]
            if not isinstance(pid, int):
                raise TypeError("pid")
        except (ValueError, KeyError, TypeError):
            self.bad_input += 1
            return 0
        dropped = head.get("dropped")
        self.worker_dropped[pid] = dropped if isinstance(dropped, int) else 0
        self.heard[pid] = now
        last, kept = self.seen.get(pid, 0), 0
        for line in body.split(b"\n"):
            if not line:
                continue
            brief, _, rest = line.partition(b"\t")
            headers, _, kept_bodies = rest.partition(b"\t")
            try:
                flow = json.loads(brief)
            except ValueError:
                self.bad_input += 1
                continue
            seq = flow.get("seq") if isinstance(flow, dict) else None
            if not isinstance(seq, int) or seq <= last:
                continue  # sent again after a restart of this program, or not a flow
            last = seq
            entry = self.ring.add(
                flow,
                brief.decode("utf-8", "replace"),
                headers.decode("utf-8", "replace") or None,
                kept_bodies.decode("utf-8", "replace") or None,
            )
            self.overview.add(flow, now)
            for viewer in self.viewers:
                viewer.push(entry)
            kept += 1
        self.seen[pid] = last
        if kept:
            self.arrived.set()
            self.arrived = asyncio.Event()
        return kept

    def forget_gone(self, now: float) -> None:
        """Workers not heard of for an hour are gone (restarted): their entries go, their
        drop counts stay in the sum."""
        for pid in [p for p, t in self.heard.items() if now - t > FORGET_AFTER]:
            self.retired_dropped += self.worker_dropped.pop(pid, 0)
            self.heard.pop(pid)
            self.seen.pop(pid, None)

    def wanted(self) -> bool:
        return bool(self.viewers) or time.monotonic() < self.polled_until

    def write_control(self) -> None:
        """Ask the workers to stream (or stop) in liveview.json; see addons/gateway/flowfeed.py."""
        wanted = self.wanted()
        if wanted:
            now = time.time()
            recent = sorted(self.heard, key=lambda p: -self.heard[p])[:64]
            seen = {str(pid): self.seen[pid] for pid in recent if pid in self.seen}
            write_json(
                self.state_dir / runstate.LIVEVIEW, {"until": now + CONTROL_TTL, "seen": seen}
            )
        elif self.control_on:
            write_json(self.state_dir / runstate.LIVEVIEW, {"until": 0})
        self.control_on = wanted

    async def _control_loop(self) -> None:
        while True:
            await asyncio.sleep(CONTROL_EVERY)
            self.forget_gone(time.time())
            try:
                self.write_control()
            except OSError:
                logger.exception("live view: cannot write %s", runstate.LIVEVIEW)

    # --- what the page reads --------------------------------------------------------------------

    def stats(self, viewer: Viewer | None = None) -> dict[str, Any]:
        return {
            "ring": len(self.ring.entries),
            "capacity": self.ring.entries.maxlen,
            "evicted": self.ring.evicted,
            "dropped_by_workers": sum(self.worker_dropped.values()) + self.retired_dropped,
            "dropped_for_viewer": viewer.dropped if viewer is not None else 0,
            "bad_input": self.bad_input,
            "workers_streaming": self.workers_streaming(),
            "viewers": len(self.viewers),
            "feed_error": self.feed_error,
        }

    def overview_payload(self, viewer: Viewer | None = None) -> dict[str, Any]:
        return {**self.overview.snapshot(time.time()), "stats": self.stats(viewer)}

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
            entry = self.ring.get(int(number)) if number.isdigit() else None
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
            self.write_control()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), WARM_WAIT)
                await asyncio.sleep(WARM_MORE)  # the other workers' backlogs
        newest = self.ring.after(self.ring.last_id - FIRST_ROWS, FIRST_ROWS)
        newest.sort(key=lambda e: e.flow.get("end") or 0)  # as the page orders them
        rows = rows_html([e.flow for e in reversed(newest)])
        body = self._pages["/"].replace(b"{{csrf_token}}", self.csrf_token.encode())
        return 200, STATIC["/"][1], body.replace(b"{{rows}}", rows.encode()), {}

    async def download(self, request: adminhttp.Request) -> Answer:
        """`GET /live/flows.mitm?<filters>`: the ring's matching flows as a mitmproxy flow
        file, built in a thread (10 000 flows take a while; /healthz must not wait)."""
        filters = Filters.from_query(request.query)
        entries = [e for e in self.ring.entries if filters.match(e.flow)]
        data = await asyncio.to_thread(lambda: flow_file([e.full() for e in entries]))
        name = time.strftime("live-%Y%m%dT%H%M%SZ.flows", time.gmtime())
        disposition = {"Content-Disposition": f'attachment; filename="{name}"'}
        return 200, "application/octet-stream", data, disposition

    async def poll(self, request: adminhttp.Request) -> Answer:
        """`GET /live/flows?since=<event id>&wait=<s>`: the flows after `since` (the newest
        BACKLOG_ON_CONNECT without it), waiting up to `wait` s for one. Keeps the workers
        streaming while polls keep coming."""
        self.polled_until = time.monotonic() + CONTROL_TTL + POLL_WAIT
        if not self.control_on:
            self.write_control()
        since = self.parse_event_id(request.query.get("since"))
        try:
            wait = min(max(float(request.query.get("wait", "0")), 0.0), POLL_WAIT)
        except ValueError:
            wait = 0.0
        start = since if since is not None else self.ring.last_id - BACKLOG_ON_CONNECT
        if wait and self.ring.last_id <= start:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), wait)
        filters = Filters.from_query(request.query)
        entries = self.ring.after(start, BACKLOG_ON_CONNECT)
        return _json(
            200,
            {
                "last": self.event_id(self.ring.last_id),
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
        if not self.control_on:
            self.write_control()  # the workers start within their next second
        closed = asyncio.ensure_future(reader.read(1))  # a viewer never sends: EOF = gone
        try:
            if since is None:
                writer.write(b"event: reset\ndata: {}\n\n")
                backlog = self.ring.after(
                    self.ring.last_id - BACKLOG_ON_CONNECT, BACKLOG_ON_CONNECT
                )
            else:
                backlog = self.ring.after(since, VIEWER_QUEUE)
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
