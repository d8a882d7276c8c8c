"""Listings as the distribution spec pages them: tag lists and the catalog.

- Tag lists (`/v2/<name>/tags/list?n=&last=`): passed to the backend, which pages them (Zot)
  or ignores `n` and `last` and does not sort (Distribution 2.8): the gateway sorts and pages
  every answer itself.
- The catalog (`/v2/_catalog?n=&last=`): with tenants, the gateway answers it from the
  ledger's list of repositories, and only with names the caller may pull under the current
  policy. It is never the backend's (unfiltered) catalog filtered: the answer is index range
  scans over the ranges the caller can pull from at all (its own namespace, each pull
  grant's literal prefix), each name checked against the policy, at most MAX_SCANNED names
  per page (then the page links on from where the scan stopped). Anonymous mode has no
  tenants: the backend's catalog is passed on.

Both answer `Link: </v2/…?n=<n>&last=<last>>; rel="next"` (relative) while more remain.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from mitmproxy import ctx, http

from addons import oci, target
from addons.gate import answered, fail_closed, respond
from addons.isolation import REBUILDING
from addons.ledger import LedgerUnavailable
from addons.policy_store import PolicyFile
from addons.record import record

logger = logging.getLogger(__name__)

CATALOG_PAGE = 1000  # without `n`: the spec lets a registry choose, and link to the rest
SCAN_BATCH = 1000  # names read from the ledger at once
MAX_SCANNED = 20_000  # names looked at for one catalog page, whatever the policy
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


def catalog_page(
    names_after: Callable[[str, str, int], list[str]],
    prefixes: list[str],
    pullable: Callable[[str], bool],
    last: str,
    n: int,
) -> tuple[list[str], str | None]:
    """Up to `n` names the caller may pull, after `last`, in order; and where the next page
    starts (None: nothing more). `prefixes` do not nest, so their ranges follow each other
    in sorted order; `names_after(prefix, after, limit)` is one range scan."""
    found: list[str] = []
    scanned = 0
    for prefix in prefixes:
        if last and prefix + "\x7f" <= last:
            continue  # the whole range is before this page
        after = last
        while True:
            batch = names_after(prefix, after, SCAN_BATCH)
            scanned += len(batch)
            for name in batch:
                if pullable(name):
                    found.append(name)
                    if len(found) > n:
                        return found[:n], found[n - 1]
            if len(batch) < SCAN_BATCH:
                break
            after = batch[-1]
            if scanned >= MAX_SCANNED:
                return found, after  # bounded work: the next page goes on from here
    return found, None


class Listing:
    """Runs after TenantIsolation (whose ledger it reads), before the gate."""

    def __init__(self, policies: PolicyFile) -> None:
        self.policies = policies

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
        policy = self.policies.current()
        try:
            if not await isolation.vouches():  # a ledger that lost records misses names
                rec.decision = "deny:ledger"
                respond(flow, oci.error_response(503, "UNAVAILABLE", REBUILDING, method=method))
                return
            # Off the event loop: index scans, or LISTs on a shared S3 ledger.
            names, after = (
                await asyncio.to_thread(
                    catalog_page,
                    ledger.repositories,
                    policy.pull_prefixes(rec.tenant, rec.subject),
                    policy.pullable(rec.tenant, rec.subject),
                    last,
                    n,
                )
                if n
                else ([], None)
            )
        except LedgerUnavailable:
            rec.decision = "deny:ledger"
            respond(
                flow,
                oci.error_response(503, "UNAVAILABLE", "catalog unavailable; retry", method=method),
            )
            return
        link = next_link("/v2/_catalog", n, after) if after else None
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
