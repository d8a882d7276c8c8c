"""Record images already in storage (pushed before the ledger, or a restored data dir).

Walks the backend: catalog → tags → manifests (and the children of indexes, and referrers) →
the blobs they reference. The tenant is a repository's first path component. A repository
once walked is marked in the ledger, so a restart walks only what the ledger has not seen:
restart cost does not grow with the registry. A request that misses while the walk is still
going resolves its own repository first (`Walker.repository`), instead of waiting for all of
them. Blocking (addons/clients/backend.py's Client); the isolation addon runs it in threads.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator

from addons.clients import backend
from addons.decisions import manifest
from addons.decisions.routes import TAG, is_name
from addons.engine import oci
from addons.storage.ledger import AnyLedger

logger = logging.getLogger(__name__)

PAGE = 1000
_TAG = re.compile(TAG)


class Walker:
    def __init__(self, base: str, ledger: AnyLedger) -> None:
        self.base = base.rstrip("/")
        self.ledger = ledger
        self._local = threading.local()  # one client per thread (walks run in several)

    @property
    def client(self) -> backend.Client:
        client = getattr(self._local, "client", None)
        if client is None:  # with the run's credential (addons/clients/backend.py)
            client = self._local.client = backend.Client(self.base, timeout=backend.WALK_TIMEOUT)
        return client

    def _pages(self, path: str, key: str) -> Iterator[object]:
        return self.client.pages(path, key)

    def catalog(self, last: str = "") -> Iterator[str]:
        """Repository names from `last` on (exclusive), in the backend's (sorted) order."""
        start = f"/v2/_catalog?n={PAGE}" + (f"&last={last}" if last else "")
        for repo in self._pages(start, "repositories"):
            if isinstance(repo, str) and is_name(repo) and "/" in repo:
                yield repo

    def repository(self, repo: str) -> int:
        """Walk one repository, record what it holds for its tenant, mark it walked.
        Returns how many digests were recorded."""
        seen: set[str] = set()
        found = False
        for tag in self._pages(f"/v2/{repo}/tags/list?n={PAGE}", "tags"):
            found = True
            if not isinstance(tag, str) or not _TAG.fullmatch(tag):
                logger.warning("backfill: skipping tag %.80r of %s", tag, repo)
                continue
            self._manifest_digests(repo, tag, seen)
        if found:  # a repository the backend does not hold is not marked (it may come later)
            self.ledger.add(repo.split("/", 1)[0], seen, repository=repo, listed=True)
            self.ledger.mark_walked(repo)
        return len(seen)

    def tenant(self, tenant: str) -> int:
        """Walk the tenant's repositories not walked yet (the catalog is sorted by name)."""
        total = 0
        for repo in self.catalog(last=tenant):
            if not repo.startswith(tenant + "/"):
                if repo > tenant + "/":
                    break
                continue
            if not self.ledger.walked(repo):
                total += self.repository(repo)
        return total

    def everything(self) -> int:
        """Walk every repository the ledger has not seen; returns how many pairs were added.
        The backend's own failures (unreachable, 5xx on the catalog) raise: retry later."""
        total = 0
        for repo in self.catalog():
            if self.ledger.walked(repo):
                continue
            try:
                total += self.repository(repo)
            except (backend.Unavailable, ValueError, AttributeError, TypeError) as e:
                gone = isinstance(e, backend.Unavailable) and e.status is None
                if gone and not isinstance(e, backend.TooLarge):
                    raise  # the backend itself did not answer: the walk is retried
                # This repository's answers are broken; the others still count.
                logger.warning("backfill: skipping repository %s: %s", repo, e)
        return total

    def _manifest_digests(self, repo: str, ref: str, seen: set[str]) -> None:
        """Record a tagged manifest, its index children, its referrers and what they
        reference into `seen`: iteratively, since stored content decides how deep it goes.

        Stored content is hostile: a manifest that cannot be read (as the gateway reads
        pushes: decisions/manifest.py) is skipped with one log line, never stopping the rest."""
        todo = [ref]
        while todo:
            ref = todo.pop()
            try:
                r = self.client.get(
                    f"/v2/{repo}/manifests/{ref}", backend.MAX_MANIFEST, oci.MANIFEST_ACCEPT
                )
            except backend.TooLarge as e:
                logger.warning("backfill: skipping a manifest of %s (%s): %s", repo, ref, e)
                continue
            if r.status != 200:
                continue
            digest = manifest.digest_of(r.body)
            if digest in seen:
                continue
            try:
                doc = manifest.parse(r.body)
                refs, children = manifest.references(doc), set(manifest.children(doc))
            except manifest.ManifestError as e:
                logger.warning("backfill: skipping a manifest of %s (%s): %s", repo, digest, e)
                continue
            seen.add(digest)
            seen.update(d for d in refs if d not in children)
            todo += [d for d in children if d not in seen]
            # Artifacts attached to it (signatures, SBOMs): untagged, found via referrers.
            try:
                rr = self.client.get(f"/v2/{repo}/referrers/{digest}", backend.MAX_MANIFEST)
            except backend.TooLarge as e:
                logger.warning("backfill: skipping the referrers of %s@%s: %s", repo, digest, e)
                continue
            if rr.status != 200:
                continue
            try:
                index = manifest.parse(rr.body)
                todo += [d for d in manifest.children(index) if d not in seen]
            except manifest.ManifestError as e:
                logger.warning("backfill: skipping the referrers of %s@%s: %s", repo, digest, e)
