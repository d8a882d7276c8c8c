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
import logging
import re
from collections.abc import Callable

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from addons import manifest, mirrors, oci
from addons.backfill import Walker
from addons.gate import answered, fail_closed, has_large_body, respond
from addons.ledger import LedgerUnavailable, holder
from addons.ledgers import AnyLedger, open_ledger
from addons.manifest import MAX_MANIFEST
from addons.record import FlowRecord, record
from addons.routes import DIGEST

logger = logging.getLogger(__name__)
_DIGEST = re.compile(DIGEST)
_PENDING = "tabbify.ledger"  # digests to record once the backend confirms
_MANIFEST_CHECK = "manifest-references"  # a hold: the body's references are checked
RESOLVE_WAIT = 60.0  # seconds a request may wait for its repository's walk
WALK_RETRY = (2.0, 60.0)  # backoff of the start-up walk when the backend fails it
RECHECK_EVERY = 5.0  # seconds between two looks at the ledger file's health


class Unresolved(Exception):
    """The walk that would tell whether a tenant holds a digest has not finished: 503."""


class TenantIsolation:
    def __init__(self) -> None:
        self.ledger: AnyLedger | None = None
        self.walker: Walker | None = None
        self.walk_done = False  # this process has walked everything it had not seen
        self._resolving: dict[str, asyncio.Future[int]] = {}
        self._tenants_resolved: set[str] = set()
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
        """Walk what the ledger has not seen (worker 0; the other workers wait for its
        marker); walk again if the ledger file had to be recreated; meanwhile keep an eye on
        the file (health)."""
        assert self.ledger is not None and self.walker is not None
        delay, recovered = WALK_RETRY[0], -1
        marker = f"/run/{ctx.options.registry_run}"  # not a repository name: no clash
        while True:
            if recovered != self.ledger.recovered:
                try:
                    if ctx.options.registry_worker == 0:
                        n = await asyncio.to_thread(self.walker.everything)
                        await asyncio.to_thread(self.ledger.mark_walked, marker)
                        logger.warning("ledger backfill: %d tenant digests recorded", n)
                    elif not await asyncio.to_thread(self.ledger.walked, marker):
                        await asyncio.sleep(WALK_RETRY[0])  # worker 0 is still walking
                        continue
                except Exception as e:
                    logger.warning("ledger backfill failed (%s); retrying in %.0f s", e, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, WALK_RETRY[1])
                    continue
                self.walk_done, recovered, delay = True, self.ledger.recovered, WALK_RETRY[0]
            await asyncio.sleep(RECHECK_EVERY)
            await asyncio.to_thread(self.ledger.check)
            if recovered != self.ledger.recovered:
                self.walk_done = False
                self._tenants_resolved.clear()

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
        does)? While the start-up walk is unfinished, a miss walks the repository first,
        then the tenant's other repositories (once). Raises LedgerUnavailable / Unresolved
        (both 503)."""
        if await self._readable(tenant, digest, repository):
            return True
        if self.walker is None or self.walk_done:
            return False  # walked: whatever exists came in through the gateway since
        assert self.ledger is not None
        if repository and not await asyncio.to_thread(self.ledger.walked, repository):
            await self._resolve(repository, self.walker.repository, repository)
            if await self._readable(tenant, digest, repository):
                return True
        if tenant not in self._tenants_resolved:
            await self._resolve(f"tenant {tenant}", self.walker.tenant, tenant)
            self._tenants_resolved.add(tenant)
            return await self._lookup(tenant, digest)
        return False

    async def _lookup(self, tenant: str, digest: str) -> bool:
        """A hit is answered from memory; a miss asks the ledger off the event loop (one
        SQLite lookup, or one HEAD on a shared S3 ledger)."""
        assert self.ledger is not None
        if self.ledger.known.cached((tenant, digest)):
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
            deny(503, "UNAVAILABLE", "the registry cannot check this now; retry", "ledger")

    async def _decide(
        self, flow: http.HTTPFlow, rec: FlowRecord, deny: Callable[..., None]
    ) -> None:
        assert rec.tenant is not None
        request, method, ref = flow.request, flow.request.method, rec.reference or ""
        if rec.route == "blob" and not await self._has(rec.tenant, ref, rec.repository):
            return deny(404, "BLOB_UNKNOWN", "blob unknown to registry", "unknown-digest")
        by_digest = rec.route == "manifest" and _DIGEST.fullmatch(ref) and method != "PUT"
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
            rec.holds.add(_MANIFEST_CHECK)
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
                flow.metadata[_PENDING] = [digest]
        return None

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if _MANIFEST_CHECK not in rec.holds or flow.response is not None or answered(flow):
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
                503, "UNAVAILABLE", "the registry cannot check this now; retry", method=method
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
        flow.metadata[_PENDING] = [manifest.digest_of(body), *refs]
        rec.holds.discard(_MANIFEST_CHECK)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A 201 we may have to record is held back (its body is empty or tiny) so that the
        # `response` hook can still turn it into an error if the record cannot be written.
        if _PENDING in flow.metadata and flow.response and flow.response.status_code == 201:
            flow.response.stream = False

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        pending = flow.metadata.pop(_PENDING, None)
        rec = record(flow)
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
