"""Immutable tags (CONTRACTS §7 `[[immutable]]`): a tag a rule covers is pushed once, then
never overwritten nor deleted, whoever asks (the owner too). Runs after TenantIsolation.

- PUT of a manifest to a covered tag: the backend is asked whether the tag exists (HEAD);
  if it does, 403 DENIED "tag is immutable". The first push goes through.
- DELETE of a covered tag: 403.
- DELETE of a manifest by digest removes every tag pointing at it (Distribution), so it is
  refused when a covered tag of the repository points at that digest.

The backend's answers decide, so a backend that cannot answer fails the request closed
(503), never open. Two first pushes of one tag racing each other would both pass that check,
so a push of a covered tag first claims it on the node (addons/tag_claims.py) until the
backend has answered it: a second push meanwhile gets 403 too. With the PostgreSQL ledger the
claim is also taken there (an advisory lock), so it holds across nodes; with the S3 ledger
nodes do not share claims (README, known limits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mitmproxy import ctx, http

from addons import connections, oci
from addons.gate import answered, fail_closed, respond
from addons.isolation import TenantIsolation
from addons.ledger import LedgerUnavailable
from addons.policy import Policy
from addons.policy_store import PolicyFile
from addons.record import record
from addons.routes import DIGEST
from addons.tag_claims import Claim, take

logger = logging.getLogger(__name__)

_DIGEST = re.compile(DIGEST)
TIMEOUT = 10.0  # seconds for one backend answer
MAX_TAG_LIST = 32 * 1024 * 1024  # bytes of a tag list read to protect a digest delete
MAX_CHECKED = 256  # covered tags resolved for one delete by digest


class BackendUnsure(Exception):
    """The backend did not say whether a tag exists: fail closed."""


@dataclass
class Held:
    """A push's claim of its tag: on the node, and in the shared ledger where it can."""

    flow: http.HTTPFlow
    claim: Claim
    cluster_key: int | None = None


class ImmutableTags:
    def __init__(self, policies: PolicyFile, isolation: TenantIsolation | None = None) -> None:
        self.policies = policies
        self.isolation = isolation
        self.client: httpx.AsyncClient | None = None
        self.claims: dict[str, Held] = {}  # by flow id
        self._claims_dir: Path | None = None
        self._own_dir: Path | None = None  # made here when there is no state directory

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

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            self.client = httpx.AsyncClient(
                base_url=ctx.options.registry_backend, timeout=TIMEOUT, follow_redirects=False
            )
        return self.client

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.route != "manifest" or not rec.allowed or answered(flow) or not rec.repository:
            return
        method, reference = flow.request.method, rec.reference or ""
        if method not in ("PUT", "DELETE") or not ctx.options.registry_backend:
            return
        policy, repository = self.policies.current(), rec.repository
        try:
            if _DIGEST.fullmatch(reference):
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
        except (BackendUnsure, httpx.HTTPError, OSError, LedgerUnavailable) as e:
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
        if rule:
            await self._release(flow)
            rec.decision = f"deny:tag is immutable ({rule})"
            respond(
                flow,
                oci.error_response(
                    403, "DENIED", f"tag is immutable ({rule})", method=method, detail=reference
                ),
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
        response = await self._client().head(
            f"/v2/{repository}/manifests/{tag}", headers={"Accept": oci.MANIFEST_ACCEPT}
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise BackendUnsure(f"HEAD of a tag answered {response.status_code}")
        return response.headers.get("docker-content-digest", "") or "unknown"

    async def _protects(self, policy: Policy, repository: str, digest: str) -> str | None:
        """The rule of a covered tag pointing at `digest`, or None."""
        if not policy.immutables:
            return None
        covered: list[tuple[str, str]] = []
        for tag in await self._tags(repository):
            rule = policy.is_immutable(repository, tag)
            if rule:
                covered.append((tag, rule))
        if len(covered) > MAX_CHECKED:
            return f"{covered[0][1]}; more than {MAX_CHECKED} immutable tags to check"
        for tag, rule in covered:
            if await self._digest_of(repository, tag) == digest:
                return rule
        return None

    async def _tags(self, repository: str) -> list[str]:
        async with self._client().stream("GET", f"/v2/{repository}/tags/list") as response:
            if response.status_code == 404:
                return []
            if response.status_code != 200:
                raise BackendUnsure(f"tag list answered {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_TAG_LIST:
                    raise BackendUnsure("tag list too large")
        try:
            tags = json.loads(body).get("tags") or []
        except (ValueError, AttributeError, RecursionError):
            raise BackendUnsure("tag list unreadable") from None
        return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []

    async def done(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        for held in self.claims.values():
            held.claim.release()  # the ledger's session closes with the process
        self.claims.clear()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
