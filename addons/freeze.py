"""The write freeze: while garbage collection marks and sweeps, the writes that could make a
possibly-unreferenced blob referenced again wait; every other request goes on.

`tabbify-registry gc` writes a marker, `<registry_state_dir>/freeze.json`
(`{"id", "until", "reason"}`), into the directory every gateway worker publishes its state
to, for the mark and the sweep only (tabbify_registry/gc.py). Each worker looks at the marker
(one `stat`, re-read when it changes) on every *held* write it is about to allow, and while a
marker whose `until` lies ahead is there the write waits (the hook awaits, re-reading the
marker every HOLD_POLL seconds) and goes on once the marker is gone. Nothing is refused: a
client sees a slower answer, never a 503. The held writes (`held`) are those that make an
existing blob referenced by a manifest, or linked into a repository, without uploading it
again: manifest PUT, an upload POST that mounts or completes (`mount`, `digest`), the
upload-completing PUT (its digest may already be stored, unreferenced: Distribution then only
links it), and every DELETE. Upload POST (plain) and PATCH go on: they write only to the
upload's own area, which GC never touches, and the blob they complete is young (GC spares
blobs stored or linked within its grace period).

A hold is bounded twice: by the marker's `until` (the GC writes a short lease and renews it,
never past its own deadline, so a GC that died releases every held write within the lease),
and by HOLD_MAX here, past which the write is answered 503 + Retry-After (fail closed: a
marker that claims longer than any GC holds).

The worker also counts the held-kind writes it let through and that have not finished yet
(`in_flight`), and publishes, once a second, which freeze it has seen and that count
(addons/publish.py). The GC starts marking only once every live worker reports the freeze's
id with no such write in flight: whatever a worker admitted before it saw the marker has then
ended, and nothing is admitted after. Runs right after RegistryAccess.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from addons import connections, oci, runstate
from addons.gate import answered, fail_closed, respond
from addons.record import record

MARKER = runstate.FREEZE
RETRY_AFTER = 10  # seconds a client is told to wait, past HOLD_MAX
HOLD_POLL = 0.1  # seconds between two looks at the marker while a write waits
HOLD_MAX = 180.0  # a write never waits longer (the GC's own bound, gc.FREEZE_MAX, is shorter)
_COUNTED = "tabbify.freeze.counted"


def held(method: str, route: str | None, params: dict[str, str]) -> bool:
    """Whether a write (already allowed) waits while GC marks and sweeps: every write that can
    reference or link a stored blob without uploading it, and every DELETE."""
    if method == "DELETE":
        return True
    if route == "manifest":
        return method == "PUT"
    if route == "upload":
        if method == "PUT":  # completes an upload: links a digest that may already be stored
            return True
        if method == "POST":  # a mount, or a monolithic upload completed in one request
            return "mount" in params or "digest" in params
    return False


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
        self._marker_file = runstate.Followed(read_marker)  # re-read when it changes
        self._in_flight: dict[str, http.HTTPFlow] = {}

    def _path(self) -> Path | None:
        directory = ctx.options.registry_state_dir
        return Path(directory) / MARKER if directory else None

    def active(self) -> dict[str, Any] | None:
        """The freeze in force now (a stat per call; the file is re-read when it changes)."""
        path = self._path()
        if path is None:
            return None
        marker = self._marker_file.current(path)
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
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "registry" or not rec.allowed or answered(flow):
            return
        if not held(flow.request.method, rec.route, rec.params):
            return
        marker = self.active()
        if marker is not None:
            started = time.monotonic()
            while marker is not None and time.monotonic() - started < HOLD_MAX:
                await asyncio.sleep(HOLD_POLL)
                marker = self.active()
            waited = time.monotonic() - started
            if marker is not None:
                rec.decision = "deny:frozen"
                respond(
                    flow,
                    oci.error_response(
                        503,
                        "UNAVAILABLE",
                        f"registry maintenance ({marker.get('reason') or 'frozen'}): writes "
                        f"paused for more than {HOLD_MAX:.0f} s; retry in {RETRY_AFTER} s",
                        method=flow.request.method,
                        headers={"Retry-After": str(RETRY_AFTER)},
                    ),
                )
                return
            rec.decision += f"{':' if rec.decision == 'allow' else ', '}held {waited:.1f}s"
        flow.metadata[_COUNTED] = True
        self._in_flight[flow.id] = flow

    def _finished(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.pop(_COUNTED, None):
            self._in_flight.pop(flow.id, None)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow)
