"""Record images already in storage (pushed before the ledger, or a restored data dir).

Walks the backend: catalog → tags → manifests (and the children of indexes, and referrers) →
the blobs they reference. The tenant is a repository's first path component. Blocking; the
isolation addon runs it in a thread at start.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from urllib.parse import urljoin

import requests

from addons.ledger import MAX_MANIFEST, Ledger, ManifestError, manifest_references
from addons.routes import is_component

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
    r = session.get(
        f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=TIMEOUT
    )
    if r.status_code != 200 or len(r.content) > MAX_MANIFEST:
        return
    digest = "sha256:" + hashlib.sha256(r.content).hexdigest()
    if digest in seen:
        return
    seen.add(digest)
    try:
        refs = manifest_references(r.content)
    except ManifestError:
        return
    children = r.json().get("manifests") or []
    child_digests = {c.get("digest") for c in children if isinstance(c, dict)}
    for ref_digest in refs:
        if ref_digest in child_digests:
            _manifest_digests(session, base, repo, ref_digest, seen)
        else:
            seen.add(ref_digest)
    # Artifacts attached to this manifest (signatures, SBOMs): untagged, found via referrers.
    rr = session.get(f"{base}/v2/{repo}/referrers/{digest}", timeout=TIMEOUT)
    if rr.status_code == 200:
        for item in rr.json().get("manifests") or []:
            if isinstance(item, dict) and isinstance(item.get("digest"), str):
                _manifest_digests(session, base, repo, item["digest"], seen)


def backfill(base: str, ledger: Ledger) -> int:
    """Record every reachable digest of every tenant repository; returns how many pairs."""
    session = requests.Session()
    session.trust_env = False
    total = 0
    for repo in list(_pages(session, f"{base}/v2/_catalog?n=1000", "repositories")):
        tenant = repo.split("/", 1)[0]
        if "/" not in repo or not is_component(tenant):
            continue
        seen: set[str] = set()
        for tag in _pages(session, f"{base}/v2/{repo}/tags/list?n=1000", "tags"):
            _manifest_digests(session, base, repo, tag, seen)
        ledger.add(tenant, seen)
        total += len(seen)
    return total
