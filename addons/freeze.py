"""The write freeze: while garbage collection runs, writes wait and reads go on.

`tabbify-registry gc` writes a marker, `<registry_state_dir>/freeze.json`
(`{"id", "until", "reason"}`), into the directory every gateway worker publishes its state
to. Each worker looks at the marker (one `stat`, re-read when it changes) on every write it
is about to allow — upload POST/PATCH/PUT, manifest PUT, any DELETE — and answers 503
UNAVAILABLE with `Retry-After` while a marker whose `until` lies ahead is there. Reads are
never looked at. A marker past its `until` is ignored, so a GC that dies never freezes the
registry for good.

The worker also counts the writes it let through and that have not finished yet
(`in_flight`), and publishes, once a second, which freeze it has seen and that count
(addons/publish.py). The GC starts removing anything only once every live worker reports
the freeze's id with no write in flight: whatever a worker admitted before it saw the marker
has then ended, and nothing is admitted after. Runs right after RegistryAccess.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from addons import connections, oci
from addons.gate import answered, fail_closed, respond
from addons.record import record

MARKER = "freeze.json"
RETRY_AFTER = 10  # seconds a client is told to wait
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_COUNTED = "tabbify.freeze.counted"


def read_marker(path: Path, now: float | None = None) -> dict[str, Any] | None:
    """The active freeze in `path`, or None (absent, unreadable, or past its `until`)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    until = data.get("until")
    if not isinstance(until, int | float) or until <= (time.time() if now is None else now):
        return None
    return data


class WriteFreeze:
    def __init__(self) -> None:
        self._stamp: tuple[int, int, int] | None = None
        self._marker: dict[str, Any] | None = None
        self._in_flight: dict[str, http.HTTPFlow] = {}

    def _path(self) -> Path | None:
        directory = ctx.options.registry_state_dir
        return Path(directory) / MARKER if directory else None

    def active(self) -> dict[str, Any] | None:
        """The freeze in force now (a stat per call; the file is re-read when it changes)."""
        path = self._path()
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            self._stamp, self._marker = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp != self._stamp:
            self._stamp, self._marker = stamp, read_marker(path)
        marker = self._marker
        if marker is not None and marker["until"] <= time.time():
            return None
        return marker

    def in_flight(self) -> int:
        """Counted from `requestheaders` to the flow's `response`/`error`, and dropped anyway
        once the flow cannot act any more (connections.flow_over): no engine path that skips
        those hooks can hold every GC."""
        now = time.time()
        for key in [k for k, f in self._in_flight.items() if connections.flow_over(f, now)]:
            del self._in_flight[key]
        return len(self._in_flight)

    def state(self) -> dict[str, Any]:
        marker = self.active()
        return {"seen": marker["id"] if marker else None, "in_flight": self.in_flight()}

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "registry" or not rec.allowed or answered(flow):
            return
        if flow.request.method not in WRITES:
            return
        marker = self.active()
        if marker is not None:
            rec.decision = "deny:frozen"
            respond(
                flow,
                oci.error_response(
                    503,
                    "UNAVAILABLE",
                    f"registry maintenance ({marker.get('reason') or 'frozen'}): writes are "
                    f"paused; retry in {RETRY_AFTER} s",
                    method=flow.request.method,
                    headers={"Retry-After": str(RETRY_AFTER)},
                ),
            )
            return
        flow.metadata[_COUNTED] = True
        self._in_flight[flow.id] = flow

    def _finished(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.pop(_COUNTED, None):
            self._in_flight.pop(flow.id, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)
