"""Tenant isolation by digest, independent of the backend (runs after RegistryAccess).

A blob or manifest fetched by digest, or a mount, for a digest the tenant has no record of
never reaches the backend: 404 BLOB_UNKNOWN / MANIFEST_UNKNOWN, or a plain upload start. A
manifest may only reference digests the tenant already has. Confirmed uploads and pushes
(2xx from the backend) create the records.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from pathlib import Path

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from addons import manifest, oci
from addons.backfill import backfill
from addons.gate import fail_closed, has_large_body, refuse, refused
from addons.ledger import Ledger
from addons.manifest import MAX_MANIFEST
from addons.record import FlowRecord, record
from addons.routes import DIGEST

logger = logging.getLogger(__name__)
_DIGEST = re.compile(DIGEST)
_PENDING = "tabbify.ledger"  # digests to record once the backend confirms
_MANIFEST_CHECK = "manifest-references"  # a hold: the body's references are checked
BACKFILL_WAIT = 60.0


class TenantIsolation:
    def __init__(self) -> None:
        self.ledger: Ledger | None = None
        self.backfilled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option("registry_ledger", str, "", "Ledger database path; empty = off.")
        loader.add_option(
            "registry_backend", str, "", "Backend base URL, walked at start to backfill."
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_ledger" in updated:
            if self.ledger:
                self.ledger.close()
            path = ctx.options.registry_ledger
            self.ledger = Ledger(Path(path)) if path else None

    async def running(self) -> None:
        if self.ledger is None or not ctx.options.registry_backend:
            self.backfilled.set()
            return
        self._task = asyncio.create_task(self._backfill(ctx.options.registry_backend))

    async def _backfill(self, backend: str) -> None:
        assert self.ledger is not None
        attempt = 0
        while True:
            attempt += 1
            try:
                n = await asyncio.to_thread(backfill, backend, self.ledger)
                logger.warning("ledger backfill: %d tenant digests recorded", n)
                break
            except Exception as e:
                logger.warning("ledger backfill attempt %d failed: %s", attempt, e)
            if attempt == 30:  # ~1 min: stop holding requests back, keep trying behind them
                self.backfilled.set()
            await asyncio.sleep(2 if attempt < 30 else 60)
        self.backfilled.set()

    async def _has(self, tenant: str, digest: str) -> bool:
        assert self.ledger is not None
        if self.ledger.has(tenant, digest):
            return True
        if not self.backfilled.is_set():  # don't lock a tenant out while we are still walking
            try:
                await asyncio.wait_for(self.backfilled.wait(), BACKFILL_WAIT)
            except TimeoutError:
                return False
            return self.ledger.has(tenant, digest)
        return False

    def _active(self, rec: FlowRecord) -> bool:
        return self.ledger is not None and rec.allowed and rec.tenant is not None

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if not self._active(rec) or refused(flow):
            return
        assert rec.tenant is not None
        request, method = flow.request, flow.request.method
        ref = rec.reference or ""

        def deny(status: int, code: str, message: str, why: str) -> None:
            rec.decision = f"deny:{why}"
            refuse(flow, oci.error_response(status, code, message, method=method, detail=ref))

        if rec.route == "blob" and not await self._has(rec.tenant, ref):
            return deny(404, "BLOB_UNKNOWN", "blob unknown to registry", "unknown-digest")
        by_digest = rec.route == "manifest" and _DIGEST.fullmatch(ref) and method != "PUT"
        if by_digest and not await self._has(rec.tenant, ref):
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
            if mount and not await self._has(rec.tenant, mount):
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
        if _MANIFEST_CHECK not in rec.holds or flow.response is not None or refused(flow):
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
        missing = [d for d in refs if not await self._has(rec.tenant, d)]
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
    def response(self, flow: http.HTTPFlow) -> None:
        pending = flow.metadata.pop(_PENDING, None)
        rec = record(flow)
        if not pending or self.ledger is None or rec.tenant is None or flow.response is None:
            return
        if flow.response.status_code != 201:  # created: a 202 mount answer means "not mounted"
            return
        confirmed = flow.response.headers.get("docker-content-digest")
        if rec.route == "upload" and confirmed and confirmed not in pending:
            return  # the backend stored something else than what was named: record nothing
        try:
            self.ledger.add(rec.tenant, pending)
        except sqlite3.Error:
            logger.exception("ledger: could not record a confirmed push; answering 503")
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
