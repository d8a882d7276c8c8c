"""Record images already in storage (pushed before the ledger, or a restored data dir).

Walks the backend: catalog → tags → manifests (and the children of indexes, and referrers) →
the blobs they reference. The tenant is a repository's first path component. Blocking; the
isolation addon runs it in a thread at start.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from urllib.parse import urljoin

import requests

from addons import manifest
from addons.ledger import Ledger
from addons.routes import TAG, is_name

logger = logging.getLogger(__name__)

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
TIMEOUT = 30
_TAG = re.compile(TAG)


def _pages(session: requests.Session, url: str, key: str) -> Iterator[str]:
    """Follow `Link: <…>; rel="next"` pagination of _catalog and tags/list."""
    while url:
        r = session.get(url, timeout=TIMEOUT)
        if r.status_code == 404:
            return
        r.raise_for_status()
        yield from r.json().get(key) or []
        url = urljoin(url, r.links["next"]["url"]) if "next" in r.links else ""


def _manifest_digests(
    session: requests.Session, base: str, repo: str, ref: str, seen: set[str]
) -> None:
    """Record a tagged manifest, its index children, its referrers and what they reference
    into `seen`: iteratively, since stored content decides how deep it goes.

    Stored content is hostile: a manifest that cannot be read (as the gateway reads pushes:
    addons/manifest.py) is skipped with one log line and never stops the walk of the rest."""
    todo = [ref]
    while todo:
        r = session.get(
            f"{base}/v2/{repo}/manifests/{todo.pop()}", headers={"Accept": ACCEPT}, timeout=TIMEOUT
        )
        if r.status_code != 200:
            continue
        digest = manifest.digest_of(r.content)
        if digest in seen:
            continue
        try:
            doc = manifest.parse(r.content)
            refs, children = manifest.references(doc), set(manifest.children(doc))
        except manifest.ManifestError as e:
            logger.warning("backfill: skipping a manifest of %s (%s): %s", repo, digest, e)
            continue
        seen.add(digest)
        seen.update(d for d in refs if d not in children)
        todo += [d for d in children if d not in seen]
        # Artifacts attached to this manifest (signatures, SBOMs): untagged, found via referrers.
        rr = session.get(f"{base}/v2/{repo}/referrers/{digest}", timeout=TIMEOUT)
        if rr.status_code != 200:
            continue
        try:
            todo += [d for d in manifest.children(manifest.parse(rr.content)) if d not in seen]
        except manifest.ManifestError as e:
            logger.warning("backfill: skipping the referrers of %s@%s: %s", repo, digest, e)


def _repository(session: requests.Session, base: str, repo: str) -> set[str]:
    seen: set[str] = set()
    for tag in _pages(session, f"{base}/v2/{repo}/tags/list?n=1000", "tags"):
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            logger.warning("backfill: skipping tag %.80r of %s", tag, repo)
            continue
        _manifest_digests(session, base, repo, tag, seen)
    return seen


def backfill(base: str, ledger: Ledger) -> int:
    """Record every reachable digest of every tenant repository; returns how many pairs.

    The backend's own failures (unreachable, 5xx on the catalog) raise: the caller retries.
    """
    session = requests.Session()
    session.trust_env = False
    total = 0
    for repo in list(_pages(session, f"{base}/v2/_catalog?n=1000", "repositories")):
        if not isinstance(repo, str) or not is_name(repo) or "/" not in repo:
            continue
        tenant = repo.split("/", 1)[0]
        try:
            seen = _repository(session, base, repo)
        except (requests.HTTPError, ValueError, AttributeError, TypeError) as e:
            # This repository's answers are broken; the others still count. (A backend that
            # is down raises ConnectionError/Timeout through: the caller retries the walk.)
            logger.warning("backfill: skipping repository %s: %s", repo, e)
            continue
        ledger.add(tenant, seen)
        total += len(seen)
    return total
