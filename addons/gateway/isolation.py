"""Tenant isolation by digest, independent of the backend (runs after RegistryAccess).

A caller may read a digest in a repository it may pull (RegistryAccess decided that) when it
holds the digest itself (it pushed or mounted it) or the repository references it (recorded
for the repository: what a grant of pull on it shares, and nothing else). A blob or manifest
fetched by digest, or a mount, for any other digest never reaches the backend: 404
BLOB_UNKNOWN / MANIFEST_UNKNOWN, or a plain upload start. A manifest may only reference
digests the caller may read in its repository. Confirmed uploads and pushes (201 from the
backend) create the records, for the caller and for the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from addons.config import mirrors
from addons.decisions import manifest
from addons.decisions.manifest import MAX_MANIFEST
from addons.decisions.routes import is_digest
from addons.engine import oci
from addons.gateway.backfill import Walker
from addons.gateway.gate import answered, fail_closed, has_large_body, respond
from addons.gateway.record import FlowRecord, record
from addons.storage.ledger import AnyLedger, LedgerUnavailable, holder
from addons.storage.spec import open_ledger

logger = logging.getLogger(__name__)
MANIFEST_CHECK = "manifest-references"  # a hold: the body's references are checked
RESOLVE_WAIT = 60.0  # seconds a request may wait for its repository's walk
WALK_RETRY = (2.0, 60.0)  # backoff of the start-up walk when the backend fails it
RECHECK_EVERY = 5.0  # seconds between two looks at the ledger's health
RECHECK_LOST = 1.0  # the same while the ledger is not whole (pick up a rebuild soon)
STARTUP_POLL = 0.25  # seconds between two looks for worker 0's start-up marker
REBUILD_RETRY = (2.0, 15.0)  # backoff of a rebuild the backend fails


class Unresolved(Exception):
    """The walk that would tell whether a tenant holds a digest has not finished, or the
    ledger lost records and is not rebuilt yet: 503, never a 4xx."""


REBUILDING = "the registry's ledger is being rebuilt; retry"


class TenantIsolation:
    def __init__(self) -> None:
        self.ledger: AnyLedger | None = None
        self.walker: Walker | None = None
        self.walk_done = False  # this process has walked everything it had not seen
        self._resolving: dict[str, asyncio.Future[int]] = {}
        # tenant → the ledger's `losses` when its repositories were walked for a request
        self._tenants_resolved: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_ledger", str, "", "Ledger: a SQLite path or s3://bucket/prefix; empty = off."
        )
        loader.add_option("registry_run", str, "", "This run's id (the start-up walk's marker).")
        loader.add_option(
            "registry_backend", str, "", "Backend base URL, walked at start to backfill."
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_ledger" in updated:
            if self.ledger:
                self.ledger.close()
            path = ctx.options.registry_ledger
            self.ledger = open_ledger(path) if path else None

    async def running(self) -> None:
        if self.ledger is None or not ctx.options.registry_backend:
            self.walk_done = True
            return
        self.walker = Walker(ctx.options.registry_backend, self.ledger)
        self._task = asyncio.create_task(self._walk())

    async def _walk(self) -> None:
        """At start, walk what the ledger has not seen (worker 0; the other workers wait for
        its marker). Then keep an eye on the ledger (health: deleted, replaced, read-only,
        corrupt) and, when it is not whole, rebuild it: worker 0, under the ledger's rebuild
        lock (one process per node; PostgreSQL: one node). Meanwhile every worker looks a
        miss up in the backend (`_has`: 503 when that cannot be done) and picks up the
        rebuilt ledger at its next look (every RECHECK_LOST seconds, or at a miss)."""
        assert self.ledger is not None and self.walker is not None
        ledger, delay = self.ledger, WALK_RETRY[0]
        marker = f"/run/{ctx.options.registry_run}"  # not a repository name: no clash
        while not self.walk_done:
            try:
                if ctx.options.registry_worker == 0:
                    if not await asyncio.to_thread(self._rebuild, True):
                        raise Unresolved("another process is rebuilding the ledger")
                    await asyncio.to_thread(ledger.mark_walked, marker)
                elif not await asyncio.to_thread(ledger.walked, marker):
                    await asyncio.sleep(STARTUP_POLL)  # worker 0 is still walking
                    continue
                else:
                    await asyncio.to_thread(ledger.refresh_whole)  # as worker 0 left it
            except Exception as e:
                logger.warning("ledger backfill failed (%s); retrying in %.0f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WALK_RETRY[1])
                continue
            self.walk_done = True
        self._tell_health()
        delay, whole = REBUILD_RETRY[0], ledger.whole
        while True:
            await asyncio.sleep(RECHECK_EVERY if ledger.whole else RECHECK_LOST)
            await asyncio.to_thread(ledger.check)
            if ledger.whole != whole:
                whole = ledger.whole
                self._tell_health()
            if ledger.whole or ledger.state != "ok" or ctx.options.registry_worker != 0:
                continue
            try:
                if await asyncio.to_thread(self._rebuild, False):
                    # The start-up walk's marker went with the lost file: a worker that
                    # started meanwhile waits for it.
                    await asyncio.to_thread(ledger.mark_walked, marker)
                delay = REBUILD_RETRY[0]
            except Exception as e:
                logger.warning("ledger rebuild failed (%s); retrying in %.0f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, REBUILD_RETRY[1])

    def _tell_health(self) -> None:
        """Publish this worker's state now (not at the next second): /healthz follows the
        ledger's wholeness at once, at start above all."""
        publisher = ctx.master.addons.get("publisher")
        if publisher is not None and ctx.options.registry_state_dir:
            with contextlib.suppress(Exception):  # its own loop logs and retries
                publisher.publish()

    def _rebuild(self, startup: bool) -> bool:
        """Walk every repository the ledger has not seen; then it is whole. At start this
        is the backfill (cheap: what was walked before is skipped). False if another process
        holds the rebuild lock (we pick up its work at the next look). Blocking."""
        assert self.ledger is not None and self.walker is not None
        with self.ledger.rebuild_lock() as mine:
            if not mine:
                return False
            if not startup and self.ledger.refresh_whole():
                return True  # someone finished it meanwhile
            started = time.monotonic()
            n = self.walker.everything()
            self.ledger.mark_whole()
            logger.warning(
                "ledger %s: %d tenant digests recorded in %.1f s",
                "backfill" if startup else "rebuilt from the backend",
                n,
                time.monotonic() - started,
            )
        return True

    def unavailable(self, e: Exception) -> str:
        """The 503's message: the ledger cannot be read, or lost records and is being
        rebuilt, or the start-up walk has not reached this yet."""
        if isinstance(e, LedgerUnavailable):
            return "the registry's ledger is unavailable; retry"
        if self.ledger is not None and not self.ledger.whole:
            return REBUILDING
        return "the registry is still indexing its storage; retry"

    async def vouches(self) -> bool:
        """The ledger can answer "no" (it is whole, or there is no backend to rebuild it
        from): a catalog from it is an answer, not a guess. Raises LedgerUnavailable."""
        if self.ledger is None or self.walker is None or self.ledger.whole:
            return True
        return await asyncio.to_thread(self.ledger.refresh_whole)

    async def _resolve(self, key: str, walk: Callable[[str], int], arg: str) -> None:
        """Run one walk (shared by every request waiting for it), waiting a bounded time."""
        future = self._resolving.get(key)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(walk, arg))
            self._resolving[key] = future
            future.add_done_callback(lambda _: self._resolving.pop(key, None))
        try:
            await asyncio.wait_for(asyncio.shield(future), RESOLVE_WAIT)
        except TimeoutError:
            raise Unresolved(f"still indexing {arg}") from None
        except LedgerUnavailable:
            raise
        except Exception as e:  # the backend failed the walk
            raise Unresolved(f"cannot index {arg}: {type(e).__name__}") from None

    async def _readable(self, tenant: str, digest: str, repository: str | None) -> bool:
        if await self._lookup(tenant, digest):
            return True
        return repository is not None and await self._lookup(holder(repository), digest)

    async def _has(self, tenant: str, digest: str, repository: str | None) -> bool:
        """May the tenant read `digest` in `repository` (it holds it, or the repository
        does)? A miss is a "no" only when the ledger can vouch for it: whole, and the
        start-up walk done. Otherwise it is unknown, and the walks that decide it run first:
        the repository's, then the tenant's other repositories' (once per loss); what they
        do not find is then a "no" as a whole rebuild would say it. A walk that cannot
        finish (the backend fails it, or it takes too long) leaves it unknown: Unresolved,
        503, never a 4xx. Raises LedgerUnavailable / Unresolved (both 503)."""
        if await self._readable(tenant, digest, repository):
            return True
        assert self.ledger is not None
        if self.walker is None:
            return False  # no backend to walk (tests of the gateway alone)
        whole = self.ledger.whole or await asyncio.to_thread(self.ledger.refresh_whole)
        if self.walk_done and whole:
            return False  # walked: whatever exists came in through the gateway since
        losses = self.ledger.losses
        if repository and not await asyncio.to_thread(self.ledger.walked, repository):
            await self._resolve(repository, self.walker.repository, repository)
            if await self._readable(tenant, digest, repository):
                return True
        if self._tenants_resolved.get(tenant) != losses:
            await self._resolve(f"tenant {tenant}", self.walker.tenant, tenant)
            self._tenants_resolved[tenant] = losses
            return await self._lookup(tenant, digest)
        return False

    async def _lookup(self, tenant: str, digest: str) -> bool:
        """A hit is answered from memory; a miss asks the ledger off the event loop (one
        SQLite lookup, or one HEAD on a shared S3 ledger)."""
        assert self.ledger is not None
        if self.ledger.recorded.cached((tenant, digest)):
            return True
        return await asyncio.to_thread(self.ledger.has, tenant, digest)

    def _active(self, rec: FlowRecord) -> bool:
        # Mirrored content is nobody's: it is read from the mirror (its own store with
        # Distribution), never recorded, and a mount from it is dropped (routes.py).
        mirrored = rec.repository is not None and mirrors.is_mirror(rec.repository)
        return self.ledger is not None and rec.allowed and rec.tenant is not None and not mirrored

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if not self._active(rec) or answered(flow):
            return
        method, ref = flow.request.method, rec.reference or ""

        def deny(status: int, code: str, message: str, why: str) -> None:
            rec.decision = f"deny:{why}"
            respond(flow, oci.error_response(status, code, message, method=method, detail=ref))

        try:
            await self._decide(flow, rec, deny)
        except (LedgerUnavailable, Unresolved) as e:
            logger.warning("isolation cannot decide now: %s", e)
            deny(503, "UNAVAILABLE", self.unavailable(e), "ledger")

    async def _decide(
        self, flow: http.HTTPFlow, rec: FlowRecord, deny: Callable[..., None]
    ) -> None:
        assert rec.tenant is not None
        request, method, ref = flow.request, flow.request.method, rec.reference or ""
        if rec.route == "blob" and not await self._has(rec.tenant, ref, rec.repository):
            return deny(404, "BLOB_UNKNOWN", "blob unknown to registry", "unknown-digest")
        by_digest = rec.route == "manifest" and is_digest(ref) and method != "PUT"
        if by_digest and not await self._has(rec.tenant, ref, rec.repository):
            return deny(404, "MANIFEST_UNKNOWN", "manifest unknown", "unknown-digest")
        if rec.route == "manifest" and method == "PUT":
            if "transfer-encoding" in request.headers:
                return deny(
                    411, "SIZE_INVALID", "a manifest needs a Content-Length", "manifest-size"
                )
            if has_large_body(request) and int(request.headers["content-length"]) > MAX_MANIFEST:
                return deny(413, "SIZE_INVALID", "manifest larger than 4 MiB", "manifest-size")
            # Buffer it (≤ 4 MiB): its references are checked in `request`, and the gate
            # forwards nothing until that check has run.
            request.stream = False
            rec.holds.add(MANIFEST_CHECK)
            return None
        if rec.route == "upload" and method == "POST":
            mount = rec.params.get("mount")
            if mount and not await self._has(rec.tenant, mount, rec.params.get("from")):
                rec.params = {k: v for k, v in rec.params.items() if k not in ("mount", "from")}
                rec.decision = "allow:mount dropped"
        if rec.route == "upload" and method in ("PUT", "POST"):
            # A kept mount wins over `digest` (the backend acts on the mount and ignores
            # digest): record what was mounted, never a digest merely named beside it.
            mount = rec.params.get("mount") if method == "POST" else None
            digest = mount or rec.params.get("digest")
            if digest:
                record(flow).pending = [digest]
        return None

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if MANIFEST_CHECK not in rec.holds or flow.response is not None or answered(flow):
            return
        assert rec.tenant is not None
        body = flow.request.raw_content or b""
        method = flow.request.method
        try:
            refs = manifest.read(body, flow.request.headers.get("content-type", ""))
        except manifest.ManifestError as e:
            rec.decision = "deny:manifest-invalid"
            flow.response = oci.error_response(400, "MANIFEST_INVALID", str(e), method=method)
            return
        try:
            missing = [d for d in refs if not await self._has(rec.tenant, d, rec.repository)]
        except (LedgerUnavailable, Unresolved) as e:
            logger.warning("isolation cannot check a manifest now: %s", e)
            rec.decision = "deny:ledger"
            flow.response = oci.error_response(
                503, "UNAVAILABLE", self.unavailable(e), method=method
            )
            return
        if missing:
            rec.decision = "deny:manifest-blob-unknown"
            flow.response = oci.error_response(
                400,
                "MANIFEST_BLOB_UNKNOWN",
                "manifest references unknown blobs",
                method=method,
                detail=missing[:16],
            )
            return
        rec.pending = [manifest.digest_of(body), *refs]
        rec.holds.discard(MANIFEST_CHECK)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A 201 we may have to record is held back (its body is empty or tiny) so that the
        # `response` hook can still turn it into an error if the record cannot be written.
        pending = record(flow).pending is not None
        if pending and flow.response and flow.response.status_code == 201:
            flow.response.stream = False

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        pending, rec.pending = rec.pending, None
        if not pending or self.ledger is None or rec.tenant is None or flow.response is None:
            return
        if flow.response.status_code != 201:  # created: a 202 mount answer means "not mounted"
            return
        confirmed = flow.response.headers.get("docker-content-digest")
        if rec.route == "upload" and confirmed and confirmed not in pending:
            return  # the backend stored something else than what was named: record nothing
        # A manifest pushed makes its repository one the catalog lists.
        try:
            # Off the event loop: an fsync, or PUTs to a shared ledger.
            listed = rec.route == "manifest"
            await asyncio.to_thread(self.ledger.add, rec.tenant, pending, rec.repository, listed)
        except LedgerUnavailable:
            logger.error("ledger: could not record a confirmed push; answering 503")
            rec.decision = "deny:ledger-unavailable"
            flow.response = oci.error_response(
                503,
                "UNAVAILABLE",
                "the registry could not record this push; retry",
                method=flow.request.method,
            )

    async def done(self) -> None:
        if self._task:
            self._task.cancel()
        if self.ledger:
            self.ledger.close()
