"""Unfinished uploads of tenants under a quota (contract §8): the accounting addon's
bookkeeping of upload sessions (accounting.py decides on confirmed pushes; this module on the
bytes on their way to one).

For a tenant under a quota, the ledger keeps each upload session it has open
(`<repository>@<upload id>`): the bytes the backend said it stored, and those being sent now.
Every request that sends bytes into a session reserves them first, in one ledger transaction
with the quota decision (`reserve`; across workers and, with PostgreSQL, across nodes): a
PATCH, or a PUT/POST with a body, whose Content-Length would take the tenant's usage plus its
unfinished uploads over the quota is refused with 403 before a byte reaches the backend. A
body without a length (chunked) reserves as it streams (streamcap.py: the cap asks here), and
its connection is cut once the quota has nothing more for it. A refusal while the tenant's
other requests hold room they reserved ahead is asked again until they give it back
(streamcap.WAIT_OTHERS at most). The answer settles the session (`settle`: the backend's
`Range` says what it holds); a completed upload's bytes become its blob's in the same
transaction that admits it (accounting.py); a cancelled (DELETE) or unknown (404) upload is
forgotten; one untouched for `registry_upload_age` seconds is forgotten, as the backend purges
it after the same age (zot/config.py). A tenant under a quota holds at most MAX_UPLOADS
unfinished uploads: one more upload start is refused with 429.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from urllib.parse import urlsplit

from mitmproxy import ctx, http

from addons.decisions import routes
from addons.engine import oci
from addons.gateway.access import backend_error_code
from addons.gateway.gate import respond
from addons.gateway.record import FlowRecord, record
from addons.gateway.streamcap import (
    InFlight,
    StreamCap,
    grant_size,
    retry_in,
    worth_waiting,
)
from addons.storage.ledger import MAX_UPLOADS, Accounts, LedgerUnavailable, Reservation

logger = logging.getLogger(__name__)

_RANGE = re.compile(r"0-([0-9]{1,18})")


def take_upload(rec: FlowRecord) -> InFlight | None:
    """The upload session this request reserved bytes in, taken off its record once."""
    upload, rec.upload = rec.upload, None
    assert upload is None or isinstance(upload, InFlight)
    return upload


def session_of(location: str, repository: str) -> str | None:
    """The upload session a backend's upload `Location` names in `repository`, if any."""
    route = routes.parse(urlsplit(location).path, "PATCH")
    if not isinstance(route, routes.Route) or route.kind != "upload" or not route.reference:
        return None
    return f"{repository}@{route.reference}" if route.name == repository else None


def stored_from(response: http.Response) -> int | None:
    """What the backend holds of an upload, from its `Range: 0-<last byte>` answer."""
    m = _RANGE.fullmatch(response.headers.get("range", ""))
    return int(m[1]) + 1 if m else None


class Uploads:
    """The upload sessions' reservations (streamcap.Grants for the cap of a streamed body).
    What it needs of the accounting addon comes as functions: the ledger (None without one
    that keeps sizes), the tenant's quota for a request, the name of the rule that sets it,
    and the 403 a quota refusal answers."""

    def __init__(
        self,
        ledger: Callable[[], Accounts | None],
        quota: Callable[[FlowRecord], int | None],
        quota_rule: Callable[[http.HTTPFlow], str],
        refuse: Callable[[http.HTTPFlow, int, int, int], http.Response],
    ) -> None:
        self._ledger, self._quota, self._rule, self._refuse = ledger, quota, quota_rule, refuse

    @property
    def ledger(self) -> Accounts | None:
        return self._ledger()

    def quota_rule(self, flow: http.HTTPFlow) -> str:
        return self._rule(flow)

    async def open(self, flow: http.HTTPFlow, rec: FlowRecord, limit: int) -> None:
        """Reserve the bytes this request sends into its upload session (or, for an upload
        start, a place among the tenant's unfinished uploads), or refuse it before a byte
        is stored."""
        assert rec.tenant is not None and rec.repository is not None
        request, method = flow.request, flow.request.method
        length = request.headers.get("content-length", "")
        streamed = "transfer-encoding" in request.headers
        adding = int(length) if length.isdigit() else 0
        if method == "PUT" and not adding and not streamed:
            return  # no body: the confirmation is decided by `admit` (response)
        digest, held = rec.params.get("digest"), False
        if method != "PATCH" and digest and (adding or streamed):
            # Re-pushing what the tenant holds is never refused (quota.would_exceed), even
            # over a lowered quota; its bytes still count while they are in flight.
            ledger = self.ledger
            assert ledger is not None
            held = await asyncio.to_thread(ledger.has, rec.tenant, digest)
        start = method == "POST"
        session = f"post:{flow.id}" if start else f"{rec.repository}@{rec.reference}"
        upload = InFlight(rec.tenant, session, start=start)
        capped = streamed and not held
        if capped:  # no length: a first grant, more as it streams
            got = await self._first(upload, grant_size(limit), limit, upto=True)
        else:
            got = await self._first(upload, adding, limit, force=held)
        if not got and (not held or got.reason == "uploads"):
            respond(flow, self._refuse_reservation(flow, limit, got, adding))
            return
        upload.reserved = got.granted
        if capped:
            step = grant_size(limit - got.used - got.granted)
            upload.cap = StreamCap(self, flow, upload, limit, got.granted, step, got.used)
            request.stream = upload.cap
        rec.upload = upload

    async def _first(
        self, upload: InFlight, adding: int, limit: int, force: bool = False, upto: bool = False
    ) -> Reservation:
        """A request's first reservation. Refused for the quota while the tenant's other
        requests hold room they reserved ahead (streamed bodies reserve before they send):
        asked again until they give it back, WAIT_OTHERS at most."""
        loop = asyncio.get_running_loop()
        since = loop.time()
        while True:
            got = await self.reserve(upload, adding, limit, force=force, upto=upto)
            waited = loop.time() - since
            if got or got.reason != "quota" or not worth_waiting(got, 0, waited):
                return got
            await asyncio.sleep(retry_in(waited))

    def _refuse_reservation(
        self, flow: http.HTTPFlow, limit: int, got: Reservation, adding: int
    ) -> http.Response:
        if got.reason != "uploads":
            return self._refuse(flow, limit, got.used, adding)
        record(flow).decision = "deny:too many unfinished uploads"
        age = int(ctx.options.registry_upload_age)
        return oci.error_response(
            429,
            "TOOMANYREQUESTS",
            f"too many unfinished uploads: {got.uploads} open, at most {MAX_UPLOADS}; finish "
            f"or cancel one (an upload untouched for {age} s no longer counts)",
            method=flow.request.method,
            detail={"tenant": record(flow).tenant, "unfinished_uploads": got.uploads},
        )

    async def reserve(
        self, upload: InFlight, adding: int, limit: int, force: bool = False, upto: bool = False
    ) -> Reservation:
        ledger = self.ledger
        assert ledger is not None
        return await asyncio.to_thread(
            ledger.reserve,
            upload.tenant,
            upload.session,
            adding,
            limit,
            force=force,
            upto=upto,
            age=ctx.options.registry_upload_age,
            max_uploads=MAX_UPLOADS,
        )

    async def give_back(self, upload: InFlight, granted: int) -> None:
        """A grant that came back after its request ended: released at once (with the
        session, when the session ended too)."""
        ledger = self.ledger
        if ledger is None or granted <= 0:
            return
        try:
            if upload.gone:
                await asyncio.to_thread(ledger.drop_upload, upload.tenant, upload.session)
            else:
                await asyncio.to_thread(ledger.settle, upload.tenant, upload.session, granted)
        except LedgerUnavailable as e:  # it expires with age
            logger.warning("quota: cannot give a grant back: %s", e)

    async def answered(self, flow: http.HTTPFlow, rec: FlowRecord, upload: InFlight | None) -> None:
        """An upload request the backend answered without confirming a blob: what the
        session holds now, or that it is gone."""
        response, method = flow.response, flow.request.method
        assert response is not None and rec.tenant is not None and rec.repository is not None
        status = response.status_code
        # Cancelled, unknown to the backend, or completed (a 201 isolation records nothing
        # for). Only BLOB_UPLOAD_UNKNOWN says the session does not exist: Distribution also
        # answers 404 (BLOB_UPLOAD_INVALID) to a stale or forged upload state, and the
        # session then lives on.
        unknown = status == 404 and backend_error_code(response.content or b"") == (
            "BLOB_UPLOAD_UNKNOWN"
        )
        gone = unknown or status == 201 or (method == "DELETE" and status == 204)
        if gone and method != "POST":
            if upload is not None:
                upload.done = upload.gone = True
            try:
                if self._quota(rec) is not None:
                    ledger = self.ledger
                    assert ledger is not None
                    session = f"{rec.repository}@{rec.reference}"
                    await asyncio.to_thread(ledger.drop_upload, rec.tenant, session)
            except LedgerUnavailable as e:  # it expires with age
                logger.warning("quota: cannot forget an upload: %s", e)
            return
        if upload is None:
            return
        if upload.start:
            session = session_of(response.headers.get("location", ""), rec.repository)
            if status == 202 and session is not None:
                await self.settle(upload, rec, session, stored=None, grown=upload.sent(rec))
            else:
                await self.drop(upload)
            return
        ok = 200 <= status < 300
        stored = stored_from(response) if ok else None
        # A PUT the backend refused (a digest that does not match) may leave its body in the
        # session (the backend did not say): it counts until the session is answered again,
        # forgotten or expired. A refused PATCH (a wrong range) stored nothing.
        grown = upload.sent(rec) if (ok and stored is None) or method == "PUT" else 0
        await self.settle(upload, rec, None, stored=stored, grown=grown)

    async def settle(
        self,
        upload: InFlight,
        rec: FlowRecord,
        renamed: str | None,
        stored: int | None,
        grown: int,
    ) -> None:
        """The request's reservation released; the session holds `stored` bytes (or `grown`
        more). `renamed`: an upload start's session id. Best effort: a session the ledger
        cannot update now expires with age."""
        upload.done = True
        ledger = self.ledger
        if ledger is None:
            return
        try:
            if upload.start and renamed is None:
                await asyncio.to_thread(ledger.drop_upload, upload.tenant, upload.session)
                return
            if renamed is not None:
                await asyncio.to_thread(
                    ledger.rename_upload, upload.tenant, upload.session, renamed
                )
                upload.session = renamed
            await asyncio.to_thread(
                ledger.settle, upload.tenant, upload.session, upload.reserved, stored, grown
            )
        except LedgerUnavailable as e:
            logger.warning("quota: cannot settle an upload: %s", e)

    async def drop(self, upload: InFlight) -> None:
        upload.done = upload.gone = True
        ledger = self.ledger
        if ledger is None:
            return
        try:
            await asyncio.to_thread(ledger.drop_upload, upload.tenant, upload.session)
        except LedgerUnavailable as e:
            logger.warning("quota: cannot forget an upload: %s", e)
