"""Listings as the distribution spec pages them: tag lists and the catalog.

- Tag lists (`/v2/<name>/tags/list?n=&last=`): passed to the backend, which pages them (Zot)
  or ignores `n` and `last` and does not sort (Distribution 2.8): the gateway sorts and pages
  every answer itself.
- The catalog (`/v2/_catalog?n=&last=`): with tenants, the gateway answers it from the
  ledger's list of repositories, and only with names the caller may pull (its own namespace).
  It is never the backend's (unfiltered) catalog filtered: the answer is one index range
  scan over the caller's own names, so neither its content nor its timing depends on what
  other tenants hold. Anonymous mode has no tenants: the backend's catalog is passed on.

Both answer `Link: </v2/…?n=<n>&last=<last>>; rel="next"` (relative) while more remain.
"""

from __future__ import annotations

import asyncio
import json
import logging

from mitmproxy import ctx, http

from addons import oci, target
from addons.gate import answered, fail_closed, respond
from addons.ledger import LedgerUnavailable
from addons.record import record

logger = logging.getLogger(__name__)

CATALOG_PAGE = 1000  # without `n`: the spec lets a registry choose, and link to the rest
MAX_TAGS_BODY = 32 * 1024 * 1024  # larger tag lists are streamed as the backend sent them
_PAGE_TAGS = "tabbify.page-tags"


def page(items: list[str], n: int | None, last: str | None) -> tuple[list[str], bool]:
    """The sorted items after `last`, at most `n` of them; and whether more remain."""
    after = sorted(i for i in set(items) if last is None or i > last)
    if n is None:
        return after, False
    return after[:n], len(after) > n


def next_link(path: str, n: int, last: str) -> str:
    return f'<{target.canonical(path, {"n": str(n), "last": last})}>; rel="next"'


def json_answer(method: str, payload: dict[str, object], link: str | None) -> http.Response:
    body = b"" if method == "HEAD" else json.dumps(payload).encode()
    response = http.Response.make(200, body, {"Content-Type": "application/json"})
    response.headers[oci.API_VERSION_HEADER[0]] = oci.API_VERSION_HEADER[1]
    if link:
        response.headers["Link"] = link
    return response


class Listing:
    """Runs after TenantIsolation (whose ledger it reads), before the gate."""

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.route != "catalog" or not rec.allowed or answered(flow) or rec.tenant is None:
            return  # anonymous mode: the backend's own catalog
        isolation = ctx.master.addons.get("tenantisolation")
        ledger = isolation.ledger if isolation is not None else None
        method = flow.request.method
        if ledger is None:
            respond(flow, json_answer(method, {"repositories": []}, None))
            return
        n = int(rec.params.get("n", CATALOG_PAGE))
        last = rec.params.get("last", "")
        try:
            # Off the event loop: one index scan, or one LIST on a shared S3 ledger.
            names = (
                await asyncio.to_thread(ledger.repositories, rec.tenant + "/", last, n + 1)
                if n
                else []
            )
        except LedgerUnavailable:
            rec.decision = "deny:ledger"
            respond(
                flow,
                oci.error_response(503, "UNAVAILABLE", "catalog unavailable; retry", method=method),
            )
            return
        more = len(names) > n
        names = names[:n]
        link = next_link("/v2/_catalog", n, names[-1]) if more and names else None
        respond(flow, json_answer(method, {"repositories": names}, link))

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec, response = record(flow), flow.response
        if rec.route != "tags" or not rec.allowed or response is None or answered(flow):
            return
        if response.status_code != 200:
            return
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_TAGS_BODY:
            return
        response.stream = False  # small: read it whole, page it in `response`
        flow.metadata[_PAGE_TAGS] = True

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.pop(_PAGE_TAGS, False) or flow.response is None:
            return
        rec = record(flow)
        try:
            doc = json.loads(flow.response.content or b"")
            tags = [t for t in doc.get("tags") or [] if isinstance(t, str)]
        except (ValueError, AttributeError, RecursionError):
            return  # not a tag list: passed on as the backend sent it
        n = int(rec.params["n"]) if "n" in rec.params else None
        tags, more = page(tags, n, rec.params.get("last"))
        flow.response.content = json.dumps({"name": doc.get("name"), "tags": tags}).encode()
        flow.response.headers.pop("link", None)
        if more and n:
            path = rec.target.path if rec.target else ""
            flow.response.headers["Link"] = next_link(path, n, tags[-1])
