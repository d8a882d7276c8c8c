"""Signed images only where the policy says so (`[[require_signature]]`).

A manifest GET/HEAD (by tag or digest) in a repository a rule covers is served only when
each matching rule is satisfied by a cosign signature made with one of its keys, found
through the backend in the same repository: the `sha256-<hex>.sig` tag and, where the
backend has the referrers API (Zot), OCI 1.1 referrers (addons/decisions/signatures.py verifies).
Otherwise 403 DENIED "not signed by a trusted key"; 503 when the backend cannot answer (fail
closed). Runs after TenantIsolation, before the Gate.

- Exempt (served unsigned, so that cosign can read them): signatures, attestations and SBOMs,
  decided on their bytes (signatures.exempt_from_signature reads every layer: each must be
  the small JSON or text document its attachment type claims, and nothing a runtime can
  unpack). A label is never enough: podman unpacks a tar+gzip layer labelled a signature.
- Served is exactly what was checked, never a name resolved again: a tag is resolved by
  fetching the manifest from the backend, and the request is then forwarded **by that
  digest** (the response must carry it); when the check finds no manifest the gateway
  answers 404 itself (MANIFEST_UNKNOWN, or NAME_UNKNOWN when the backend says it has no such
  repository, as Zot does) rather than let the request go on by tag (a tag pushed
  in between would be served unchecked); and without a backend to check with, 503.
- An image inside a signed index (a multi-arch pull fetches the children by digest) is
  served as part of it: cosign signs the index digest. A child without a signature of its
  own is looked up among the indexes the repository's tags point at (at most MAX_TAGS tags);
  a verified index also vouches for its children in this worker's cache at once.
- Verdicts are cached per (digest, repository, key set), bounded (LRU), for CACHE_TTL seconds
  (NEGATIVE_TTL for "not signed"); failures of the backend are never cached.
- Invalidation across worker processes: a manifest push that is a signature (the
  `sha256-<hex>.sig` tag, or a manifest with a `subject`) or any manifest DELETE through
  any worker rewrites `<registry_state_dir>/signatures.generation`; every worker reads that
  file before using its cache and drops the cache when it changed. The content cache
  (contentcache.py) follows the same token and rewrites it on every DELETE. Pushes and
  deletes that bypass the gateway (none can: the backend takes only the run's credential) are
  covered by the TTLs; GC rewrites the file too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from mitmproxy import ctx, http

from addons import runstate
from addons.clients.backend import Client, TooLarge, Unavailable
from addons.config import mirrors
from addons.decisions import signatures
from addons.decisions.manifest import MAX_MANIFEST
from addons.decisions.policy import Policy, RequireSignature
from addons.decisions.routes import is_digest
from addons.decisions.signatures import Verdict, VerdictCache
from addons.decisions.target import Target
from addons.engine import oci
from addons.gateway.gate import answered, fail_closed, respond
from addons.gateway.policy_store import PolicyFile
from addons.gateway.record import record

logger = logging.getLogger(__name__)

CACHE_TTL = 60.0
NEGATIVE_TTL = 10.0
MAX_TAGS = 256  # tags examined to find a signed index holding an image
MAX_TAG_LIST = 4 * 1024 * 1024
GENERATION = runstate.SIGNATURES_GENERATION
_UNSURE = "cannot check signatures now; retry"


_UNSIGNED = "not signed by a trusted key"


def unsigned_message(repository: str, reason: str) -> str:
    """What every client prints of a refused pull: the rule that refused it (the verdict's
    reason starts with its name, `require_signature <file>:<line>`) and why."""
    why = reason.removesuffix(f": {_UNSIGNED}")[:300]
    return f"{_UNSIGNED}: pull of {repository} denied by {why}"


def bump_generation(state_dir: str | Path) -> None:
    """Tell every worker to drop its cached verdicts (atomic rename of a fresh token)."""
    runstate.write(Path(state_dir) / GENERATION, secrets.token_hex(8).encode())


def read_generation(state_dir: str | Path) -> bytes | None:
    """The current token (None: no state directory, or never rewritten). Every worker's caches
    (these verdicts, addons/gateway/contentcache.py) read it before use and empty themselves when it
    changed. The token, not the file's stat: a rename can reuse an inode within one mtime tick."""
    if not state_dir:
        return None
    try:  # os-level calls: this runs before every cache lookup
        fd = os.open(os.path.join(state_dir, GENERATION), os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)


def _children(body: bytes) -> tuple[str, ...]:
    try:
        doc = signatures.strict_json(body, MAX_MANIFEST, "manifest")
    except signatures.Refused:
        return ()
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        return ()
    return tuple(
        d["digest"]
        for d in manifests
        if isinstance(d, dict) and isinstance(d.get("digest"), str) and is_digest(d["digest"])
    )


def _error_code(body: bytes) -> str:
    try:
        code = json.loads(body)["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return ""
    return code if isinstance(code, str) else ""


@dataclass(frozen=True)
class Missing:
    """The backend has no such manifest: `code` says whether it has the repository."""

    code: str
    message: str


MISSING = {
    "NAME_UNKNOWN": Missing("NAME_UNKNOWN", "repository name not known to registry"),
    "MANIFEST_UNKNOWN": Missing("MANIFEST_UNKNOWN", "manifest unknown"),
}


class Backend:
    """Blocking reads of the backend for one verdict (run in a worker thread)."""

    def __init__(self, client: Client, repository: str) -> None:
        self.client, self.repository = client, repository
        self.missing = "MANIFEST_UNKNOWN"  # the last 404's code: is it the repository?

    def _get(self, path: str, limit: int, accept: str | None = None) -> bytes | None:
        answer = self.client.get(f"/v2/{self.repository}/{path}", limit, accept)
        if answer.status == 404:
            # Zot tells a repository it does not have (NAME_UNKNOWN) from a manifest it does
            # not have; Distribution 2.8 answers MANIFEST_UNKNOWN for both.
            code = _error_code(answer.body)
            self.missing = "NAME_UNKNOWN" if code == "NAME_UNKNOWN" else "MANIFEST_UNKNOWN"
            return None
        return answer.expect(200).body

    def manifest(self, reference: str) -> bytes | None:
        return self._get(f"manifests/{reference}", MAX_MANIFEST, oci.MANIFEST_ACCEPT)

    def referrers(self, digest: str) -> bytes | None:
        # Distribution 2.8 has no referrers API: 404, like "nothing refers to it".
        path = f"referrers/{digest}?artifactType={signatures.SIG_ARTIFACT_TYPE}"
        return self._get(path, MAX_MANIFEST)

    def blob(self, digest: str) -> bytes:
        body = self._get(f"blobs/{digest}", signatures.MAX_PAYLOAD + 1)
        if body is None:
            raise Unavailable("signature payload missing")
        return body

    def attachment(self, digest: str, size: int) -> bytes | None:
        """A layer of a would-be attachment, or None when absent or larger than declared."""
        try:
            return self._get(f"blobs/{digest}", size)
        except TooLarge:
            return None

    def tags(self) -> list[str]:
        body = self._get("tags/list", MAX_TAG_LIST)
        if body is None:
            return []
        try:
            tags = json.loads(body).get("tags") or []
        except (ValueError, AttributeError, RecursionError):
            raise Unavailable("tag list unreadable") from None
        return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _p256(rule: RequireSignature) -> tuple[ec.EllipticCurvePublicKey, ...]:
    return tuple(
        k
        for k in rule.public_keys
        if isinstance(k, ec.EllipticCurvePublicKey) and isinstance(k.curve, ec.SECP256R1)
    )


class SignedOnly:
    def __init__(self, policies: PolicyFile) -> None:
        self.policies = policies
        self.cache = VerdictCache(max_entries=10_000, ttl=CACHE_TTL, negative_ttl=NEGATIVE_TTL)
        self.client: Client | None = None
        self._mirror_clients: dict[str, Client] = {}
        self._generation: bytes | None = None
        # Index digest → its children (content-addressed: never stale), bounded.
        self._index_children: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def _client(self) -> Client:
        if self.client is None:
            self.client = Client(ctx.options.registry_backend)
        return self.client

    def _backend(self, repository: str) -> Backend:
        """The backend holds the repository, or (Distribution) its mirror's instance does."""
        mirrored = mirrors.resolve(repository)
        if mirrored is None or mirrored[0] is None:
            return Backend(self._client(), repository)
        base, name = mirrored
        client = self._mirror_clients.get(base)
        if client is None:
            client = self._mirror_clients[base] = Client(base)
        return Backend(client, name)

    # --- invalidation ---------------------------------------------------------------------

    def _follow_generation(self) -> None:
        token = read_generation(ctx.options.registry_state_dir)
        if token != self._generation:
            if self._generation is not None or token is not None:
                self.cache.clear()
            self._generation = token

    def _invalidate(self, subjects: set[str] | None) -> None:
        """This worker at once; the others through the generation file."""
        if subjects is None:
            self.cache.clear()
        else:
            for digest in subjects:
                self.cache.invalidate(digest)
        if ctx.options.registry_state_dir:
            try:
                bump_generation(ctx.options.registry_state_dir)
            except OSError as e:
                logger.error("signatures: cannot tell the other workers (%s)", e)
            self._follow_generation()

    # --- hooks ------------------------------------------------------------------------------

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        if rec.route != "manifest" or not rec.allowed or answered(flow) or not rec.repository:
            return
        method, reference = flow.request.method, rec.reference or ""
        if method in ("PUT", "DELETE"):
            rec.invalidates_signatures = True
            return
        if method not in ("GET", "HEAD"):
            return
        policy = self.policies.current()
        rules = policy.signature_rules(rec.repository)
        if not rules:
            return
        if not ctx.options.registry_backend:  # nothing to check with: never serve unchecked
            rec.decision = "deny:signature-unchecked"
            respond(flow, oci.error_response(503, "UNAVAILABLE", _UNSURE, method=method))
            return
        self._follow_generation()
        try:
            digest, verdict = await asyncio.to_thread(
                self.decide, policy, rules, rec.repository, reference
            )
        except Unavailable as e:  # the backend cannot answer a question the verdict needs
            logger.warning("signatures: cannot check %s: %s", rec.repository, e)
            verdict, digest = Verdict(False, str(e), transient=True), None
        if isinstance(verdict, Missing):
            # No such manifest when checked. Answer that here: forwarded, the request would be
            # resolved again by name, and a tag pushed in between would be served unchecked.
            # The backend's code is kept (the caller may pull this repository).
            rec.decision = "deny:manifest-unknown"
            respond(flow, oci.error_response(404, verdict.code, verdict.message, method=method))
            return
        if not verdict.signed:
            transient = verdict.transient
            rec.decision = "deny:signature-unchecked" if transient else "deny:not signed"
            status, code = (503, "UNAVAILABLE") if transient else (403, "DENIED")
            message = _UNSURE if transient else unsigned_message(rec.repository, verdict.reason)
            respond(
                flow,
                oci.error_response(
                    status, code, message, method=method, detail=verdict.reason[:300]
                ),
            )
            return
        assert digest is not None and rec.target is not None
        # Serve exactly what was checked, even if the tag moves meanwhile.
        rec.target = Target(f"/v2/{rec.repository}/manifests/{digest}", rec.target.params)
        rec.signed_digest = digest

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The answer to a checked request must name the checked digest. The backend is
        content-addressed, so it always does; should it not, nothing of it is passed on
        (the body streams from here on, so the connection is cut)."""
        rec = record(flow)
        checked, rec.signed_digest = rec.signed_digest, None
        response = flow.response
        if checked is None or response is None or response.status_code != 200:
            return
        named = response.headers.get("docker-content-digest")
        if named is not None and named != checked:
            logger.error("signatures: asked for %s, the backend answered %s", checked, named)
            rec.decision = "deny:signature-unchecked"
            flow.kill()

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        rec = record(flow)
        invalidates, rec.invalidates_signatures = rec.invalidates_signatures, False
        if not invalidates or flow.response is None:
            return
        status, method = flow.response.status_code, flow.request.method
        if method == "DELETE" and status == 202:
            self._invalidate(None)  # no body at hand: whatever it was
        elif method == "PUT" and status == 201:
            body = None if flow.request.stream else flow.request.raw_content
            subjects = signatures.affected_subjects(record(flow).reference or "", body)
            if body is None:
                self._invalidate(None)
            elif subjects:
                self._invalidate(subjects)

    def done(self) -> None:
        if self.client is not None:
            self.client.close()

    # --- the verdict (blocking; in a worker thread) -------------------------------------------

    def decide(
        self, policy: Policy, rules: tuple[RequireSignature, ...], repository: str, reference: str
    ) -> tuple[str | None, Verdict | Missing]:
        """(digest, verdict); (None, Missing) when the backend has no such manifest."""
        backend = self._backend(repository)
        scope: Hashable = (repository, tuple(rule.keys for rule in rules))
        if is_digest(reference):
            cached = self.cache.get(reference, scope)
            if cached is not None:
                return reference, cached
        body = backend.manifest(reference)
        if body is None:
            return None, MISSING[backend.missing]
        digest = reference if is_digest(reference) else None
        if digest is None:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            cached = self.cache.get(digest, scope)
            if cached is not None:
                return digest, cached
        if signatures.exempt_from_signature(body, backend.attachment):
            # Never an index (its keys are checked): it vouches for nothing but itself.
            verdict = Verdict(True, "exempt: a signature, attestation or SBOM (read)")
            self.cache.put(digest, verdict, scope)
            return digest, verdict
        verdict = self._verify(policy, rules, backend, digest, body)
        self.cache.put(digest, verdict, scope)
        if verdict.signed:
            for child in _children(body):
                self.cache.put(child, Verdict(True, f"in the signed index {digest}"), scope)
        return digest, verdict

    def _verify(
        self,
        policy: Policy,
        rules: tuple[RequireSignature, ...],
        backend: Backend,
        digest: str,
        body: bytes,
    ) -> Verdict:
        for rule in rules:
            keys = _p256(rule)
            if not keys:
                return Verdict(
                    False,
                    f"{policy.name(rule)} has no ECDSA P-256 key: only those are verified",
                )
            verdict = self._signed(backend, digest, keys)
            if not verdict.signed and not verdict.transient:
                parent = self._signed_parent(backend, digest, keys)
                if parent is not None:
                    verdict = Verdict(True, f"in the signed index {parent}")
            if not verdict.signed:
                return Verdict(
                    False, f"{policy.name(rule)}: {verdict.reason}", transient=verdict.transient
                )
        return Verdict(True, "signed by a trusted key")

    @staticmethod
    def _signed(backend: Backend, digest: str, keys: tuple[Any, ...]) -> Verdict:
        return signatures.verify_subject(
            digest, backend.manifest, backend.referrers, backend.blob, keys
        )

    def _signed_parent(self, backend: Backend, digest: str, keys: tuple[Any, ...]) -> str | None:
        """A signed index the repository's tags point at that holds `digest`, or None."""
        tags = [t for t in backend.tags() if signatures.signature_tag_subject(t) is None]
        for tag in tags[:MAX_TAGS]:
            body = backend.manifest(tag)
            if body is None:
                continue
            index = "sha256:" + hashlib.sha256(body).hexdigest()
            children = self._index_children.get(index)
            if children is None:
                children = self._index_children[index] = _children(body)
                while len(self._index_children) > 4096:
                    self._index_children.popitem(last=False)
            if digest in children and self._signed(backend, index, keys).signed:
                return index
        return None
