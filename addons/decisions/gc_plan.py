"""Garbage collection as a pure decision: which tags, manifests and blobs may go.

Input: a Snapshot of the registry graph (per repository its tags and manifests; the content
store's blobs, which Distribution shares across repositories), retention parameters per
repository, and `now`. Output: a Plan (sorted, deterministic) and a per-tenant report. The
caller walks the backend to build the snapshot and executes the plan; nothing here does I/O.

Mark: the roots of a repository are the manifests of its kept tags and every *untagged*
manifest younger than the repository's `untagged_after` grace (a push in flight uploads an
index's children before the index, and a blob before its manifest). A manifest some tag names
is decided by its tags: one whose every tag retention removes is not a root, however young.
Whatever a manifest that could not be read might name is a root too (`Repository.kept`).
From the roots, within the repository: index children; referrers (manifests whose `subject` is
reached: signatures, SBOMs, attestations); and the manifests of cosign attachment tags
`sha256-<hex>.{sig,att,sbom}` whose subject is reached. Attachment tags are kept when their
subject is reached (or a protected pattern names them) and never count for `keep_last`.
Sweep: every unreached manifest; every blob (manifest contents included) that no remaining
manifest in any repository is or references, unless the blob is younger than `blob_grace`.

Tags go with their manifest: a backend such as Distribution cannot remove a tag alone (it
deletes a manifest by digest, with every tag on it). A tag retention would remove whose
manifest stays (also tagged by a kept tag, the child of an index that stays, a referrer of a
subject that stays, or not read) is kept and listed in `Plan.blocked` with the reason.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from addons.decisions import manifest

DEFAULT_GRACE = 3600.0  # seconds: untagged manifests and loose blobs younger than this stay
ATTACHMENT_TAG = re.compile(r"sha256-([0-9a-f]{64})\.(?:sig|att|sbom)")
UNATTRIBUTED = "(unreferenced)"  # report bucket for blobs no manifest of the snapshot names

# --- the snapshot ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tag:
    manifest: str  # digest the tag points at
    pushed: float  # when the tag was last set (epoch seconds)


@dataclass(frozen=True)
class Manifest:
    kind: str = "image"  # "image" | "index" | "other"
    children: tuple[str, ...] = ()  # child manifests (an index)
    blobs: tuple[str, ...] = ()  # config, layers, artifact blobs
    subject: str | None = None
    size: int = 0  # bytes of the manifest itself
    pushed: float = 0.0


@dataclass(frozen=True)
class Repository:
    tags: Mapping[str, Tag] = field(default_factory=dict)
    manifests: Mapping[str, Manifest] = field(default_factory=dict)
    # What manifests that could not be read might name (manifest.might_name): it all stays,
    # as roots (manifests among it keep what they name).
    kept: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Blob:
    size: int
    pushed: float | None = None  # None: unknown, treated as old


@dataclass(frozen=True)
class Snapshot:
    repositories: Mapping[str, Repository]
    blobs: Mapping[str, Blob | int] = field(default_factory=dict)  # an int is a size


def tenant_of(repository: str) -> str:
    return repository.split("/", 1)[0]


def attachment_subject(tag: str) -> str | None:
    """The digest a cosign `sha256-<hex>.sig|.att|.sbom` tag is attached to, else None."""
    m = ATTACHMENT_TAG.fullmatch(tag)
    return f"sha256:{m.group(1)}" if m else None


def describe_manifest(body: bytes, pushed: float = 0.0) -> Manifest:
    """A Manifest for the snapshot from a manifest's bytes, read exactly as a push is
    (manifest.parse, manifest.parts). Hostile input: ManifestError where the backend's
    reading could differ; the caller then keeps what it might name (manifest.might_name)."""
    made = manifest.parts(manifest.parse(body))
    return Manifest(
        kind=made.kind,
        children=made.children,
        blobs=made.blobs,
        subject=made.subject,
        size=len(body),
        pushed=pushed,
    )


# --- retention ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retention:
    """What GC may take from one repository.

    keep_last: keep the N most recently pushed tags (None: keep every tag). Protected tags
    (glob patterns as fnmatch reads them, or a predicate) are always kept and do not count
    toward N. untagged_after: manifests younger than this are kept even when nothing reaches
    them (seconds or a timedelta).
    """

    keep_last: int | None = None
    untagged_after: float | timedelta = DEFAULT_GRACE
    protected: Sequence[str] | Callable[[str], bool] = ()

    def __post_init__(self) -> None:
        if self.keep_last is not None and (type(self.keep_last) is not int or self.keep_last < 0):
            raise ValueError("keep_last must be a non-negative integer or None")
        if seconds(self.untagged_after) < 0:
            raise ValueError("untagged_after must not be negative")
        if not callable(self.protected) and isinstance(self.protected, str):
            raise ValueError("protected must be a list of patterns, not one string")

    def is_protected(self, tag: str) -> bool:
        if callable(self.protected):
            return bool(self.protected(tag))
        return any(fnmatch.fnmatchcase(tag, p) for p in self.protected)


RetentionFor = Retention | Mapping[str, Retention] | Callable[[str], Retention]


def seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _retention(rules: RetentionFor, repository: str) -> Retention:
    if isinstance(rules, Retention):
        return rules
    if isinstance(rules, Mapping):
        return rules.get(repository, Retention())
    return rules(repository)


def _kept_tags(tags: Mapping[str, Tag], retention: Retention) -> set[str]:
    """Ordinary tags that stay: protected ones, plus the keep_last most recently pushed."""
    protected = {t for t in tags if retention.is_protected(t)}
    rest = [t for t in tags if t not in protected]
    if retention.keep_last is None:
        return protected | set(rest)
    newest_first = sorted(rest, key=lambda t: (-tags[t].pushed, t))
    return protected | set(newest_first[: retention.keep_last])


# --- mark --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RepoDecision:
    deleted_tags: frozenset[str]
    reached: frozenset[str]  # manifest digests that stay (and digests they name)
    blocked: Mapping[str, str] = field(default_factory=dict)  # tag → why it stays


def _mark_repository(repo: Repository, retention: Retention, now: float) -> _RepoDecision:
    grace = seconds(retention.untagged_after)
    ordinary = {t: tag for t, tag in repo.tags.items() if attachment_subject(t) is None}
    kept_ordinary = _kept_tags(ordinary, retention)
    referrers: dict[str, list[str]] = defaultdict(list)
    for d, m in repo.manifests.items():
        if m.subject:
            referrers[m.subject].append(d)
    attached: dict[str, list[str]] = defaultdict(list)
    for t, tag in repo.tags.items():
        subject = attachment_subject(t)
        if subject is not None:
            attached[subject].append(tag.manifest)

    # Attachment tags a protected pattern names (an [[immutable]] `sha256-*` tag) stay too.
    kept_attachments = {t for t in repo.tags if t not in ordinary and retention.is_protected(t)}
    tagged = {tag.manifest for tag in repo.tags.values()}
    stack = [ordinary[t].manifest for t in kept_ordinary]
    stack += [repo.tags[t].manifest for t in kept_attachments]
    stack += [d for d, m in repo.manifests.items() if d not in tagged and now - m.pushed < grace]
    stack += sorted(repo.kept)
    reached: set[str] = set()
    while stack:
        d = stack.pop()
        if d in reached:
            continue
        reached.add(d)
        m = repo.manifests.get(d)
        if m is not None:
            stack.extend(m.children)
        stack.extend(referrers.get(d, ()))
        stack.extend(attached.get(d, ()))

    unkept = {t for t in ordinary if t not in kept_ordinary}
    unkept |= {
        t
        for t in repo.tags
        if (s := attachment_subject(t)) and s not in reached and t not in kept_attachments
    }
    # A tag goes only with its manifest (Distribution deletes tags that way alone).
    deleted = {t for t in unkept if _goes(repo, reached, repo.tags[t].manifest)}
    blocked = {t: _why_kept(repo, reached, t, unkept, attached) for t in sorted(unkept - deleted)}
    return _RepoDecision(frozenset(deleted), frozenset(reached), blocked)


def _goes(repo: Repository, reached: set[str], digest: str) -> bool:
    return digest in repo.manifests and digest not in reached


def _why_kept(
    repo: Repository,
    reached: set[str],
    tag: str,
    unkept: set[str],
    attached: Mapping[str, list[str]],
) -> str:
    """Why a tag retention would remove stays: its manifest stays, and it cannot go alone."""
    d = repo.tags[tag].manifest
    alone = "; a tag cannot be removed alone (only with its manifest, and every tag on it)"
    if d not in repo.manifests:
        return f"its manifest {d} could not be read, so it is kept{alone}"
    sharing = sorted(t for t, v in repo.tags.items() if v.manifest == d and t not in unkept)
    if sharing:
        return f"its manifest {d} is also tagged {', '.join(sharing)}, which stays{alone}"
    parents = sorted(p for p in reached if d in (repo.manifests.get(p) or Manifest()).children)
    if parents:
        return f"its manifest {d} is a child of index {parents[0]}, which stays{alone}"
    subject = repo.manifests[d].subject
    if subject in reached or any(d in attached.get(s, ()) for s in reached):
        return f"its manifest {d} is a signature or referrer of an image that stays{alone}"
    return f"its manifest {d} stays (reached from content that stays){alone}"


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reclaimed:
    tags: int = 0
    manifests: int = 0
    blobs: int = 0
    bytes: int = 0

    def __add__(self, other: Reclaimed) -> Reclaimed:
        return Reclaimed(
            self.tags + other.tags,
            self.manifests + other.manifests,
            self.blobs + other.blobs,
            self.bytes + other.bytes,
        )


@dataclass(frozen=True)
class Plan:
    tags: tuple[tuple[str, str], ...]  # (repository, tag)
    manifests: tuple[tuple[str, str], ...]  # (repository, digest)
    blobs: tuple[str, ...]  # content digests (manifest contents included)
    bytes: int  # reclaimed by the blobs
    tenants: Mapping[str, Reclaimed]
    # (repository, tag, reason): tags retention would remove that stay with their manifest
    blocked: tuple[tuple[str, str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.tags or self.manifests or self.blobs)

    def totals(self) -> Reclaimed:
        return sum(self.tenants.values(), Reclaimed())

    def report(self) -> dict[str, Any]:
        """JSON-ready: what is (or would be) reclaimed, per tenant and in total."""
        return {
            "tenants": {t: vars(r) for t, r in sorted(self.tenants.items())},
            "totals": vars(self.totals()),
            "tags": [{"repository": r, "tag": t} for r, t in self.tags],
            "manifests": [{"repository": r, "digest": d} for r, d in self.manifests],
            "blobs": list(self.blobs),
            "tags_not_removed": [
                {"repository": r, "tag": t, "reason": why} for r, t, why in self.blocked
            ],
        }


def _content(snapshot: Snapshot) -> dict[str, Blob]:
    """Every stored digest with its size: the blobs, and the manifests (which are content)."""
    content = {
        d: b if isinstance(b, Blob) else Blob(int(b)) for d, b in sorted(snapshot.blobs.items())
    }
    for _, repo in sorted(snapshot.repositories.items()):
        for d, m in sorted(repo.manifests.items()):
            content.setdefault(d, Blob(m.size, m.pushed))
    return content


def _names(d: str, m: Manifest) -> Iterable[str]:
    """The content a manifest keeps: itself, its blobs, its children."""
    yield d
    yield from m.blobs
    yield from m.children


def plan(
    snapshot: Snapshot,
    retention: RetentionFor,
    now: float,
    blob_grace: float | timedelta = DEFAULT_GRACE,
) -> Plan:
    """Decide what GC removes. Deterministic: the same inputs give the same plan."""
    decisions = {
        name: _mark_repository(repo, _retention(retention, name), now)
        for name, repo in sorted(snapshot.repositories.items())
    }
    tags, manifests, blocked = [], [], []
    marked: set[str] = set()
    named_by_deleted: dict[str, set[str]] = defaultdict(set)  # content → tenants
    for name, repo in sorted(snapshot.repositories.items()):
        decision = decisions[name]
        tags += [(name, t) for t in sorted(decision.deleted_tags)]
        blocked += [(name, t, why) for t, why in sorted(decision.blocked.items())]
        # Kept tags point at reached digests; a dangling one still names its digest.
        for t, tag in repo.tags.items():
            if t not in decision.deleted_tags:
                marked.add(tag.manifest)
        for d, m in sorted(repo.manifests.items()):
            if d in decision.reached:
                marked.update(_names(d, m))
            else:
                manifests.append((name, d))
                for c in _names(d, m):
                    named_by_deleted[c].add(tenant_of(name))
        marked |= decision.reached

    grace = seconds(blob_grace)
    content = _content(snapshot)
    blobs = [
        d
        for d, b in content.items()
        if d not in marked and (b.pushed is None or now - b.pushed >= grace)
    ]
    return Plan(
        tags=tuple(tags),
        manifests=tuple(manifests),
        blobs=tuple(sorted(blobs)),
        bytes=sum(content[d].size for d in blobs),
        tenants=_per_tenant(content, tags, manifests, blobs, named_by_deleted),
        blocked=tuple(blocked),
    )


def _per_tenant(
    content: Mapping[str, Blob],
    tags: list[tuple[str, str]],
    manifests: list[tuple[str, str]],
    blobs: list[str],
    named_by: Mapping[str, set[str]],
) -> dict[str, Reclaimed]:
    """Counts per tenant. A blob is charged once, to the first tenant (by name) whose removed
    manifests named it, so the tenants' figures add up to the plan's totals."""
    out: dict[str, Reclaimed] = defaultdict(Reclaimed)
    for name, _ in tags:
        out[tenant_of(name)] += Reclaimed(tags=1)
    for name, _ in manifests:
        out[tenant_of(name)] += Reclaimed(manifests=1)
    for d in blobs:
        owner = min(named_by[d]) if named_by.get(d) else UNATTRIBUTED
        out[owner] += Reclaimed(blobs=1, bytes=content[d].size)
    return dict(sorted(out.items()))


def apply_plan(snapshot: Snapshot, p: Plan) -> Snapshot:
    """The snapshot after the plan has been carried out (tests; dry-run previews)."""
    gone_tags = defaultdict(set)
    for name, t in p.tags:
        gone_tags[name].add(t)
    gone_manifests = defaultdict(set)
    for name, d in p.manifests:
        gone_manifests[name].add(d)
    repositories = {
        name: replace(
            repo,
            tags={t: v for t, v in repo.tags.items() if t not in gone_tags[name]},
            manifests={d: m for d, m in repo.manifests.items() if d not in gone_manifests[name]},
        )
        for name, repo in snapshot.repositories.items()
    }
    gone_blobs = set(p.blobs)
    blobs = {d: b for d, b in snapshot.blobs.items() if d not in gone_blobs}
    return Snapshot(repositories, blobs)
