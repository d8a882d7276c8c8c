"""Immutable tags (contract §7 `[[immutable]]`): a tag a rule covers is pushed once, then
never overwritten nor deleted, whoever asks (the owner too). Runs after TenantIsolation.

- PUT of a manifest to a covered tag: the backend is asked whether the tag exists (HEAD);
  if it does, 403 DENIED "tag is immutable". The first push goes through.
- DELETE of a covered tag: 403; of a covered tag that does not exist, 404 MANIFEST_UNKNOWN
  (answered here: forwarded, it could meet the tag pushed in between).
- DELETE of a manifest by digest, or of a blob, is refused when a covered tag of the
  repository reaches that digest: the tag's manifest, an index's child manifests
  (recursively), every config and layer blob. Deleting any of them would leave the tag
  naming a broken image. What refers to a covered image (a signature, an SBOM: its referrers,
  whose `subject` points at it) is not reached and may be deleted: the image still pulls.
  The check reads the backend (tag list, each covered tag's digest, the manifests below it)
  and is bounded: at most MAX_CHECKED covered tags, MAX_DEPTH levels of indexes and
  MAX_REACH manifests below one tag (over a bound: 403, the delete is refused), and at most
  MAX_FETCHES manifests read for one delete (over it: 503, retry). What a manifest reaches is
  cached by its digest: content-addressed, it never changes, so a delete usually costs the
  tag list and one HEAD per covered tag. The digest checked is the route's reference, parsed
  from the target the gate forwards unchanged: exactly the digest the backend deletes.

The backend's answers decide, so a backend that cannot answer fails the request closed
(503), never open. Two first pushes of one tag racing each other would both pass that check,
so a push of a covered tag first claims it on the node (addons/runstate/tag_claims.py) until the
backend has answered it: a second push meanwhile gets 403 too. With the PostgreSQL ledger the
claim is also taken there (an advisory lock), so it holds across nodes; with the S3 ledger
nodes do not share claims (README, known limits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from addons.clients.backend import (
    MAX_LIST,
    MAX_MANIFEST,
    AsyncClient,
    Unavailable,
)
from addons.decisions import manifest
from addons.decisions.policy import Policy
from addons.decisions.routes import is_digest
from addons.engine import connections, oci
from addons.gateway.gate import answered, fail_closed, respond
from addons.gateway.isolation import TenantIsolation
from addons.gateway.policy_store import PolicyFile
from addons.gateway.record import record
from addons.runstate.tag_claims import Claim, take
from addons.storage.ledger import LedgerUnavailable

logger = logging.getLogger(__name__)

MAX_CHECKED = 256  # covered tags resolved for one delete by digest
MAX_DEPTH = 8  # levels of indexes below a covered tag
MAX_REACH = 1000  # manifests below one covered tag (counted per path: shared ones count again)
MAX_FETCHES = 2000  # manifests read from the backend for one delete (the rest: from cache)
CACHE_DIGESTS = 500_000  # digests the reach cache holds in all (oldest entries go first)
PARALLEL = 8  # backend requests in flight for one delete


class TooMuch(Exception):
    """What a covered tag reaches is over a bound: the delete is refused (403)."""


@dataclass(frozen=True)
class Reach:
    """What one manifest reaches: its own digests, its children's, their blobs."""

    digests: frozenset[str]
    manifests: int  # itself and every manifest below it
    height: int  # levels of indexes below it


@dataclass
class Walk:
    """One delete's walk: its backend requests in flight, and how many manifests it read."""

    gate: asyncio.Semaphore
    fetches: int = 0


@dataclass
class Held:
    """A push's claim of its tag: on the node, and in the shared ledger where it can."""

    flow: http.HTTPFlow
    claim: Claim
    cluster_key: int | None = None


def refusal(method: str, repository: str, reference: str, rule: str) -> str:
    """What every client prints of a refused push or delete: what, and the rule refusing it."""
    if is_digest(reference):  # a digest a covered tag reaches
        what = f"delete of {repository}@{reference}"
    else:
        what = f"{'push' if method == 'PUT' else 'delete'} of {repository}:{reference}"
    return f"tag is immutable: {what} denied by {rule}"


class ImmutableTags:
    def __init__(self, policies: PolicyFile, isolation: TenantIsolation | None = None) -> None:
        self.policies = policies
        self.isolation = isolation
        self.client: AsyncClient | None = None
        self.claims: dict[str, Held] = {}  # by flow id
        self._claims_dir: Path | None = None
        self._own_dir: Path | None = None  # made here when there is no state directory
        self.reach: OrderedDict[str, Reach] = OrderedDict()  # by manifest digest
        self._cached = 0  # digests held in `reach`

    def configure(self, updated: set[str]) -> None:
        if "registry_state_dir" in updated:
            self._claims_dir = None  # made at the first claim, where the workers share it

    def claims_dir(self) -> Path:
        if self._claims_dir is None:
            state = ctx.options.registry_state_dir
            if state:
                directory = Path(state) / "claims"
            else:  # a gateway on its own (tests): claims are this process's alone
                if self._own_dir is None:
                    self._own_dir = Path(tempfile.mkdtemp(prefix="tbf-claims-"))
                directory = self._own_dir
            directory.mkdir(mode=0o700, exist_ok=True)
            self._claims_dir = directory
        return self._claims_dir

    def _client(self) -> AsyncClient:
        if self.client is None:
            self.client = AsyncClient(ctx.options.registry_backend)
        return self.client

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.route not in ("manifest", "blob") or not rec.allowed or answered(flow):
            return
        method, reference = flow.request.method, rec.reference or ""
        if method not in ("PUT", "DELETE") or not ctx.options.registry_backend:
            return
        if not rec.repository or (rec.route == "blob" and method != "DELETE"):
            return
        policy, repository = self.policies.current(), rec.repository
        missing = False
        try:
            if is_digest(reference):
                rule = (
                    await self._protects(policy, repository, reference)
                    if method == "DELETE"
                    else None
                )
            else:
                rule = policy.is_immutable(repository, reference)
                if rule and method == "PUT":
                    if not await self._claim(flow, repository, reference):
                        rule = f"{rule}; a push of this tag is in progress"
                    elif await self._digest_of(repository, reference) is None:
                        rule = None  # the first push of the tag: it keeps its claim
                elif rule:  # a DELETE: of a tag that exists?
                    missing = await self._digest_of(repository, reference) is None
        except (Unavailable, OSError, LedgerUnavailable) as e:
            await self._release(flow)
            logger.warning("immutable tags: cannot check %s: %s", repository, e)
            rec.decision = "deny:immutable-unchecked"
            respond(
                flow,
                oci.error_response(
                    503, "UNAVAILABLE", "cannot check immutable tags now; retry", method=method
                ),
            )
            return
        if missing:
            # Nothing to delete: 404 as the spec has it, answered here (never forwarded: the
            # tag could be pushed in between). A HEAD cannot tell a missing repository apart.
            rec.decision = "deny:manifest-unknown"
            respond(
                flow,
                oci.error_response(
                    404, "MANIFEST_UNKNOWN", "manifest unknown", method=method, detail=reference
                ),
            )
            return
        if rule:
            await self._release(flow)
            rec.decision = f"deny:tag is immutable ({rule})"
            message = refusal(method, repository, reference, rule)
            respond(
                flow, oci.error_response(403, "DENIED", message, method=method, detail=reference)
            )

    def _cluster(self) -> Any:
        """The shared ledger, when it takes claims (PostgreSQL), else None."""
        ledger = self.isolation.ledger if self.isolation is not None else None
        return ledger if hasattr(ledger, "claim_tag") else None

    async def _claim(self, flow: http.HTTPFlow, repository: str, tag: str) -> bool:
        """Claim the tag for this push: on the node first, then across nodes where the ledger
        can. False when another push holds it; LedgerUnavailable / OSError fail closed."""
        now = time.time()
        for fid in [k for k, h in self.claims.items() if connections.flow_over(h.flow, now)]:
            await self._release(self.claims[fid].flow)  # ended without a hook we saw
        claim = take(self.claims_dir(), repository, tag)
        if claim is None:
            return False
        held = self.claims[flow.id] = Held(flow, claim)
        cluster = self._cluster()
        if cluster is not None:
            held.cluster_key = await asyncio.to_thread(cluster.claim_tag, repository, tag)
            if held.cluster_key is None:  # another node's push holds it
                await self._release(flow)
                return False
        return True

    async def _release(self, flow: http.HTTPFlow) -> None:
        held = self.claims.pop(flow.id, None)
        if held is None:
            return
        try:
            if held.cluster_key is not None and (cluster := self._cluster()) is not None:
                await asyncio.to_thread(cluster.release_tag, held.cluster_key)
        except LedgerUnavailable as e:  # its session is gone, and its locks with it
            logger.warning("immutable tags: releasing a shared claim: %s", e)
        finally:
            held.claim.release()

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._release(flow)  # the backend answered the PUT: the tag exists or it failed

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._release(flow)

    async def _digest_of(self, repository: str, tag: str) -> str | None:
        """The digest a tag points at in the backend, None if there is no such tag."""
        response = await self._client().request(
            "HEAD", f"/v2/{repository}/manifests/{tag}", accept=oci.MANIFEST_ACCEPT
        )
        if response.status == 404:
            return None
        return response.expect(200).headers.get("docker-content-digest", "") or "unknown"

    async def _protects(self, policy: Policy, repository: str, digest: str) -> str | None:
        """The rule of a covered tag that reaches `digest` (a manifest or a blob), or None.
        Raises Unavailable when the backend cannot tell: fail closed."""
        if not policy.has_immutable(repository):
            return None  # no tag of it can be covered: no backend request at all
        covered: list[tuple[str, str]] = []
        for tag in await self._tags(repository):
            rule = policy.is_immutable(repository, tag)
            if rule:
                covered.append((tag, rule))
        if len(covered) > MAX_CHECKED:
            return f"{covered[0][1]}; more than {MAX_CHECKED} immutable tags to check"
        walk = Walk(asyncio.Semaphore(PARALLEL))

        async def resolve(tag: str) -> str | None:
            async with walk.gate:
                return await self._digest_of(repository, tag)

        heads = await asyncio.gather(*(resolve(tag) for tag, _ in covered))
        tagged = [
            (head, rule) for head, (_, rule) in zip(heads, covered, strict=True) if head is not None
        ]
        for head, rule in tagged:
            if head == "unknown":
                raise Unavailable("a tag's digest was not given")
            if head == digest:
                return rule
        for head, rule in tagged:
            try:
                reach = await self._reach(repository, head, 0, walk)
            except TooMuch as e:
                return f"{rule}; {e}"
            if digest in reach.digests:
                return rule
        return None

    async def _reach(self, repository: str, digest: str, depth: int, walk: Walk) -> Reach:
        """What the manifest `digest` reaches, from the cache or the backend. Raises TooMuch
        past MAX_DEPTH / MAX_REACH, Unavailable past the delete's fetch budget. An index's
        children are read side by side (at most PARALLEL requests in flight)."""
        reach = self.reach.get(digest)
        if reach is not None:
            self.reach.move_to_end(digest)
        else:
            if walk.fetches >= MAX_FETCHES:
                raise Unavailable("too many manifests to read for one delete")
            walk.fetches += 1
            async with walk.gate:
                body = await self._manifest(repository, digest)
            if body is None:  # a child that is not there: nothing of it to protect but itself
                return Reach(frozenset({digest}), 1, 0)  # not cached: it may be pushed later
            try:
                children, blobs = manifest.made_of(json.loads(body))
            except (ValueError, RecursionError):
                raise Unavailable(f"manifest {digest} is not readable") from None
            found = {digest, *manifest.own_digests(body), *blobs}
            manifests, height, complete = 1, 0, True
            children = list(dict.fromkeys(children))  # a child named twice is one child
            if children and depth >= MAX_DEPTH:
                raise TooMuch(f"indexes nested more than {MAX_DEPTH} deep")
            if len(children) >= MAX_REACH:
                raise TooMuch(f"more than {MAX_REACH} manifests under one immutable tag")
            subs = await asyncio.gather(
                *(self._reach(repository, child, depth + 1, walk) for child in children),
                return_exceptions=True,
            )
            failed = [e for e in subs if isinstance(e, BaseException)]
            if failed:  # a bound hit (403) says more than a backend that failed (503)
                raise next((e for e in failed if isinstance(e, TooMuch)), failed[0])
            for child, sub in zip(children, subs, strict=True):
                if not isinstance(sub, Reach):
                    raise Unavailable("no answer for a child manifest")
                found |= sub.digests
                manifests, height = manifests + sub.manifests, max(height, sub.height + 1)
                complete = complete and child in self.reach
                if manifests > MAX_REACH:
                    raise TooMuch(f"more than {MAX_REACH} manifests under one immutable tag")
            reach = Reach(frozenset(found), manifests, height)
            if complete:
                self._remember(digest, reach)
        if depth + reach.height > MAX_DEPTH:
            raise TooMuch(f"indexes nested more than {MAX_DEPTH} deep")
        if reach.manifests > MAX_REACH:
            raise TooMuch(f"more than {MAX_REACH} manifests under one immutable tag")
        return reach

    def _remember(self, digest: str, reach: Reach) -> None:
        self.reach[digest] = reach
        self._cached += len(reach.digests)
        while self._cached > CACHE_DIGESTS and len(self.reach) > 1:
            _, old = self.reach.popitem(last=False)
            self._cached -= len(old.digests)

    async def _manifest(self, repository: str, digest: str) -> bytes | None:
        """The manifest's bytes as the backend holds them (checked against the digest), or
        None when the repository has no such manifest."""
        response = await self._client().get(
            f"/v2/{repository}/manifests/{digest}", MAX_MANIFEST, oci.MANIFEST_ACCEPT
        )
        if response.status == 404:
            return None
        body = response.expect(200).body
        if digest not in manifest.own_digests(body):
            raise Unavailable(f"the backend's manifest {digest} does not match its digest")
        return body

    async def _tags(self, repository: str) -> list[str]:
        response = await self._client().get(f"/v2/{repository}/tags/list", MAX_LIST)
        if response.status == 404:
            return []
        body = response.expect(200).body
        try:
            tags = json.loads(body).get("tags") or []
        except (ValueError, AttributeError, RecursionError):
            raise Unavailable("tag list unreadable") from None
        return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []

    async def done(self) -> None:
        if self.client is not None:
            await self.client.close()
        for held in self.claims.values():
            held.claim.release()  # the ledger's session closes with the process
        self.claims.clear()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
