"""The write freeze: while garbage collection marks and sweeps, the writes that could make a
possibly-unreferenced blob referenced again wait; every other request goes on.

`tabbify-registry gc` writes a marker, `<registry_state_dir>/freeze.json`
(`{"id", "until", "reason"}`), into the directory every gateway worker publishes its state
to, for the mark and the sweep only (addons/cli/gc.py). Each worker looks at the marker
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

The worker also keeps the held-kind writes it let through that have not finished yet
(`in_flight`), each with what it can link, and publishes, once a second, which freeze it has
seen and, while one is seen, the union of those links (addons/gateway/publish.py; `published`). A
write names what it can link before it reaches the backend: the upload-completing PUT and the
mount/digest POST carry their digests in the query the gateway forwards (`links`); a manifest
PUT is buffered (at most 4 MiB, with a Content-Length: any other is refused here, with or
without TenantIsolation) and counted only once its whole body is here, so its own
digest and its references are known (`manifest_links`); a DELETE links nothing. The GC starts
marking as soon as every live worker reports the freeze's id, without waiting for those writes
to end: what they can link is protected (never swept, never deleted as a manifest), and the
repositories with a DELETE in flight keep their tags this run. Admitting a write and counting
it happen in one step of the event loop, and a publication reads the marker and the set in
one step too: a publication that reports the freeze lists every write admitted before it that
has not ended, and every later one is held. A write that ended has done what it did before
the publication that no longer lists it. One that ended in an error (the client went away)
stays listed for LINGER seconds: the backend may still be completing it. A worker that cannot
tell (a manifest it could not read, or more than MAX_LINKS digests) publishes
`links: null`, and the GC removes nothing this run: a slow write, whatever its kind, never
keeps the collector or anyone else's writes waiting. Runs right after RegistryAccess.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from addons import runstate
from addons.decisions import manifest
from addons.engine import connections, oci
from addons.gateway.gate import answered, fail_closed, respond
from addons.gateway.isolation import MANIFEST_CHECK
from addons.gateway.record import FlowRecord, record

MARKER = runstate.FREEZE
RETRY_AFTER = 10  # seconds a client is told to wait, past HOLD_MAX
HOLD_POLL = 0.1  # seconds between two looks at the marker while a write waits
HOLD_MAX = 180.0  # a write never waits longer (the GC's own bound, gc.FREEZE_MAX, is shorter)
MAX_LINKS = 20_000  # digests and repositories a worker publishes at most (~1.5 MB of JSON)
LINGER = 30.0  # seconds a write that ended in an error stays protected

Links = frozenset[str] | None  # what one write can link; None: it cannot be told


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


def links(route: str | None, params: Mapping[str, str]) -> frozenset[str]:
    """What a held-kind write known from its request line can link: the digest an upload
    PUT completes, the digest a POST mounts or uploads in one request (both, if both are
    named). `params` are those the gateway forwards, one value per name. A DELETE: nothing."""
    if route != "upload":
        return frozenset()
    return frozenset(v for k in ("mount", "digest") if (v := params.get(k)))


def manifest_links(body: bytes) -> Links:
    """What a manifest PUT can link: its own digest (Distribution stores a manifest as a blob
    and does not rewrite one already stored) and every digest it references; None if the body
    cannot be read as the backend would read it."""
    try:
        refs = manifest.references(manifest.parse(body))
    except manifest.ManifestError:
        return None
    return frozenset([manifest.digest_of(body), *refs])


def published(
    writes: Iterable[tuple[Links, str | None]], lingering: Iterable[str], bound: int = MAX_LINKS
) -> dict[str, Any]:
    """What a worker tells the GC about its held-kind writes in flight (each: what it can
    link, and the repository of a DELETE): the digests they can link and the repositories
    with a DELETE in flight; both None when it cannot tell (a write whose links are unknown,
    or more than `bound` entries)."""
    digests, deleting = set(lingering), set()
    for linked, repository in writes:
        if linked is None:
            return {"links": None, "deleting": None}
        digests |= linked
        if repository is not None:
            deleting.add(repository)
        if len(digests) + len(deleting) > bound:
            return {"links": None, "deleting": None}
    if len(digests) + len(deleting) > bound:
        return {"links": None, "deleting": None}
    return {"links": sorted(digests), "deleting": sorted(deleting)}


def bufferable(request: http.Request) -> bool:
    """A manifest PUT whose body the gateway can read whole before forwarding it."""
    if "transfer-encoding" in request.headers:
        return False
    length = request.headers.get("content-length", "0")
    return length.isdigit() and len(length) < 19 and int(length) <= manifest.MAX_MANIFEST


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
        # flow id → (flow, what it can link, the repository of a DELETE)
        self._in_flight: dict[str, tuple[http.HTTPFlow, Links, str | None]] = {}
        self._lingering: dict[str, float] = {}  # digest → until (monotonic)
        self._unknown_until = 0.0  # a write of unknown links ended in an error: until then

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
        """Counted from the write's admission to the flow's `response`/`error`, and dropped
        anyway once the flow cannot act any more (connections.flow_over): no engine path that
        skips those hooks can hold a write's links forever (they linger LINGER seconds)."""
        now = time.time()
        over = [k for k, (f, _, _) in self._in_flight.items() if connections.flow_over(f, now)]
        for key in over:
            self._linger(self._in_flight.pop(key)[1])
        return len(self._in_flight)

    def _linger(self, linked: Links) -> None:
        until = time.monotonic() + LINGER
        if linked is None:
            self._unknown_until = until
        for digest in linked or ():
            self._lingering[digest] = until

    def state(self) -> dict[str, Any]:
        """Published once a second. One synchronous step: the marker seen and the writes in
        flight are read at the same instant (nothing is admitted in between)."""
        marker = self.active()
        out: dict[str, Any] = {"seen": marker["id"] if marker else None}
        out["in_flight"] = self.in_flight()
        now = time.monotonic()
        for digest in [d for d, until in self._lingering.items() if until <= now]:
            del self._lingering[digest]
        if marker is not None:  # only the GC reads them, and only while it freezes
            writes = [(linked, repo) for _, linked, repo in self._in_flight.values()]
            if self._unknown_until > now:
                writes.append((None, None))
            out.update(published(writes, self._lingering))
        return out

    async def _hold(self, flow: http.HTTPFlow, rec: FlowRecord) -> bool:
        """Wait while a freeze is in force; False when the flow was answered 503 instead."""
        marker = self.active()
        if marker is None:
            return True
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
            return False
        rec.decision += f"{':' if rec.decision == 'allow' else ', '}held {waited:.1f}s"
        return True

    def _admit(self, flow: http.HTTPFlow, linked: Links, repository: str | None) -> None:
        # Called right after a _hold that found no marker, with no await in between.
        record(flow).frozen = True
        self._in_flight[flow.id] = (flow, linked, repository)

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.kind != "registry" or not rec.allowed or answered(flow):
            return
        method = flow.request.method
        if not held(method, rec.route, rec.params):
            return
        manifest_put = rec.route == "manifest" and method == "PUT"
        if manifest_put and not bufferable(flow.request):
            # As TenantIsolation answers it, and also without it: a manifest streamed unread
            # could link anything, and a refused one can drip its body into the void for as
            # long as its client likes (it must count for nothing).
            chunked = "transfer-encoding" in flow.request.headers
            rec.decision = "deny:manifest-size"
            message = (
                "a manifest needs a Content-Length" if chunked else "manifest larger than 4 MiB"
            )
            error = oci.error_response(
                411 if chunked else 413, "SIZE_INVALID", message, method=method
            )
            respond(flow, error)
            return
        if not await self._hold(flow, rec):  # its body, if any, is not read while it waits
            return
        if manifest_put:
            # It reaches nothing before its whole body is here: counted (and held again, if a
            # freeze began meanwhile) in `request`, when its links are known.
            flow.request.stream = False
            rec.frozen_at_body = True
            return
        if method == "DELETE":
            self._admit(flow, frozenset(), rec.repository)
        else:
            self._admit(flow, links(rec.route, rec.params), None)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if not rec.frozen_at_body:
            return
        rec.frozen_at_body = False
        if flow.response is not None or answered(flow) or not rec.allowed:
            return
        if not await self._hold(flow, rec):
            return
        linked = None if flow.request.stream else manifest_links(flow.request.raw_content or b"")
        if linked is None and MANIFEST_CHECK in rec.holds:
            # TenantIsolation reads it with the same parser next and refuses it: the gate
            # forwards nothing while that check holds.
            linked = frozenset()
        self._admit(flow, linked, None)

    def _finished(self, flow: http.HTTPFlow, failed: bool) -> None:
        rec = record(flow)
        if rec.frozen:
            rec.frozen = False
            entry = self._in_flight.pop(flow.id, None)
            if failed and entry is not None:
                self._linger(entry[1])

    def response(self, flow: http.HTTPFlow) -> None:
        self._finished(flow, False)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finished(flow, True)
