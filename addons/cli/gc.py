"""`tabbify-registry gc [--dry-run]` and the periodic run (contract §8).

With Distribution (the local and test backend) this program does the whole job:

1. **Snapshot** over HTTP: catalog → tags → manifests (index children, referrers where the
   backend has the API), plus the manifests the isolation ledger knows each repository holds
   (Distribution cannot list untagged manifests; those pushed before the ledger existed stay
   invisible, hence kept). Push times come from the ledger (the gateway records each
   confirmed manifest and tag push); a tag whose push time is unknown is kept, a manifest
   whose push time is unknown counts as just pushed.
2. **Plan** with addons/decisions/gc_plan.py under the policy's `[[retention]]` rules: `keep_last`
   tags by push time, `protected_tags`, `untagged_after` (default, and without a rule: 1 h).
   `--dry-run` stops here and prints the plan.
3. **Hold the writes that could revive a blob** (addons/gateway/freeze.py): a marker in the workers'
   state directory; every gateway worker holds (does not refuse) manifest PUTs, mounts,
   upload-completing requests and DELETEs until the marker goes; uploads, reads and
   everything else go on. Marking starts as soon as every live worker reports the freeze,
   without waiting for the held-kind writes it let through before: each worker lists what
   those can link (digests named in their query, a manifest's own digest and references),
   and that union is **protected** this run: never swept, never deleted as a manifest; a
   repository with a DELETE in flight keeps its tags this run. A worker that cannot tell
   makes the run remove nothing (`Acknowledged`). The marker is a short
   lease the GC renews, never past FREEZE_MAX after it was first written: a GC that died
   releases the held writes within LEASE seconds, and no write waits longer than FREEZE_MAX.
4. **Delete** the planned manifests by digest through the backend API, after re-reading the
   tags of their repositories inside the freeze (a digest tagged again since the snapshot
   stays). Distribution removes a manifest's tags with it and cannot delete a tag alone: the
   plan removes a tag only with its manifest and reports the tags it had to keep
   (`tags_not_removed`, with why).
5. **Mark** with `docker-registry garbage-collect --dry-run <config>` (never
   `--delete-untagged`: it breaks multi-arch indexes and referrers): the blobs no manifest
   of any repository references. **Sweep** those whose stored data, and every repository
   link to them, are older than BLOB_GRACE (Zot's gcDelay): a blob uploaded, or mounted or
   re-uploaded into a repository, within the grace stays even when no manifest references it
   yet (a push sends its layers first, its manifest last). A blob is removed as
   Distribution's own sweep removes it (vacuum.RemoveBlob: the blob's directory
   `blobs/sha256/<xx>/<hex>`, on S3 every key under that prefix). The rendered config has no
   blob-descriptor cache, so nothing serves a deleted blob afterwards.
6. The **ledger forgets** what is gone, every worker drops its cached signature verdicts,
   the freeze ends, and a JSON **report** (per tenant: tags, manifests, blobs, bytes) is
   printed and written to `$REGISTRY_DATA_DIR/gc/`.

With Zot, GC and retention are Zot's own (`storage.gc`, `gcDelay`, `gcInterval`,
`retention` rendered by zot/config.py from REGISTRY_GC_INTERVAL and `[[retention]]`): the
command prints those settings and triggers nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons import runstate
from addons.clients import backend, backend_credential
from addons.config.settings import ConfigError, Settings, distribution_env
from addons.decisions import gc_plan, manifest
from addons.decisions.policy import EMPTY, Policy
from addons.engine import oci
from addons.gateway import freeze, require_signature
from addons.gateway.policy_store import read as read_policy
from addons.storage.ledger import LedgerUnavailable, holder
from addons.storage.sqlite import SqliteLedger
from zot import config as backend_config

logger = logging.getLogger("gc")

PAGE = 1000
STALE = 5.0  # a worker that has not published for this long is not waited for
FREEZE_WAIT = 30.0  # seconds to wait for every live worker to report the freeze
FREEZE_MAX = 120.0  # no write is held longer: the freeze never lasts past this
LEASE = 15.0  # a marker not renewed for this long expires (a GC that was killed)
FREEZE_RENEW = 3.0  # the running GC renews its marker this often
MARGIN = 5.0  # nothing is removed with less than this left on the marker
BLOB_GRACE = gc_plan.DEFAULT_GRACE  # blobs stored or linked more recently are never swept


class GcError(Exception):
    """The run was abandoned (nothing, or only what the report says, was removed)."""


# --- the snapshot ------------------------------------------------------------------------------


@dataclass
class Walk:
    snapshot: gc_plan.Snapshot
    unknown_tags: dict[str, set[str]] = field(default_factory=dict)  # repo → tags kept as unknown


class Backend:
    """The backend as GC reads it (addons/clients/backend.py: bounded, timed, credentialed)."""

    def __init__(self, base: str, credential: str | None = None) -> None:
        authorization = backend_credential.authorization(credential) if credential else None
        self.client = backend.Client(
            base, authorization=authorization, timeout=backend.WALK_TIMEOUT
        )

    def catalog(self) -> list[str]:
        return list(self.client.pages(f"/v2/_catalog?n={PAGE}", "repositories"))

    def tags(self, repo: str) -> list[str]:
        return list(self.client.pages(f"/v2/{repo}/tags/list?n={PAGE}", "tags"))

    def manifest(self, repo: str, ref: str) -> bytes | None:
        r = self.client.get(
            f"/v2/{repo}/manifests/{ref}", backend.MAX_MANIFEST, oci.MANIFEST_ACCEPT
        )
        return None if r.status == 404 else r.expect(200).body

    def referrers(self, repo: str, digest: str) -> list[str]:
        r = self.client.get(f"/v2/{repo}/referrers/{digest}", backend.MAX_MANIFEST)
        if r.status != 200:  # Distribution 2.8: no referrers API (404)
            return []
        try:
            return list(manifest.children(manifest.parse(r.body)))
        except manifest.ManifestError:
            return []

    def delete_manifest(self, repo: str, digest: str) -> int:
        return self.client.request("DELETE", f"/v2/{repo}/manifests/{digest}").status


def walk_repository(
    backend: Backend,
    repo: str,
    now: float,
    ledger: SqliteLedger | None,
    sizes: dict[str, int],
    blobs: set[str],
) -> tuple[gc_plan.Repository, set[str]]:
    """One repository as gc_plan sees it, and its tags whose push time is unknown. `sizes`
    and `blobs` (digests known as some manifest's config, layer or blob) are filled in."""
    pushes = ledger.pushes(repo) if ledger else {}
    tags: dict[str, gc_plan.Tag] = {}
    unknown: set[str] = set()
    manifests: dict[str, gc_plan.Manifest] = {}
    kept: set[str] = set()  # what manifests that cannot be read might name
    seen: set[str] = set()

    def walk(todo: list[str]) -> None:
        while todo:
            digest = todo.pop()
            if digest in seen or digest in blobs:
                continue
            seen.add(digest)
            body = backend.manifest(repo, digest)
            if body is None or manifest.digest_of(body) != digest:
                continue
            pushed = pushes[digest][1] if digest in pushes else now  # unknown: young, kept
            try:
                described = gc_plan.describe_manifest(body, pushed)
            except manifest.ManifestError as e:
                logger.warning("gc: keeping %s@%s, unreadable: %s", repo, digest, e)
                kept.update(manifest.might_name(body))  # and all it might name (fail closed)
                continue  # not in the snapshot: never deleted
            manifests[digest] = described
            sizes.update(manifest.descriptor_sizes(body))
            sizes[digest] = len(body)
            blobs.update(described.blobs)
            todo += [d for d in described.children if d not in seen]
            todo += [d for d in backend.referrers(repo, digest) if d not in seen]

    for tag in backend.tags(repo):
        if not isinstance(tag, str):
            continue
        body = backend.manifest(repo, tag)
        if body is None:
            continue
        digest = manifest.digest_of(body)
        known = pushes.get(tag)
        if known is None or known[0] != digest:
            unknown.add(tag)  # pushed outside the gateway's records: kept
        tags[tag] = gc_plan.Tag(digest, known[1] if known and known[0] == digest else now)
        walk([digest])
    if ledger is not None:
        # Untagged manifests: only the ledger knows them, those pushed through the gateway
        # (a push time under their own digest) that the repository still holds.
        held = set(ledger.holdings(holder(repo)))
        walk([ref for ref, (d, _) in pushes.items() if ref == d and d in held and d not in seen])
    return gc_plan.Repository(tags, manifests, frozenset(kept)), unknown


def snapshot(backend: Backend, ledger: SqliteLedger | None, now: float) -> Walk:
    repos: dict[str, gc_plan.Repository] = {}
    unknown: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    blobs: set[str] = set()
    for repo in backend.catalog():
        if not isinstance(repo, str):
            continue
        repos[repo], unknown[repo] = walk_repository(backend, repo, now, ledger, sizes, blobs)
    if ledger is not None:
        sizes.update(ledger.sizes(sizes))  # sizes the gateway measured win over descriptors
    blobs = {d: gc_plan.Blob(n, None) for d, n in sizes.items()}
    return Walk(gc_plan.Snapshot(repos, blobs), unknown)


def retention_for(policy: Policy, unknown: Mapping[str, set[str]]) -> Any:
    """gc_plan retention per repository from the policy's [[retention]] rules."""

    def rules(repo: str) -> gc_plan.Retention:
        plan = policy.retention(repo)
        kept = unknown.get(repo, set())
        grace = (
            plan.untagged_after.total_seconds()
            if plan is not None and plan.untagged_after is not None
            else gc_plan.DEFAULT_GRACE
        )
        return gc_plan.Retention(
            keep_last=plan.keep_last if plan is not None else None,
            untagged_after=grace,
            protected=lambda tag: (
                tag in kept
                or (plan is not None and plan.protects(tag))
                or policy.is_immutable(repo, tag) is not None
            ),
        )

    return rules


# --- the freeze --------------------------------------------------------------------------------


def live_workers(state_dir: Path, now: float) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(state_dir.glob(runstate.WORKER_GLOB)):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and now - float(state.get("time", 0)) < STALE:
            out[path.stem] = state
    return out


@dataclass(frozen=True)
class Acknowledged:
    """What the live workers reported about a freeze: who has not seen it yet, who cannot
    tell what its writes in flight can link, and the union of what they can link."""

    pending: list[str]
    unknown: list[str]
    protected: frozenset[str] = frozenset()  # digests: never swept, never deleted
    deleting: frozenset[str] = frozenset()  # repositories with a DELETE in flight


def acknowledged(
    workers: Mapping[str, Mapping[str, Any]], freeze_id: str, started: float
) -> Acknowledged:
    """Pure. A worker counts once it published, after the freeze began, that it sees it:
    from then on it admits no held-kind write, and what it lists covers every one still in
    flight (addons/gateway/freeze.py). Its list is read only then; a later one lists a subset, the
    writes that ended having done what they did before it was written."""
    pending, unknown = [], []
    protected: set[str] = set()
    deleting: set[str] = set()
    for name, state in workers.items():
        seen = state.get("freeze")
        seen = seen if isinstance(seen, Mapping) else {}
        if not float(state.get("time", 0)) > started or seen.get("seen") != freeze_id:
            pending.append(f"{name}: not frozen yet")
            continue
        links, repos = seen.get("links"), seen.get("deleting")
        if not isinstance(links, list) or not isinstance(repos, list):
            unknown.append(f"{name}: {seen.get('in_flight', '?')} writes in flight")
            continue
        protected.update(d for d in links if isinstance(d, str))
        deleting.update(r for r in repos if isinstance(r, str))
    return Acknowledged(pending, unknown, frozenset(protected), frozenset(deleting))


class Freeze:
    """The write freeze as a context manager: entered once every live worker has stopped
    letting held-kind writes through (what those in flight can link: `protected`,
    `deleting`), always lifted on the way out. Its marker is a lease of LEASE seconds,
    renewed, and never extended past FREEZE_MAX after it was first written."""

    def __init__(self, state_dir: Path, wait: float = FREEZE_WAIT) -> None:
        self.path = state_dir / freeze.MARKER
        self.state_dir, self.wait = state_dir, wait
        self.id = secrets.token_hex(6)
        self.started = 0.0
        self.until = 0.0  # what the workers were last told
        self._done = threading.Event()
        self._renewer: threading.Thread | None = None
        self.protected: frozenset[str] = frozenset()
        self.deleting: frozenset[str] = frozenset()

    def _write(self) -> None:
        until = min(time.time() + LEASE, self.started + FREEZE_MAX)
        marker = {"id": self.id, "until": until, "reason": "garbage collection"}
        runstate.write_json(self.path, marker)
        self.until = until

    def _renew(self) -> None:
        while not self._done.wait(FREEZE_RENEW):
            try:
                self._write()
            except OSError as e:
                logger.warning("gc: cannot renew the freeze marker: %s", e)

    def left(self) -> float:
        """Seconds the workers still hold writes for, as far as this GC can count on."""
        return self.until - time.time()

    def holding(self) -> bool:
        """Whether something may still be removed: held writes stay held past MARGIN."""
        return self.left() > MARGIN

    def __enter__(self) -> Freeze:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self._write()
        self._renewer = threading.Thread(target=self._renew, daemon=True)
        self._renewer.start()
        deadline = time.monotonic() + min(self.wait, FREEZE_MAX / 2)
        while True:
            ack = acknowledged(live_workers(self.state_dir, time.time()), self.id, self.started)
            if not ack.pending:
                break
            if time.monotonic() > deadline:
                self.lift()
                raise GcError(
                    f"gateway workers did not report the freeze within {self.wait:.0f} s "
                    f"({', '.join(ack.pending)}); nothing was removed"
                )
            time.sleep(0.2)
        if ack.unknown:
            # Writes in flight whose links a worker cannot tell: nothing is removed, and
            # nobody waits for them.
            self.lift()
            raise GcError(
                f"writes in flight whose blobs cannot be told ({', '.join(ack.unknown)}); "
                "nothing was removed"
            )
        self.protected, self.deleting = ack.protected, ack.deleting
        return self

    def lift(self) -> None:
        self._done.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            current = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if current.get("id") == self.id:
            self.path.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.lift()


# --- the sweep ---------------------------------------------------------------------------------

V2 = "docker/registry/v2"  # Distribution's layout under its storage root


def blob_hex(digest: str) -> str | None:
    algorithm, _, hexpart = digest.partition(":")
    if (
        algorithm != "sha256"
        or len(hexpart) != 64
        or not all(c in "0123456789abcdef" for c in hexpart)
    ):
        return None
    return hexpart


class LocalBlobs:
    """Distribution's filesystem storage: ages from mtimes, removal as vacuum.RemoveBlob."""

    def __init__(self, root: Path) -> None:
        self.v2 = root / V2

    def stored(self, digests: Iterable[str]) -> dict[str, float]:
        """digest → the newest time its data was written or a repository linked it."""
        wanted = {h: d for d in digests if (h := blob_hex(d))}
        newest: dict[str, float] = {}
        for h, d in wanted.items():
            try:
                newest[d] = (self.v2 / "blobs/sha256" / h[:2] / h / "data").stat().st_mtime
            except OSError:
                continue  # already gone
        # `_layers/sha256/<hex>/link` is rewritten by every upload and mount of the blob into
        # a repository, even when its data was already stored (and not rewritten).
        for top, _, files in os.walk(self.v2 / "repositories"):
            if "link" not in files:
                continue
            here = Path(top)
            d = wanted.get(here.name) if here.parent.name == "sha256" else None
            if d is None:
                continue
            try:
                mtime = (here / "link").stat().st_mtime
            except OSError:
                continue
            newest[d] = max(newest.get(d, 0.0), mtime)
        return newest

    def remove(self, digest: str) -> None:
        h = blob_hex(digest)
        if h is not None:
            shutil.rmtree(self.v2 / "blobs/sha256" / h[:2] / h, ignore_errors=True)


class S3Blobs:
    """Distribution's S3 storage: ages from LastModified, removal of the blob's prefix."""

    def __init__(self, client: Any, bucket: str, root: str) -> None:
        self.s3, self.bucket = client, bucket
        self.v2 = f"{root.strip('/')}/{V2}/" if root.strip("/") else f"{V2}/"

    @classmethod
    def for_settings(cls, s: Settings) -> S3Blobs:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            region_name=s.s3_region,
            endpoint_url=s.s3_endpoint,
            config=Config(
                retries={"mode": "standard", "max_attempts": 3},
                s3={"addressing_style": "path" if s.s3_endpoint else "auto"},
            ),
        )
        return cls(client, str(s.s3_bucket), backend_config.S3_PREFIX)

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            yield from page.get("Contents", [])

    def _blob_prefix(self, h: str) -> str:
        return f"{self.v2}blobs/sha256/{h[:2]}/{h}/"

    def stored(self, digests: Iterable[str]) -> dict[str, float]:
        wanted = {h: d for d in digests if (h := blob_hex(d))}
        newest: dict[str, float] = {}
        for h, d in wanted.items():
            for obj in self._objects(self._blob_prefix(h)):
                t = obj["LastModified"].timestamp()
                newest[d] = max(newest.get(d, 0.0), t)
        for obj in self._objects(f"{self.v2}repositories/"):
            parts = obj["Key"].rsplit("/", 3)
            if len(parts) == 4 and parts[3] == "link" and parts[1] == "sha256":
                d = wanted.get(parts[2])
                if d is not None:
                    newest[d] = max(newest.get(d, 0.0), obj["LastModified"].timestamp())
        return newest

    def remove(self, digest: str) -> None:
        h = blob_hex(digest)
        if h is None:
            return
        keys = [{"Key": o["Key"]} for o in self._objects(self._blob_prefix(h))]
        for i in range(0, len(keys), 1000):
            self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000]})


def blob_store(s: Settings) -> LocalBlobs | S3Blobs:
    if s.storage == "s3":
        return S3Blobs.for_settings(s)
    return LocalBlobs(Path(backend_config.storage_root(s)))


def sweepable(
    eligible: set[str], stored: Mapping[str, float], now: float, grace: float
) -> set[str]:
    """The eligible blobs stored and last linked at least `grace` seconds ago (a blob whose
    data is already gone has nothing to sweep)."""
    return {d for d in eligible if d in stored and now - stored[d] >= grace}


# --- the run -----------------------------------------------------------------------------------


def distribution_config(s: Settings) -> Path:
    """The config the backend runs with (rendered by `run`); rendered here if absent."""
    path = s.runtime_dir / "distribution-config.json"
    if not path.exists():
        s.runtime_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(backend_config.render_distribution(s), indent=2))
    return path


def mark(config: Path, timeout: float) -> set[str] | None:
    """Distribution's own mark (`garbage-collect --dry-run`, never --delete-untagged): the
    blobs no manifest of any repository references; None if it took longer than `timeout`."""
    # The environment the backend itself runs with (cli.supervisor_env): REGISTRY_* removed
    # (Distribution reads them as config overrides), the rest kept, among it the S3 SDK's
    # default credential chain (AWS_*), which the mark needs to read the bucket.
    env = distribution_env(os.environ)  # and AWS_CA_BUNDLE as SSL_CERT_FILE
    env.setdefault("PATH", "/usr/bin:/bin")
    try:
        out = subprocess.run(
            ["docker-registry", "garbage-collect", "--dry-run", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=max(timeout, 1.0),
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        raise GcError(f"docker-registry garbage-collect failed: {out.stderr.strip()[-500:]}")
    prefix = "blob eligible for deletion: "
    return {ln[len(prefix) :].strip() for ln in out.stdout.splitlines() if ln.startswith(prefix)}


def sweep(
    store: LocalBlobs | S3Blobs, eligible: set[str], frozen: Freeze, grace: float
) -> tuple[set[str], set[str], bool]:
    """Remove the eligible blobs older than `grace` while the freeze holds, except those a
    write in flight may link (`frozen.protected`): (removed, kept as young, whether the freeze
    ran out first)."""
    eligible = eligible - frozen.protected  # what writes in flight may link stays
    stored = store.stored(eligible)
    old = sweepable(eligible, stored, time.time(), grace)
    young = {d for d in eligible - old if d in stored}
    removed: set[str] = set()
    for d in sorted(old):
        if not frozen.holding():
            return removed, young, True
        store.remove(d)
        removed.add(d)
    return removed, young, False


def run_once(s: Settings, dry_run: bool, freeze_wait: float = FREEZE_WAIT) -> dict[str, Any]:
    if s.backend == "zot":
        return zot_report(s)
    if s.backend != "distribution":
        raise ConfigError("REGISTRY_BACKEND=external: garbage collection is the backend's own")
    policy = EMPTY if s.anonymous else read_policy(s.policy_file)
    ledger_path = s.data_dir / "ledger" / "ledger.db"
    ledger = SqliteLedger(ledger_path) if not s.anonymous and ledger_path.exists() else None
    backend = Backend(f"http://{s.backend_addr.hostport}", run_credential(s))
    try:
        if ledger is not None and not ledger.whole:  # its untagged manifests, push times
            raise GcError(f"the isolation ledger is not whole ({ledger.lost}); retry once rebuilt")
        started, now = time.monotonic(), time.time()
        walk = snapshot(backend, ledger, now)
        plan = gc_plan.plan(walk.snapshot, retention_for(policy, walk.unknown_tags), now)
        report: dict[str, Any] = {
            "backend": "distribution",
            "dry_run": dry_run,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            **plan.report(),
        }
        if dry_run:
            report["seconds"] = round(time.monotonic() - started, 3)
            return report
        store = blob_store(s)
        config = distribution_config(s)
        with Freeze(s.state_dir, freeze_wait) as frozen:
            deleted = delete_manifests(backend, plan, ledger, now, policy, frozen)
            if deleted and s.state_dir.exists():
                # The workers' caches (signature verdicts, content) forget them at once; and
                # once more below, after the sweep.
                require_signature.bump_generation(s.state_dir)
            eligible = mark(config, frozen.left() - MARGIN) if frozen.holding() else None
            collected, young, cut = set(), set(), eligible is None
            if eligible is not None:
                collected, young, cut = sweep(store, eligible, frozen, BLOB_GRACE)
            report["kept_young_blobs"] = len(young)
            report["protected_in_flight"] = {
                "digests": len(frozen.protected),
                "repositories": sorted(frozen.deleting),
            }
            report["blob_grace_seconds"] = BLOB_GRACE
            if cut:
                report["sweep_cut_short"] = "the freeze ran out; the rest goes next run"
            if ledger is not None:
                for repo in {r for r, _ in deleted}:
                    ledger.forget_manifests(repo, [d for r, d in deleted if r == repo])
                ledger.forget(collected)
            if s.state_dir.exists():
                require_signature.bump_generation(s.state_dir)
            report["freeze_seconds"] = round(time.time() - frozen.started, 3)
        sizes = walk.snapshot.blobs
        report["deleted_manifests"] = [{"repository": r, "digest": d} for r, d in deleted]
        report["collected"] = {
            "blobs": len(collected),
            "bytes": sum(
                b.size if isinstance(b, gc_plan.Blob) else int(b)
                for d, b in sizes.items()
                if d in collected
            ),
        }
        report["seconds"] = round(time.monotonic() - started, 3)
        return report
    finally:
        if ledger is not None:
            ledger.close()


def delete_manifests(
    backend: Backend,
    plan: gc_plan.Plan,
    ledger: SqliteLedger | None,
    now: float,
    policy: Policy,
    frozen: Freeze | None = None,
) -> list[tuple[str, str]]:
    """Inside the freeze: re-read each affected repository, re-plan it, and delete only what
    both plans remove (a digest tagged again since the snapshot stays). Deleting a manifest
    by digest takes every tag on it: the plan removes a manifest only when none of its tags
    stays. A manifest a write in flight may link stays, and a repository with a DELETE in
    flight is left for the next run (its tags are changing under the plan)."""
    deleted = []
    protected = frozen.protected if frozen is not None else frozenset()
    deleting = frozen.deleting if frozen is not None else frozenset()
    for repo in sorted({r for r, _ in plan.manifests} - deleting):
        if frozen is not None and not frozen.holding():
            break  # the rest goes next run
        fresh, unknown = walk_repository(backend, repo, now, ledger, {}, set())
        again = gc_plan.plan(
            gc_plan.Snapshot({repo: fresh}), retention_for(policy, {repo: unknown}), now
        )
        still = {d for _, d in again.manifests}
        for r, digest in plan.manifests:
            if r != repo or digest not in still or digest in protected:
                continue
            if frozen is not None and not frozen.holding():
                break
            status = backend.delete_manifest(repo, digest)
            if status in (202, 404):
                deleted.append((repo, digest))
            else:
                logger.warning("gc: deleting %s@%s answered %d", repo, digest, status)
    return deleted


def run_credential(s: Settings) -> str:
    """The running stack's backend credential: readable by the registry's user alone (0600),
    which is who may run `gc`."""
    path = s.runtime_dir / backend_credential.FILE_NAME
    try:
        return backend_credential.read(path)
    except backend_credential.CredentialError as e:
        raise GcError(
            f"cannot read the backend credential ({e}): is `tabbify-registry run` running on "
            f"REGISTRY_DATA_DIR={s.data_dir}, and is this its user?"
        ) from None


def zot_report(s: Settings) -> dict[str, Any]:
    policy = None if s.anonymous else read_policy(s.policy_file)
    storage = backend_config.render_zot(s, policy)["storage"]
    keys = ("gc", "gcDelay", "gcInterval", "retention")
    return {
        "backend": "zot",
        "message": "garbage collection and retention are Zot's own, as rendered into its "
        "config (storage.gc, gcDelay, gcInterval, retention); nothing was triggered",
        "settings": {k: storage[k] for k in keys if k in storage},
    }


def write_report(s: Settings, report: dict[str, Any]) -> Path:
    directory = s.data_dir / "gc"
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = directory / f"report-{stamp}{'-dry-run' if report.get('dry_run') else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def summary(report: dict[str, Any]) -> str:
    totals = report.get("totals") or {}
    return (
        f"gc: {'would remove' if report.get('dry_run') else 'removed'} "
        f"{totals.get('manifests', 0)} manifests, {totals.get('tags', 0)} tags, "
        f"{totals.get('blobs', 0)} blobs ({totals.get('bytes', 0)} bytes)"
    )


def add_parser(sub: Any) -> None:
    gc = sub.add_parser("gc", help="garbage collection and retention")
    gc.add_argument("--dry-run", action="store_true", help="print what would go; change nothing")
    gc.add_argument(
        "--every", type=float, default=0, help=argparse.SUPPRESS
    )  # the periodic run (supervisord program `gc`), in seconds
    gc.add_argument("--freeze-wait", type=float, default=FREEZE_WAIT, help=argparse.SUPPRESS)


def main(s: Settings, args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s"
    )
    if s.nodes.ledger_url is not None and s.backend != "zot":
        # Push times and sizes live in the single-node ledger; several nodes would also have
        # to freeze each other's writes. Not built yet (README, known limits).
        print(
            "tabbify-registry gc: not available with a shared ledger (REGISTRY_LEDGER_URL); "
            "with several nodes, run Zot and its own GC",
            file=sys.stderr,
        )
        return 2
    if args.every > 0:
        return periodic(s, args.every, args.freeze_wait)
    try:
        report = run_once(s, args.dry_run, args.freeze_wait)
    except (GcError, LedgerUnavailable, OSError, backend.Unavailable, ValueError) as e:
        print(f"tabbify-registry gc: {e}", file=sys.stderr)
        return 1
    if report.get("backend") != "zot":
        report["report_file"] = str(write_report(s, report))
    print(json.dumps(report, indent=2))
    return 0


def periodic(s: Settings, every: float, freeze_wait: float) -> int:
    """The supervisord program `gc` (REGISTRY_GC_INTERVAL): one run per interval, the first
    one interval after start; a failed run is logged and tried again next time."""
    while True:
        time.sleep(every)
        try:
            report = run_once(s, False, freeze_wait)
            path = write_report(s, report) if report.get("backend") != "zot" else None
            print(json.dumps({"gc": summary(report), "report": str(path)}), file=sys.stderr)
        except Exception as e:  # the next interval tries again
            print(json.dumps({"gc": f"failed: {e}"}), file=sys.stderr)
        sys.stderr.flush()
