"""Pulls of `mirror/<name>/<repository>`: where they go, what comes back (mirrors file).

RegistryAccess has decided as for any repository (the policy's pull right; no push or delete
there, routes.py). Here:

- A mirror the file does not name: 404 NAME_UNKNOWN.
- Where it goes (the gate applies it, gate.Gate.forward): with Distribution, the mirror's own
  proxy-mode instance on its loopback port, as `/v2/<repository>/…` (its own storage root,
  so no digest of a tenant can ever be reached through it); with Zot, the backend itself,
  path unchanged (its sync extension stores under /mirror/<name>).
- A by-digest GET answered 200 is hashed while it streams; the last chunk is held back until
  the digest is known, and on a mismatch the connection is cut before it: the client never
  gets a complete body that is not the named digest (Distribution's proxy streams upstream
  bytes to the first client unchecked; it checks only what it commits to its storage).
- Concurrent pulls of the same blob in one worker wait for the first one (bounded), so they
  are served from the mirror's store rather than each fetching from the upstream.
- Tags: a tag resolved less than the mirror's `tag_ttl` ago is served by its digest, from
  the cache, without asking the upstream. Older, the gateway asks the mirror (which asks the
  upstream) with a deadline (CHECK_TIMEOUT): the answer's digest is served; when the upstream
  cannot answer (error, timeout), the digest last resolved is served; with none, 503. Every
  manifest GET is then by digest, so it is verified as above. Distribution's proxy alone has
  no timeout towards the upstream (Go's DefaultTransport) and asks it on every tag pull.
- By-digest reads are checked the same way first (a HEAD with the deadline): a mirror that
  does not have the digest and an upstream that does not answer give 503, never a hang.
  (Tag lists are not: Distribution's proxy asks the upstream for them without a timeout.)
- Blobs: read from a mirror only when a manifest served from that repository through the
  gateway references it (recorded in the isolation ledger under the repository; with
  tenants). With Zot, whose dedupe would hand any stored digest to whoever names it in any
  repository, no tenant's digest is thus reachable under mirror/.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from addons.clients.backend import Answer, AsyncClient, Unavailable
from addons.config import mirrors
from addons.decisions import manifest
from addons.decisions.manifest import MAX_MANIFEST
from addons.decisions.routes import is_digest
from addons.decisions.target import Target
from addons.engine import oci
from addons.gateway.gate import answered, fail_closed, respond
from addons.gateway.record import FlowRecord, record
from addons.storage.ledger import LedgerUnavailable, holder

logger = logging.getLogger(__name__)

SINGLE_FLIGHT_WAIT = 120.0  # seconds a pull waits for the same blob's first fetch, at most
CHECK_TIMEOUT = 15.0  # seconds the upstream has to answer a tag or digest check
MAX_TAGS = 10_000  # resolved tags kept per worker
_UNAVAILABLE = "the upstream registry of this mirror did not answer; retry later"


class DigestCheck:
    """Hashes a streamed body; holds back the last chunk until the end, where it is released
    only when the whole body has the named digest (and is at most `limit` bytes: a manifest
    is, a blob has no limit)."""

    def __init__(self, rec: FlowRecord, digest: str, limit: int | None = None) -> None:
        self.rec, self.expected, self.limit, self.size = rec, digest, limit, 0
        algorithm, _, _ = digest.partition(":")
        self.hash = hashlib.new(algorithm)
        self.held = b""
        self.failed = False

    def __call__(self, chunk: bytes) -> bytes:
        self.rec.bytes_out += len(chunk)
        self.size += len(chunk)
        if self.failed or (self.limit is not None and self.size > self.limit):
            self.failed = True  # nothing more passes; the response hook cuts the connection
            return b""
        if chunk:
            self.hash.update(chunk)
            out, self.held = self.held, chunk
            return out
        got = f"{self.hash.name}:{self.hash.hexdigest()}"
        if got != self.expected:
            self.failed = True
            return b""  # never the last byte: the response hook cuts the connection
        out, self.held = self.held, b""
        return out


class MirrorGate:
    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Event] = {}
        # (repository, tag) -> (digest, monotonic time it was resolved)
        self.tags: dict[tuple[str, str], tuple[str, float]] = {}
        self._clients: dict[str, AsyncClient] = {}  # by base URL: a mirror's instance, or Zot

    def client(self, base: str) -> AsyncClient:
        client = self._clients.get(base)
        if client is None:
            client = self._clients[base] = AsyncClient(
                base, timeout=CHECK_TIMEOUT, deadline=CHECK_TIMEOUT
            )
        return client

    async def done(self) -> None:
        for client in self._clients.values():
            await client.close()

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_mirrors",
            str,
            "",
            'Mirrors: JSON {name: "host:port" of its proxy instance, or "" for the backend}.',
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_mirrors" in updated:
            try:
                routes = mirrors.parse_routes_option(ctx.options.registry_mirrors)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            mirrors.ROUTES.clear()
            mirrors.ROUTES.update({name: addr for name, (addr, _) in routes.items()})
            mirrors.TAG_TTLS.clear()
            mirrors.TAG_TTLS.update({name: ttl for name, (_, ttl) in routes.items()})

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if not rec.allowed or answered(flow) or not rec.repository:
            return
        if not mirrors.is_mirror(rec.repository):
            return
        method = flow.request.method
        if mirrors.resolve(rec.repository) is None:
            rec.decision = "deny:no-such-mirror"
            respond(
                flow,
                oci.error_response(
                    404, "NAME_UNKNOWN", "no such mirror on this registry", method=method
                ),
            )
            return
        ref = rec.reference or ""
        by_digest = rec.route in ("blob", "manifest") and oci_digest(ref)
        if rec.route == "manifest" and not by_digest and method in ("GET", "HEAD"):
            resolved = await self._resolve_tag(flow, rec, ref)
            if resolved is None:
                return
            ref, by_digest = resolved, oci_digest(resolved)  # a tag: the mirror's own answer
        else:
            if rec.route == "blob" and not await self._referenced(flow, rec):
                return
            if by_digest and method in ("GET", "HEAD") and not await self._present(flow, rec):
                return
        if by_digest and method == "GET":
            rec.mirror_verify = ref
            if rec.route == "manifest" and self._ledger(rec) is not None:
                rec.mirror_record = True  # buffered, verified, its references recorded
        if rec.route == "blob" and method == "GET" and by_digest:
            await self._single_flight(flow, f"{rec.repository}@{ref}")

    @staticmethod
    def _ledger(rec: FlowRecord) -> Any:
        """The isolation ledger, with tenants (anonymous mode: none, and nothing to isolate)."""
        isolation = ctx.master.addons.get("tenantisolation")
        ledger = isolation.ledger if isolation is not None else None
        return ledger if rec.tenant is not None else None

    async def _referenced(self, flow: http.HTTPFlow, rec: FlowRecord) -> bool:
        """A blob is read from a mirror only when a manifest this gateway served from that
        repository references it. With Zot, mirrored repositories share its storage and its
        dedupe cache, which would hand any stored digest (a tenant's) to a request naming
        it; so a digest never seen in the mirror never reaches the backend."""
        ledger = self._ledger(rec)
        if ledger is None:
            return True
        assert rec.repository is not None
        key = (holder(rec.repository), rec.reference or "")
        try:
            found = ledger.recorded.cached(key) or await asyncio.to_thread(ledger.has, *key)
        except LedgerUnavailable:
            self._unavailable(flow, rec, "the ledger is unavailable")
            return False
        if not found:
            rec.decision = "deny:mirror-unknown-digest"
            respond(
                flow,
                oci.error_response(
                    404, "BLOB_UNKNOWN", "blob unknown to registry: pull its manifest first",
                    method=flow.request.method,
                ),
            )  # fmt: skip
        return bool(found)

    def _unavailable(self, flow: http.HTTPFlow, rec: FlowRecord, why: str) -> None:
        logger.warning("mirror %s: %s", rec.repository, why)
        rec.decision = "deny:mirror-upstream-unavailable"
        respond(
            flow, oci.error_response(503, "UNAVAILABLE", _UNAVAILABLE, method=flow.request.method)
        )

    async def _head(self, flow: http.HTTPFlow, rec: FlowRecord, tail: str) -> Answer:
        """HEAD `tail` of the repository at its mirror, with the client's Accept fields (an
        OCI manifest is unknown to Distribution for a client that does not accept it)."""
        assert rec.repository is not None
        base, name = mirrors.resolve(rec.repository) or (None, rec.repository)
        accept = ", ".join(flow.request.headers.get_all("accept")[:16]) or None
        client = self.client(base or ctx.options.registry_backend)
        return await client.request("HEAD", f"/v2/{name}/{tail}", accept=accept)

    async def _present(self, flow: http.HTTPFlow, rec: FlowRecord) -> bool:
        """A by-digest read: the mirror has it or gets it in time; else answered here (503)."""
        kind = "blobs/" if rec.route == "blob" else "manifests/"
        try:
            r = await self._head(flow, rec, f"{kind}{rec.reference or ''}")
        except Unavailable as e:
            self._unavailable(flow, rec, f"checking {rec.reference}: {e}")
            return False
        if r.status >= 500:
            self._unavailable(
                flow, rec, f"checking {rec.reference}: the mirror answered {r.status}"
            )
            return False
        return True  # 200, or the mirror's own 404 that the forwarded request will get too

    async def _resolve_tag(self, flow: http.HTTPFlow, rec: FlowRecord, tag: str) -> str | None:
        """The digest to serve for `tag` (the request now asks for it), or None when answered
        here (503)."""
        assert rec.repository is not None and rec.target is not None
        name = (mirrors.split(rec.repository) or ("", ""))[0]
        key, now = (rec.repository, tag), time.monotonic()
        cached = self.tags.get(key)
        if cached is not None and now - cached[1] < mirrors.TAG_TTLS.get(name, 0):
            digest = cached[0]
        else:
            digest = None
            try:
                r = await self._head(flow, rec, f"manifests/{tag}")
                named = r.headers.get("docker-content-digest", "")
                if r.status == 200 and oci_digest(named):
                    digest = named
                    if len(self.tags) >= MAX_TAGS:
                        self.tags.clear()
                    self.tags[key] = (digest, now)
                elif r.status < 500:
                    return tag  # the mirror's answer (404, ...) is the forwarded request's
                else:
                    why = f"the mirror answered {r.status}"
            except Unavailable as e:
                why = str(e)
            if digest is None:
                if cached is None:
                    self._unavailable(flow, rec, f"tag {tag}: {why}, nothing cached")
                    return None
                logger.warning(
                    "mirror %s: tag %s: upstream did not answer (%s); serving the cached %s",
                    rec.repository, tag, why, cached[0],
                )  # fmt: skip
                digest = cached[0]
        path = rec.target.path
        rec.target = Target(
            path[: path.rindex("/manifests/")] + f"/manifests/{digest}", rec.target.params
        )
        # What is served is that digest: the signature check, the verification and the
        # access log all name it (the tag stays in the decision's note).
        rec.reference = digest
        rec.decision = f"allow:mirror tag {tag}"
        return digest

    async def _single_flight(self, flow: http.HTTPFlow, key: str) -> None:
        """The first pull of a blob goes on; others wait for it to end (then the mirror
        serves them from its store), at most SINGLE_FLIGHT_WAIT seconds."""
        event = self._inflight.get(key)
        if event is None:
            self._inflight[key] = asyncio.Event()
            record(flow).mirror_first = key
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), SINGLE_FLIGHT_WAIT)
        # Distribution commits what it fetched a moment after the first answer ends.
        await asyncio.sleep(0.5)

    def _release(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        key, rec.mirror_first = rec.mirror_first, None
        if key is not None:
            event = self._inflight.pop(key, None)
            if event is not None:
                event.set()

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        expected, response = rec.mirror_verify, flow.response
        if not isinstance(expected, str) or response is None or response.status_code != 200:
            return
        named = response.headers.get("docker-content-digest")
        if named is not None and named != expected:
            self._refuse(flow, f"the mirror named {named} for {expected}")
            return
        if rec.mirror_record:
            length = response.headers.get("content-length", "")
            if not length.isdigit() or int(length) > MAX_MANIFEST:
                self._refuse(flow, "a manifest without a length or larger than 4 MiB")
                return
            response.stream = False  # ≤ 4 MiB: checked and recorded in `response`
            return
        check = DigestCheck(rec, expected, MAX_MANIFEST if rec.route == "manifest" else None)
        rec.mirror_verify = check
        response.stream = check

    def _refuse(self, flow: http.HTTPFlow, why: str) -> None:
        rec = record(flow)
        logger.error(
            "mirror %s: upstream content does not match its digest (%s): not served",
            rec.repository,
            why,
        )
        rec.decision = "deny:mirror-digest-mismatch"
        flow.kill()

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        self._release(flow)
        rec = record(flow)
        check, rec.mirror_verify = rec.mirror_verify, None
        recorded, rec.mirror_record = rec.mirror_record, False
        if isinstance(check, DigestCheck) and check.failed:
            self._refuse(flow, f"the body's digest is not {check.expected}")
        elif isinstance(check, str) and recorded:
            await self._record(flow, check)

    async def _record(self, flow: http.HTTPFlow, expected: str) -> None:
        """A buffered manifest from a mirror: served only when it has the named digest, and
        only once what it references is recorded for its repository (_referenced)."""
        rec, response = record(flow), flow.response
        if response is None or response.status_code != 200 or response.stream:
            return
        body = response.content or b""
        algorithm, _, _ = expected.partition(":")
        if f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}" != expected:
            self._refuse(flow, f"the body's digest is not {expected}")
            return
        try:
            refs = manifest.references(manifest.parse(body))
        except manifest.ManifestError:
            refs = []  # served as it is; nothing it would name becomes readable
        ledger = self._ledger(rec)
        if ledger is None or rec.repository is None:
            return
        try:
            await asyncio.to_thread(ledger.add, holder(rec.repository), [expected, *refs])
        except LedgerUnavailable:
            logger.error("ledger: could not record a mirrored manifest; answering 503")
            rec.decision = "deny:ledger-unavailable"
            flow.response = oci.error_response(
                503, "UNAVAILABLE", "the registry cannot serve this now; retry",
                method=flow.request.method,
            )  # fmt: skip

    def error(self, flow: http.HTTPFlow) -> None:
        self._release(flow)


def oci_digest(ref: str) -> bool:
    return is_digest(ref)
