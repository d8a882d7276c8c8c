"""Storage accounting: sizes of confirmed uploads, push times, and `[[quota]]` (contract §8).

Runs before TenantIsolation in the addon list, so that its `response` hook decides before
the isolation ledger records a confirmed push (a refused one is never recorded: the tenant
cannot see it, and it counts for nobody).

- **Sizes.** After a confirmed blob upload or mount (201), the blob's size is asked from
  the backend (HEAD in the repository: its Content-Length), which is right for monolithic,
  chunked and streamed uploads and for mounts alike, and recorded in the ledger per digest.
  A manifest's size is its body's length. Usage per tenant is the sum over the distinct
  digests the ledger says it holds (addons/decisions/quota.py: a blob shared by mount counts in full
  for each tenant, as Harbor counts).
- **Quotas.** A push that adds bytes the tenant does not hold yet and would take it over its
  quota is refused with 403 DENIED "quota exceeded": a monolithic upload already when its
  head declares a Content-Length that cannot fit (before the body is sent), a manifest
  before it is forwarded, and every upload at the latest when the backend confirms it. Then
  the 201 becomes the 403, nothing is recorded, and the blob's link in that repository is
  deleted in the backend (unless the repository already held the digest); GC takes the
  bytes later. Re-pushing what the tenant holds never counts (quota.would_exceed).
- **Push times** (retention's `keep_last` and `untagged_after`): when a manifest PUT is
  confirmed, the ledger records when, for the manifest and the tag it was pushed to.
- **Usage for /metrics**: worker 0 computes every tenant's usage every USAGE_EVERY seconds
  and publishes it (addons/gateway/publish.py); the admin endpoint serves it as
  `tabbify_tenant_usage_bytes{tenant=…}`.

A confirmed upload under a quota is decided and recorded in one ledger transaction
(`admit`), so uploads of one tenant confirmed at the same time cannot overshoot together.

**Unfinished uploads** count too: the bytes of upload sessions not finished yet, reserved
before they are sent (uploads.py; streamcap.py caps a body without a length as it streams).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, cast

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from addons.clients.backend import AsyncClient, Unavailable
from addons.decisions import quota
from addons.decisions.routes import is_digest
from addons.engine import oci
from addons.gateway.gate import answered, fail_closed, respond
from addons.gateway.isolation import REBUILDING, TenantIsolation
from addons.gateway.policy_store import PolicyFile
from addons.gateway.record import FlowRecord, record
from addons.gateway.uploads import Uploads, take_upload
from addons.storage.ledger import (
    UPLOAD_AGE,
    Accounts,
    LedgerUnavailable,
    holder,
)

logger = logging.getLogger(__name__)

USAGE_EVERY = 5.0


class Unaccountable(LedgerUnavailable):
    """A quota applies but this ledger keeps no sizes: refuse the push (fail closed)."""


class Accounting:
    def __init__(self, policies: PolicyFile, isolation: TenantIsolation) -> None:
        self.policies = policies
        self.isolation = isolation
        self.client: AsyncClient | None = None
        self.usage: dict[str, int] | None = None  # every tenant's, published by worker 0
        self.uploading: dict[str, int] = {}  # bytes in unfinished uploads, per tenant
        self.quotas: dict[str, int | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._expired_at = 0.0
        self.uploads = Uploads(lambda: self.ledger, self._quota, self.quota_rule, self._refuse)

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_upload_age",
            int,
            int(UPLOAD_AGE),
            "Seconds after which an untouched unfinished upload no longer counts against its "
            "tenant's quota (the backend purges it after the same age).",
        )

    @property
    def ledger(self) -> Accounts | None:
        """The ledger sizes, usage and push times are kept in: SQLite, or PostgreSQL shared by
        several nodes. The shared S3 ledger keeps none (README, known limits): quotas then
        refuse pushes."""
        ledger = self.isolation.ledger
        return cast(Accounts, ledger) if ledger is not None and ledger.accounts else None

    def _client(self) -> AsyncClient:
        if self.client is None:
            self.client = AsyncClient(ctx.options.registry_backend)
        return self.client

    async def running(self) -> None:
        if self.ledger is not None and ctx.options.registry_worker == 0:
            self._task = asyncio.create_task(self._publish_usage())

    async def _publish_usage(self) -> None:
        while True:
            ledger = self.ledger
            if ledger is not None:
                try:
                    usage = await asyncio.to_thread(ledger.usage_all)
                    policy = self.policies.current()
                    tenants = set(usage) | {t for q in policy.quotas for t in q.tenants if t != "*"}
                    self.quotas = {
                        t: (q.bytes if (q := policy.quota(t)) else None) for t in sorted(tenants)
                    }
                    self.usage = {t: usage.get(t, 0) for t in sorted(tenants)}
                    age = ctx.options.registry_upload_age
                    if time.monotonic() - self._expired_at >= min(60.0, age / 2):
                        self._expired_at = time.monotonic()
                        await asyncio.to_thread(ledger.expire_uploads, age=age)
                    self.uploading = await asyncio.to_thread(ledger.uploading_all)
                except LedgerUnavailable:
                    pass
                except Exception:
                    logger.exception("usage per tenant: cannot compute")
            await asyncio.sleep(USAGE_EVERY)

    def state(self) -> dict[str, Any] | None:
        if self.usage is None:
            return None
        return {
            "usage": self.usage,
            "quotas": self.quotas,
            "uploading": self.uploading,
            "time": time.time(),
        }

    # --- quota decisions ------------------------------------------------------------------

    def _quota(self, rec: FlowRecord) -> int | None:
        if rec.tenant is None or self.isolation.ledger is None:
            return None
        rule = self.policies.current().quota(rec.tenant)
        if rule is not None and self.ledger is None:
            raise Unaccountable("quotas need a ledger that keeps sizes; an S3 ledger does not")
        return rule.bytes if rule else None

    def quota_rule(self, flow: http.HTTPFlow) -> str:
        """The name (`quota <file>:<line>`) of the rule setting the caller's quota."""
        tenant = record(flow).tenant
        policy = self.policies.current()
        rule = policy.quota(tenant) if tenant is not None else None
        return policy.name(rule) if rule is not None else "quota"

    def _exceeds(
        self, rec: FlowRecord, limit: int, digests: dict[str, int]
    ) -> tuple[int, int] | None:
        """Would adding these digests (digest → size) take the tenant over `limit`? If so,
        (bytes used, bytes it would add)."""
        ledger, tenant = self.ledger, rec.tenant
        assert ledger is not None and tenant is not None
        adding = sum(n for d, n in digests.items() if not ledger.has(tenant, d))
        if adding <= 0:
            return None
        # Its unfinished uploads count too (expired ones are swept within a minute).
        flying = sum(stored + pending for stored, pending in ledger.uploads(tenant).values())
        used = ledger.usage(tenant) + flying
        if quota.would_exceed(tenant, {tenant: used}, limit, adding):
            return used, adding
        return None

    def _refuse(self, flow: http.HTTPFlow, limit: int, used: int, adding: int) -> http.Response:
        rec = record(flow)
        rec.decision = "deny:quota exceeded"
        rule = self.quota_rule(flow)
        message = quota.refusal(used, limit, adding, rule)
        detail = {"tenant": rec.tenant, "quota_bytes": limit, "used_bytes": used, "rule": rule}
        return oci.error_response(403, "DENIED", message, method=flow.request.method, detail=detail)

    @fail_closed
    async def streamed_request_end(self, flow: http.HTTPFlow) -> None:
        """A streamed body ended while bytes of it wait for the ledger's answer
        (engine/bodyend.py): its end goes on once the answer is in."""
        upload = record(flow).upload
        if upload is not None and upload.cap is not None:
            await upload.cap.finish()

    def _unavailable(self, flow: http.HTTPFlow) -> http.Response:
        record(flow).decision = "deny:quota-unchecked"
        return oci.error_response(
            503, "UNAVAILABLE", "cannot check the quota now; retry", method=flow.request.method
        )

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Early refusal of a monolithic upload whose declared size cannot fit, and of every
        write under a quota this node cannot account for (fail closed)."""
        rec = record(flow)
        if not rec.allowed or answered(flow) or rec.tenant is None:
            return
        method = flow.request.method
        writes = rec.route == "upload" or (rec.route == "manifest" and method == "PUT")
        shared = self.ledger is None and self.isolation.ledger is not None
        if writes and shared and self.policies.current().quota(rec.tenant) is not None:
            logger.warning("quota for %s: this node's ledger keeps no sizes", rec.tenant)
            respond(flow, self._unavailable(flow))
            return
        quoted = writes and self.policies.current().quota(rec.tenant) is not None
        try:
            if quoted and not await self.isolation.vouches():  # usage would be counted short
                rec.decision = "deny:quota-unchecked"
                respond(flow, oci.error_response(503, "UNAVAILABLE", REBUILDING, method=method))
                return
        except LedgerUnavailable:
            respond(flow, self._unavailable(flow))
            return
        if rec.route != "upload" or method not in ("PUT", "POST", "PATCH"):
            return
        try:
            limit = self._quota(rec)
            if limit is not None:
                await self.uploads.open(flow, rec, limit)
        except LedgerUnavailable:
            respond(flow, self._unavailable(flow))

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        """A manifest (body read and checked by TenantIsolation's hold): its own bytes."""
        rec = record(flow)
        if rec.route != "manifest" or flow.request.method != "PUT" or flow.response is not None:
            return
        if answered(flow) or not rec.allowed or flow.request.stream:
            return
        body = flow.request.raw_content or b""
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        try:
            limit = self._quota(rec)
            if limit is not None and (
                over := await asyncio.to_thread(self._exceeds, rec, limit, {digest: len(body)})
            ):
                flow.response = self._refuse(flow, limit, *over)
        except LedgerUnavailable:
            flow.response = self._unavailable(flow)

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """An upload's 404 is read whole (a short error body): its code says whether the
        session is gone."""
        response = flow.response
        if record(flow).route == "upload" and response is not None and response.status_code == 404:
            response.stream = False

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        rec, response = record(flow), flow.response
        upload = take_upload(rec)
        if response is None or rec.tenant is None or not rec.allowed or answered(flow):
            if upload is not None:  # refused after the reservation: nothing was sent
                await self.uploads.settle(upload, rec, None, stored=None, grown=0)
            return
        ledger = self.ledger
        if ledger is None or not ctx.options.registry_backend:
            return
        method = flow.request.method
        if rec.route == "manifest" and method == "PUT" and response.status_code == 201:
            await self._manifest_pushed(flow, rec)
            return
        if rec.route != "upload":
            return
        pending = rec.pending  # what TenantIsolation will record (set in its hooks)
        if response.status_code != 201 or not pending:
            await self.uploads.answered(flow, rec, upload)
            return
        digest = response.headers.get("docker-content-digest") or pending[0]
        if digest not in pending or not is_digest(digest) or not rec.repository:
            if upload is not None:  # the session ended; its blob counts for nobody
                await self.uploads.drop(upload)
            return  # isolation records nothing either
        try:
            size = await self._size(rec.repository, digest)
            limit = self._quota(rec)
            # Off the event loop: a durable write (fsync), and the usage sum. Under a quota,
            # the decision and the tenant's record are one transaction (Ledger.admit), so
            # uploads confirmed at the same time are counted one after the other.
            # The upload session ends with this confirmation: its bytes become the blob's.
            if upload is not None:
                upload.done = upload.gone = True
            session = upload.session if upload is not None else None
            if session is None and method == "PUT":
                session = f"{rec.repository}@{rec.reference}"
            if limit is None:
                await asyncio.to_thread(ledger.record_sizes, {digest: size})
                if upload is not None:  # the quota went away meanwhile
                    await asyncio.to_thread(ledger.drop_upload, rec.tenant, upload.session)
                return
            admitted = await asyncio.to_thread(
                ledger.admit,
                rec.tenant,
                digest,
                size,
                limit,
                session,
                age=ctx.options.registry_upload_age,
            )
            if not admitted:
                flow.response = self._refuse(flow, limit, admitted.used, size)
                rec.pending = None  # isolation records nothing
                if not await asyncio.to_thread(ledger.has, holder(rec.repository), digest):
                    await self._unlink(rec.repository, digest)
        except (LedgerUnavailable, Unavailable, ValueError) as e:
            logger.warning("quota: cannot account for an upload to %s: %s", rec.repository, e)
            if self._quota(rec) is not None:
                rec.pending = None
                flow.response = self._unavailable(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        """A request that ended without an answer (cut, client gone): whatever it sent may
        be stored, so it counts until the session is answered again, forgotten or expired."""
        rec = record(flow)
        upload = take_upload(rec)
        if upload is not None:
            await self.uploads.settle(upload, rec, None, stored=None, grown=upload.sent(rec))

    async def _manifest_pushed(self, flow: http.HTTPFlow, rec: FlowRecord) -> None:
        ledger = self.ledger
        assert ledger is not None and rec.repository is not None
        body = None if flow.request.stream else flow.request.raw_content
        if body is None:
            return
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        tag = rec.reference if rec.reference and not is_digest(rec.reference) else None
        try:
            await asyncio.to_thread(ledger.record_sizes, {digest: len(body)})
            await asyncio.to_thread(ledger.record_push, rec.repository, digest, tag)
        except LedgerUnavailable as e:  # push times are best effort: unknown = kept by GC
            logger.warning("could not record a push time for %s: %s", rec.repository, e)

    async def _size(self, repository: str, digest: str) -> int:
        r = await self._client().request("HEAD", f"/v2/{repository}/blobs/{digest}")
        length = r.headers.get("content-length", "")
        if r.status != 200 or not length.isdigit():
            raise ValueError(f"HEAD of a confirmed blob answered {r.status}")
        return int(length)

    async def _unlink(self, repository: str, digest: str) -> None:
        try:
            r = await self._client().request("DELETE", f"/v2/{repository}/blobs/{digest}")
            if r.status not in (202, 404):
                logger.warning("quota: unlinking a refused blob answered %d", r.status)
        except Unavailable as e:
            logger.warning("quota: cannot unlink a refused blob: %s", e)

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.client is not None:
            await self.client.close()
