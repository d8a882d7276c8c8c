"""One JSON line on stdout per request (CONTRACTS §6), written when the flow ends.

Only what the gateway decided and measured: never a header value, token or body.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time
from typing import IO

from mitmproxy import http

from addons.metrics import Metrics
from addons.record import record


def entry(flow: http.HTTPFlow, now: float) -> dict[str, object]:
    rec = record(flow)
    response = flow.response
    bytes_in = rec.bytes_in or len(flow.request.raw_content or b"")
    bytes_out = rec.bytes_out or (len(response.raw_content or b"") if response else 0)
    line: dict[str, object] = {
        "time": datetime.datetime.fromtimestamp(flow.request.timestamp_start, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "tenant": rec.tenant,
        "method": flow.request.method,
        "kind": rec.kind,
        "repository": rec.repository,
        "reference": rec.reference,
        "status": response.status_code if response else None,
        "decision": rec.decision,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "duration_ms": round((now - flow.request.timestamp_start) * 1000, 1),
    }
    if flow.error:
        line["error"] = flow.error.msg
    return line


def backend_seconds(flow: http.HTTPFlow) -> float | None:
    """Request fully sent → response headers from the backend (allowed registry flows)."""
    rec, response = record(flow), flow.response
    if rec.kind != "registry" or not rec.allowed or response is None:
        return None
    sent = flow.request.timestamp_end or flow.request.timestamp_start
    return max(0.0, response.timestamp_start - sent) if response.timestamp_start else None


class AccessLog:
    """Writes the line and counts the flow in the metrics: the one place a finished flow is
    observed."""

    def __init__(
        self, metrics: Metrics | None = None, out: IO[str] | None = None, flush_every: float = 0.0
    ) -> None:
        """flush_every > 0: lines are written in batches at most that many seconds apart (one
        pipe write for many requests; a crash loses at most that much log)."""
        self.metrics = metrics or Metrics()
        self.out = out or sys.stdout
        self.flush_every = flush_every
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def flush(self) -> None:
        self._timer = None
        if self._pending:
            self.out.write("".join(self._pending))
            self.out.flush()
            self._pending.clear()

    def done(self) -> None:
        self.flush()

    def _write(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.logged:
            return
        rec.logged = True
        line = entry(flow, time.time())
        self._pending.append(json.dumps(line, separators=(",", ":")) + "\n")
        if self.flush_every <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_every, self.flush)
        self.metrics.observe(
            status=line["status"],  # type: ignore[arg-type]
            decision=rec.decision,
            kind=rec.kind,
            bytes_in=line["bytes_in"],  # type: ignore[arg-type]
            bytes_out=line["bytes_out"],  # type: ignore[arg-type]
            auth_seconds=rec.auth_seconds,
            backend_seconds=backend_seconds(flow),
        )

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)
