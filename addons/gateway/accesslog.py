"""One JSON line per request (contract §6), written when the flow ends.

Only what the gateway decided and measured: never a header value, token or body.

Logging never blocks serving: the event loop only appends the line to a bounded queue; a
thread writes the queue out every 20 ms (to `registry_access_log`, the FIFO `run` relays to
stdout, or to stdout). Each write is at most PIPE_BUF bytes of whole lines, so lines of
several gateway processes never interleave. A queue that is full (the writer cannot keep
up) drops the line and counts it (`tabbify_log_lines_dropped_total{where="gateway"}`), with
one warning line per burst.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import IO

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from addons.decisions import redact
from addons.decisions.metrics import Metrics
from addons.engine.splice import PassThrough
from addons.gateway.record import record

logger = logging.getLogger(__name__)

MAX_QUEUED = 50_000  # lines (~15 MiB at most)
PIPE_BUF = 4096  # atomic write size on a pipe or FIFO (Linux)
MAX_FIELD = 1024  # longer names are cut: a whole line must fit one atomic write
MAX_USER_AGENT = 256  # the client's own words: kept short
WRITE_EVERY = 0.02  # seconds between two writes of the queued lines


def _cut(value: object) -> object:
    return value[:MAX_FIELD] if isinstance(value, str) else value


def entry(flow: http.HTTPFlow, now: float) -> dict[str, object]:
    rec = record(flow)
    response = flow.response
    bytes_in = rec.bytes_in or len(flow.request.raw_content or b"")
    bytes_out = rec.bytes_out or (len(response.raw_content or b"") if response else 0)
    line: dict[str, object] = {
        "time": datetime.datetime.fromtimestamp(flow.request.timestamp_start, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "tenant": _cut(rec.tenant),
        "subject": _cut(rec.subject),  # the Tabbify JWT's `sub`, as the token carries it
        "client": flow.client_conn.peername[0] if flow.client_conn.peername else None,
        # The client's own words: a credential pasted there is no more logged than elsewhere.
        "user_agent": redact.text(flow.request.headers.get("user-agent", ""))[:MAX_USER_AGENT]
        or None,
        # As sent: mitmproxy's `method` upper-cases, and a refused `get` is not a GET.
        "method": _cut(flow.request.data.method.decode("utf-8", "backslashreplace")),
        "kind": rec.kind,
        "repository": _cut(rec.repository),
        "reference": _cut(rec.reference),
        "status": response.status_code if response else None,
        "decision": _cut(rec.decision),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round((now - flow.request.timestamp_start) * 1000, 1),
    }
    if rec.rule:  # the policy rule that allowed it (a refusal names its rule in `decision`)
        line["rule"] = _cut(rec.rule)
    if rec.cached:  # answered from the worker's content cache (addons/gateway/contentcache.py)
        line["cache"] = "hit"
    stream = response.stream if response else None
    if isinstance(stream, PassThrough) and stream.spliced:  # moved in the kernel (engine/splice.py)
        line["spliced"] = stream.spliced
    if flow.error:
        line["error"] = _cut(flow.error.msg)
    return line


def backend_seconds(flow: http.HTTPFlow) -> float | None:
    """Request fully sent → response headers from the backend (allowed registry flows)."""
    rec, response = record(flow), flow.response
    if rec.kind != "registry" or not rec.allowed or response is None:
        return None
    sent = flow.request.timestamp_end or flow.request.timestamp_start
    return max(0.0, response.timestamp_start - sent) if response.timestamp_start else None


class LineWriter:
    """A bounded queue of lines and the thread that writes them, in atomic chunks, every
    WRITE_EVERY seconds: no lock and no wake-up on the request path (deque appends and
    pops are atomic)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.queue: deque[bytes] = deque()
        self.dropped = 0
        self._warned = 0
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def put(self, line: bytes) -> None:
        if len(self.queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        self.queue.append(line)

    def _run(self) -> None:
        while True:
            time.sleep(WRITE_EVERY)
            lines = [self.queue.popleft() for _ in range(len(self.queue))]
            for chunk in chunks(lines):
                try:
                    self.out.write(chunk)
                    self.out.flush()
                except OSError:
                    time.sleep(0.1)
            if self.dropped != self._warned:
                logger.warning(
                    "access log: %d lines dropped (the log reader is too slow)",
                    self.dropped - self._warned,
                )
                self._warned = self.dropped

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (bounded) until the queue is written: at shutdown."""
        deadline = time.monotonic() + timeout
        while self.queue and time.monotonic() < deadline:
            time.sleep(0.01)


def chunks(lines: list[bytes]) -> list[bytes]:
    """Whole lines, grouped into writes of at most PIPE_BUF bytes."""
    out: list[bytes] = []
    current = b""
    for line in lines:
        if current and len(current) + len(line) > PIPE_BUF:
            out.append(current)
            current = b""
        current += line
    if current:
        out.append(current)
    return out


class AccessLog:
    """Writes the line and counts the flow in the metrics: the one place a finished flow is
    observed."""

    def __init__(self, metrics: Metrics | None = None, out: IO[str] | None = None) -> None:
        """`out`: a text stream written synchronously (tests); otherwise the writer thread."""
        self.metrics = metrics or Metrics()
        self.out = out
        self.writer: LineWriter | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_access_log", str, "", "Where access log lines go (a FIFO); empty = stdout."
        )

    def running(self) -> None:
        if self.out is not None:
            return
        path = ctx.options.registry_access_log
        # Held for the process's lifetime (closed at exit).
        fd = os.open(path, os.O_WRONLY) if path else os.dup(sys.stdout.fileno())
        stream = os.fdopen(fd, "wb", buffering=0)
        self.writer = LineWriter(stream)

    def done(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    @property
    def dropped(self) -> int:
        return self.writer.dropped if self.writer else 0

    def _write(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.logged:
            return
        rec.logged = True
        line = rec.line = entry(flow, time.time())
        text = json.dumps(line, separators=(",", ":")) + "\n"
        if self.writer is not None:
            self.writer.put(text.encode())
        elif self.out is not None:
            self.out.write(text)
        else:
            sys.stdout.write(text)
        self.metrics.observe(
            status=line["status"],  # type: ignore[arg-type]
            decision=rec.decision,
            kind=rec.kind,
            bytes_in=line["bytes_in"],  # type: ignore[arg-type]
            bytes_out=line["bytes_out"],  # type: ignore[arg-type]
            spliced=line.get("spliced", 0),  # type: ignore[arg-type]
            auth_seconds=rec.auth_seconds,
            backend_seconds=backend_seconds(flow),
        )

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)
