"""This worker's feed of the live view (the admin program's `GET /`, addons/admin/liveview.py).

The view must cost the hot path next to nothing, and nothing at all beyond that while nobody
looks. So:

- Every finished flow leaves a snapshot in a bounded ring (BACKLOG flows): one tuple of what
  the access log already computed (its line), the request target and the header fields,
  redacted as captures are (decisions/redact.py: one scan that finds nothing in the common case)
  and bounded in size. Nothing is copied, serialised or sent. The ring is what a viewer sees
  of the time before it connected.
- A few flows also leave their body's first BODY_LIMIT bytes (`bodies`): a manifest pushed
  (buffered by the gateway anyway) or pulled, and an error's JSON (held by the gateway, or
  its first bytes copied as they stream by: record.count_keep_out). Redacted as headers are
  (redact.body) and kept only while all kept bodies fit BODY_BUDGET bytes (the oldest go).
  Never a token answer, a form, a blob, or a streamed body beyond that copy.
- Only while a viewer is connected (the admin program says so in
  `<registry_state_dir>/liveview.json`, which the publisher reads once a second with the
  capture request), a task on the event loop sends every SEND_EVERY s the snapshots not yet
  sent, as datagrams to the admin program's unix socket `<registry_state_dir>/liveview.sock`
  (a JSON head line, then one line per flow: its brief and its headers, see `encode`). Sends
  never block: when the socket takes no more (the admin program has not read yet), the rest
  waits for the next tick; a snapshot the ring lets go before it was sent (the admin program
  lags for good, or traffic outruns MAX_PER_TICK flows a tick) is dropped and counted. At
  most MAX_PER_TICK flows are encoded per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from mitmproxy import http

from addons import runstate
from addons.decisions import redact
from addons.gateway.accesslog import backend_seconds
from addons.gateway.record import HEAD_KEPT, FlowRecord, record

logger = logging.getLogger(__name__)

BACKLOG = 2000  # flows kept per worker
SEND_EVERY = 0.2  # seconds between two sends while a viewer is connected
MAX_PER_TICK = 500  # flows encoded in one tick at most (~10 ms): the event loop stays responsive
SEND_BUFFER = 1 << 20  # bytes the socket holds until the admin program reads
MAX_DATAGRAM = 60_000  # bytes; a unix datagram socket takes up to its send buffer (~208 KiB)
MAX_HEADER_BYTES = 8192  # per message: a 1 MiB request head must not become 1 MiB per flow
MAX_TARGET = 2048
BODY_LIMIT = HEAD_KEPT  # bytes of one body shown
BODY_BUDGET = 4 << 20  # bytes of bodies one worker keeps (its ring: BACKLOG flows)
SOCKET_NAME, CONTROL_NAME = runstate.LIVEVIEW_SOCKET, runstate.LIVEVIEW

# seq, end (epoch s), access-log line, target, client address, backend seconds,
# request fields, response fields (None: no response), headers cut to the bound
Snapshot = tuple[
    int,
    float,
    dict[str, object],
    str,
    str,
    float | None,
    redact.Fields,
    redact.Fields | None,
    bool,
    str | None,
]
MAX_HOST = 256


def bounded(fields: redact.Fields) -> tuple[redact.Fields, bool]:
    """The first fields that fit MAX_HEADER_BYTES, and whether any were cut off."""
    total = 0
    for i, (name, value) in enumerate(fields):
        total += len(name) + len(value)
        if total > MAX_HEADER_BYTES:
            return fields[:i], True
    return fields, False


def compact(fields: redact.Fields) -> tuple[redact.Fields, bool]:
    """Redacted as captures are, cut to MAX_HEADER_BYTES; the same tuple in the common case
    (one scan finds neither a credential nor too many bytes)."""
    suspect, size = redact.scan(fields)
    if suspect:
        fields = redact.replaced(fields)
    return bounded(fields) if size > MAX_HEADER_BYTES else (fields, False)


def snapshot(seq: int, flow: http.HTTPFlow, line: dict[str, object]) -> Snapshot:
    request, response = flow.request, flow.response
    req, cut_req = compact(request.headers.fields)
    resp, cut_resp = compact(response.headers.fields) if response is not None else (None, False)
    peer = flow.client_conn.peername
    return (
        seq,
        time.time(),
        line,
        redact.text(request.path)[:MAX_TARGET],  # redacted whole: no JWT cut in two
        str(peer[0]) if peer else "",
        backend_seconds(flow),
        req,
        resp,
        cut_req or cut_resp,
        # As the client sent it (hardening.py keeps it before reverse mode rewrites it).
        _host(getattr(request, "tbf_host", None)),
    )


def _host(value: object) -> str | None:
    return redact.text(value)[:MAX_HOST] if isinstance(value, str) else None


def _json_type(message: http.Message) -> bool:
    kind = message.headers.get("content-type", "").partition(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def bodies(flow: http.HTTPFlow, rec: FlowRecord) -> dict[str, Any] | None:
    """What the view shows of a flow's bodies, redacted and cut to BODY_LIMIT bytes: a
    pushed manifest, a pulled one, an error's JSON. Only bodies the gateway holds in memory
    anyway, or the copied head of a streamed manifest or error (access.py decides which get
    one); never an encoded body, a token answer or a form (credentials), a blob."""
    request, response = flow.request, flow.response
    manifest = rec.route == "manifest" and rec.kind == "registry"
    out: dict[str, Any] = {}
    cut = False
    if manifest and request.data.method == b"PUT" and not request.stream:
        raw = request.raw_content
        if raw and "content-encoding" not in request.headers:
            out["request_body"], cut = redact.body(raw, BODY_LIMIT)
    if response is not None and "content-encoding" not in response.headers:
        raw, more = None, False
        if not response.stream:
            status = response.status_code
            if (status >= 400 and _json_type(response)) or (
                manifest and status == 200 and request.data.method == b"GET"
            ):
                raw = response.raw_content
        elif rec.head_out is not None:  # a manifest pulled or an error: its head, copied
            raw = bytes(rec.head_out)
            more = rec.bytes_out > len(raw)
        if raw:
            out["response_body"], cut_out = redact.body(raw, BODY_LIMIT)
            cut = cut or cut_out or more
    if cut:
        out["body_cut"] = True
    return out or None


def _text(fields: redact.Fields | None) -> list[list[str]] | None:
    if fields is None:
        return None
    return [[n.decode("utf-8", "replace"), v.decode("utf-8", "replace")] for n, v in fields]


def brief(snap: Snapshot, worker: int) -> dict[str, Any]:
    """The flow without its headers: the access-log line and what only the view shows."""
    seq, end, line, target, client, backend, _, _, truncated, host = snap
    out: dict[str, Any] = {
        **line,
        "seq": seq,
        "worker": worker,
        "end": round(end, 3),
        "target": target,
        "client": client,
        "backend_ms": None if backend is None else round(backend * 1000, 1),
        "host": host,
    }
    if truncated:
        out["truncated"] = True
    return out


def headers(snap: Snapshot) -> dict[str, Any]:
    return {"request_headers": _text(snap[6]), "response_headers": _text(snap[7])}


def summary(snap: Snapshot, worker: int, kept: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole flow as the view knows it: brief, headers and bodies kept."""
    return {**brief(snap, worker), **headers(snap), **(kept or {})}


def encode(snap: Snapshot, worker: int, kept: dict[str, Any] | None = None) -> bytes:
    """One flow on the wire: `<brief JSON> TAB <headers JSON>[ TAB <bodies JSON>]` (JSON text
    holds no raw tab or newline). The admin program reads the brief for its table and
    overview and keeps the rest as text until someone opens the flow. A flow whose bodies
    would not fit a datagram goes without them (a body of control characters escapes to 6x)."""
    line = (
        json.dumps(brief(snap, worker), separators=(",", ":"))
        + "\t"
        + json.dumps(headers(snap), separators=(",", ":"))
    )
    if kept:
        more = "\t" + json.dumps(kept, separators=(",", ":"))
        line += more if len(line) + len(more) < MAX_DATAGRAM - 512 else '\t{"body_dropped":true}'
    return line.encode()


class FlowFeed:
    def __init__(self, backlog: int = BACKLOG) -> None:
        self.ring: deque[Snapshot] = deque(maxlen=backlog)
        self.seq = 0  # of the last snapshot kept
        self.cursor = 0  # the last seq sent (or given up) while streaming
        self.streaming = False
        self.sent = 0
        self.dropped = 0  # flows a viewer should have had but did not get
        self.bodies: dict[int, tuple[dict[str, Any], int]] = {}  # seq -> (bodies, bytes)
        self.body_bytes = 0
        self.worker = 0  # this worker's index (registry_worker)
        self.target: str | None = None  # the admin program's socket
        self.sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    # --- the hot path: one snapshot per finished flow -------------------------------------------

    def _keep(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        line = rec.line
        if line is None:  # not logged (yet), or already kept (response, then error)
            return
        rec.line = None
        ring = self.ring
        if self.streaming and len(ring) == ring.maxlen and ring[0][0] > self.cursor:
            self.dropped += 1  # the oldest was never sent: the sender fell behind
        self.seq += 1
        ring.append(snapshot(self.seq, flow, line))
        kept = bodies(flow, rec)
        if kept is not None:
            self.keep_bodies(self.seq, kept)

    def keep_bodies(self, seq: int, kept: dict[str, Any]) -> None:
        """Bodies of flow `seq`, within BODY_BUDGET: the oldest kept go first (insertion
        order), whether or not the ring still holds their flow."""
        size = sum(len(v) for v in kept.values() if isinstance(v, str))
        self.bodies[seq] = (kept, size)
        self.body_bytes += size
        while self.body_bytes > BODY_BUDGET:
            oldest = next(iter(self.bodies))
            self.body_bytes -= self.bodies.pop(oldest)[1]

    def kept_bodies(self, seq: int) -> dict[str, Any] | None:
        found = self.bodies.get(seq)
        return found[0] if found is not None else None

    def response(self, flow: http.HTTPFlow) -> None:
        self._keep(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._keep(flow)

    # --- following the admin program ------------------------------------------------------------

    def follow(self, request: dict[str, Any] | None, state_dir: Path, worker: int) -> None:
        """Stream while the admin program asks for it (its `until` is in the future); called
        by the publisher once a second. `seen` names, per worker pid, the last flow the admin
        program already holds: a new stream starts after it (a restarted admin program has
        none: it gets the whole backlog)."""
        self.worker = worker
        until = (request or {}).get("until", 0)
        wanted = isinstance(until, int | float) and until > time.time()
        if wanted and not self.streaming:
            seen = (request or {}).get("seen")
            last = seen.get(str(os.getpid()), 0) if isinstance(seen, dict) else 0
            self.start(str(state_dir / SOCKET_NAME), int(last) if isinstance(last, int) else 0)
        elif not wanted and self.streaming:
            self.stop()

    def start(self, target: str, seen: int = 0) -> None:
        self.stop()
        self.target = target
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        # A unix datagram counts against its sender's buffer until it is read: the default
        # (~208 KiB) is three full datagrams. FORCE passes net.core.wmem_max where allowed.
        for option in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
            if option is not None:
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
                    break
        self.cursor = min(max(seen, 0), self.seq)
        self.streaming = True
        with contextlib.suppress(RuntimeError):  # no running loop: a test drives send_pending
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        self.streaming = False
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def done(self) -> None:
        self.stop()

    async def _loop(self) -> None:
        while True:
            try:
                self.send_pending()
            except Exception:  # a bug here must not stop the stream for good
                logger.exception("live view feed: sending failed")
            await asyncio.sleep(SEND_EVERY)

    def pending(self) -> list[Snapshot]:
        """Snapshots after the cursor, oldest first, at most MAX_PER_TICK; those the ring let
        go before they were sent are counted as dropped and skipped."""
        ring = self.ring
        if not ring or self.seq <= self.cursor:
            return []
        oldest = ring[0][0]
        if oldest > self.cursor + 1:
            self.cursor = oldest - 1
        count = self.seq - self.cursor
        return list(itertools.islice(ring, len(ring) - count, len(ring) - count + MAX_PER_TICK))

    def send_pending(self) -> int:
        """Send what is pending, in datagrams of at most MAX_DATAGRAM bytes; returns the
        flows sent. Never blocks: when the socket takes no more (the admin program has not
        read yet), the rest waits for the next tick, and what the ring lets go meanwhile is
        counted as dropped."""
        if not self.streaming or self.sock is None or self.target is None:
            return 0
        snaps = self.pending()
        if not snaps:
            return 0
        head = {"pid": os.getpid(), "worker": self.worker, "dropped": self.dropped}
        prefix = json.dumps(head, separators=(",", ":")).encode() + b"\n"
        batch: list[bytes] = []
        size, sent = len(prefix), 0
        for i, snap in enumerate(snaps):
            item = encode(snap, self.worker, self.kept_bodies(snap[0]))
            if batch and size + len(item) + 1 > MAX_DATAGRAM:
                if not self._send(prefix + b"\n".join(batch)):
                    return sent
                self.cursor = snaps[i - 1][0]
                sent += len(batch)
                self.sent += len(batch)
                batch, size = [], len(prefix)
            batch.append(item)
            size += len(item) + 1
        if self._send(prefix + b"\n".join(batch)):
            self.cursor = snaps[-1][0]
            sent += len(batch)
            self.sent += len(batch)
        return sent

    def _send(self, data: bytes) -> bool:
        try:
            self.sock.sendto(data, self.target)  # type: ignore[union-attr, arg-type]
        except OSError:  # EAGAIN: the admin program lags; ENOENT, ECONNREFUSED: it is gone
            return False
        return True

    def status(self) -> dict[str, object]:
        return {"streaming": self.streaming, "sent": self.sent, "dropped": self.dropped}
