"""Listings as the distribution spec pages them: tag lists and the catalog.

- Tag lists (`/v2/<name>/tags/list?n=&last=`): passed to the backend, which pages them (Zot)
  or ignores `n` and `last` and does not sort (Distribution 2.8): the gateway sorts and pages
  every answer itself.
- The catalog (`/v2/_catalog?n=&last=`): with tenants, the gateway answers it from the
  ledger's list of repositories, and only with names the caller may pull under the current
  policy. It is never the backend's (unfiltered) catalog filtered: the answer is index range
  scans over the ranges the caller can pull from at all (its own namespace, each pull
  grant's literal prefix), each name checked against the policy, at most `registry_catalog_scan`
  names per page. Anonymous mode has no tenants: the backend's catalog is passed on.

Both answer `Link: </v2/…?n=<n>&last=<last>>; rel="next"` (relative) while more remain.
Nothing the caller may not list appears in an answer, headers included: a page that ends
after `n` names links on from the last name it lists; a page that ends at the scan bound
stopped on a name the caller may not see, so its `last` is that position sealed
(CatalogCursor: AES-GCM under a key derived from the registry-token key, bound to the caller),
an opaque `C…` value that only the gateway can read. The cost of one page stays bounded, and
paging reaches every listable name. A tag list names only tags of a repository the caller
may pull, all of which it may list: its `last` is the last tag of the page.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from addons.decisions import target
from addons.decisions.tokens import TokenSigner
from addons.engine import oci
from addons.gateway.gate import answered, fail_closed, respond
from addons.gateway.isolation import REBUILDING
from addons.gateway.policy_store import PolicyFile
from addons.gateway.record import record
from addons.storage.ledger import LedgerUnavailable

logger = logging.getLogger(__name__)

CATALOG_PAGE = 1000  # without `n`: the spec lets a registry choose, and link to the rest
SCAN_BATCH = 1000  # names read from the ledger at once
MAX_SCANNED = 20_000  # names looked at for one catalog page (option registry_catalog_scan)
MAX_TAGS_BODY = 32 * 1024 * 1024  # larger tag lists are streamed as the backend sent them


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


class CatalogPage(NamedTuple):
    names: list[str]
    after: str | None  # where the next page starts; None: nothing more
    sealed: bool = False  # `after` is a scanned name the caller may not see: seal it


def catalog_page(
    names_after: Callable[[str, str, int], list[str]],
    prefixes: list[str],
    pullable: Callable[[str], bool],
    last: str,
    n: int,
    max_scanned: int | None = None,
) -> CatalogPage:
    """Up to `n` names the caller may pull, after `last`, in order; and where the next page
    starts. `prefixes` do not nest, so their ranges follow each other in sorted order;
    `names_after(prefix, after, limit)` is one range scan. At most about `max_scanned` names
    (default MAX_SCANNED) are looked at: a page that stops there goes on from the last name
    scanned, which the caller may not list, so it comes back `sealed`."""
    bound = MAX_SCANNED if max_scanned is None else max_scanned
    found: list[str] = []
    scanned = 0
    for prefix in prefixes:
        if last and prefix + "\x7f" <= last:
            continue  # the whole range is before this page
        after = last
        while True:
            limit = min(SCAN_BATCH, max(bound - scanned, 1))
            batch = names_after(prefix, after, limit)
            scanned += len(batch)
            for name in batch:
                if pullable(name):
                    found.append(name)
                    if len(found) > n:
                        return CatalogPage(found[:n], found[n - 1])
            if not batch:
                break
            after = batch[-1]
            if scanned >= bound:  # bounded work: the next page goes on from here, sealed
                return CatalogPage(found, after, sealed=not found or found[-1] != after)
            if len(batch) < limit:
                break
    return CatalogPage(found, None)


class CatalogCursor:
    """A catalog position the caller may not see, sealed: `C` + base64url(nonce | AES-GCM
    ciphertext of the name), bound to the caller (tenant and subject) as associated data.
    Keys come from the registry-token key(s) (shared by every worker and, with
    REGISTRY_TOKEN_KEY_FILE, every node; rotated with them): a cursor from a previous run
    does not open, and the caller is told to list again."""

    LABEL = b"tabbify-registry catalog cursor v1"
    PAD = 128  # names are padded to a multiple of this (NUL never occurs in a name)

    def __init__(self, signer: TokenSigner) -> None:
        self.signer = signer

    def seal(self, position: str, caller: str) -> str:
        nonce, plain = os.urandom(12), position.encode()
        plain += b"\0" * (-len(plain) % self.PAD)  # the length of a hidden name is hidden too
        key = self.signer.derived_keys(self.LABEL)[0]
        blob = nonce + AESGCM(key).encrypt(nonce, plain, caller.encode())
        return "C" + base64.urlsafe_b64encode(blob).rstrip(b"=").decode()

    def open(self, value: str, caller: str) -> str | None:
        """The position, or None for a cursor that is not ours (another run, another caller)."""
        try:
            blob = base64.urlsafe_b64decode(value[1:] + "=" * (-len(value[1:]) % 4))
        except (binascii.Error, ValueError):
            return None
        nonce, sealed = blob[:12], blob[12:]
        for key in self.signer.derived_keys(self.LABEL):
            try:
                plain = AESGCM(key).decrypt(nonce, sealed, caller.encode())
                return plain.rstrip(b"\0").decode()
            except (InvalidTag, ValueError, UnicodeDecodeError):
                continue
        return None


class Listing:
    """Runs after TenantIsolation (whose ledger it reads), before the gate."""

    def __init__(self, policies: PolicyFile, signer: TokenSigner) -> None:
        self.policies = policies
        self.cursor = CatalogCursor(signer)

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_catalog_scan",
            int,
            MAX_SCANNED,
            "Names one catalog page looks at, at most (then it links on with a sealed cursor).",
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_catalog_scan" in updated and ctx.options.registry_catalog_scan < 1:
            raise exceptions.OptionsError("registry_catalog_scan must be at least 1")

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
        caller = f"{rec.tenant}\0{rec.subject or ''}"
        if last.startswith("C"):  # a sealed position (routes.CURSOR), never a name
            opened = self.cursor.open(last, caller)
            if opened is None:
                rec.decision = "deny:catalog-cursor"
                respond(
                    flow,
                    oci.error_response(
                        400,
                        "UNSUPPORTED",
                        "catalog cursor expired or not yours; list the catalog from the start",
                        method=method,
                    ),
                )
                return
            last = opened
        policy = self.policies.current()
        try:
            if not await isolation.vouches():  # a ledger that lost records misses names
                rec.decision = "deny:ledger"
                respond(flow, oci.error_response(503, "UNAVAILABLE", REBUILDING, method=method))
                return
            # Off the event loop: index scans, or LISTs on a shared S3 ledger.
            found = (
                await asyncio.to_thread(
                    catalog_page,
                    ledger.repositories,
                    policy.pull_prefixes(rec.tenant, rec.subject),
                    policy.pullable(rec.tenant, rec.subject),
                    last,
                    n,
                    ctx.options.registry_catalog_scan,
                )
                if n
                else CatalogPage([], None)
            )
        except LedgerUnavailable:
            rec.decision = "deny:ledger"
            respond(
                flow,
                oci.error_response(503, "UNAVAILABLE", "catalog unavailable; retry", method=method),
            )
            return
        link = None
        if found.after is not None:
            after = self.cursor.seal(found.after, caller) if found.sealed else found.after
            link = next_link("/v2/_catalog", n, after)
        respond(flow, json_answer(method, {"repositories": found.names}, link))

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
        rec.page_tags = True

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        page_tags, rec.page_tags = rec.page_tags, False
        if not page_tags or flow.response is None:
            return
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
