"""Which digests each tenant may see: a durable per-tenant ledger (SQLite).

A tenant may see a digest it uploaded, mounted within its namespace, or pushed in a manifest
(the manifest and what it references). The backend cannot be trusted with this: Zot without
its own access control serves and links any known digest from any repository (dedupe).

A confirmation (201) promises that the record is durable, so the file is watched, not trusted:

- Rollback journal, not WAL: WAL maps its `-shm` index into memory, and a shm file that turns
  read-only or shrinks under SQLite kills the process with SIGBUS. `synchronous=FULL`.
- Before every write the path is checked to still be the file that is open (same device and
  inode): a deleted or replaced ledger is reopened (a new file if it is gone) and refilled
  from what this process still holds in memory, instead of writing into an unlinked inode.
- Any SQLite error closes the connection and marks the ledger down (reads and writes raise
  LedgerUnavailable: the gateway answers 503, never a 201 or a false 404); the next use, at
  most once a second, reopens it. When the fault clears, the ledger recovers by itself.

Several gateway processes may share the file (SQLite locking; busy timeout below).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from addons import quota
from addons.known import KnownRecords

logger = logging.getLogger(__name__)

SCHEMA = 1  # PRAGMA user_version
REOPEN_EVERY = 1.0  # seconds between two attempts to reopen a failed ledger
BUSY_TIMEOUT_MS = 5000  # another gateway process holding the write lock
# Unfinished uploads (`uploads` table): a reservation not touched for this long is forgotten,
# as the backend purges the upload itself (Zot's gcDelay, Distribution's uploadpurging age:
# zot/config.py renders both from the same setting, REGISTRY_UPLOAD_MAX_AGE).
UPLOAD_AGE = 3600.0
MAX_UPLOADS = 64  # unfinished uploads one tenant under a quota may hold at once


# Errors after which the connection is still sound: the statement failed, nothing else.
_SOUND_CONNECTION = frozenset({"SQLITE_FULL", "SQLITE_READONLY", "SQLITE_BUSY", "SQLITE_LOCKED"})


class LedgerUnavailable(Exception):
    """The ledger cannot answer or record right now (503, retry)."""


def holder(repository: str) -> str:
    """The `tenant` column value under which a repository's own digests are kept: what that
    repository references, which callers granted pull on it may read. A tenant is one name
    component, so a leading '/' never clashes with one."""
    return "/" + repository


def _accounting_schema(db: sqlite3.Connection) -> None:
    """Tables of phase 3 (additive): the size of each confirmed digest (quotas, GC report),
    and when the gateway saw a manifest or a tag pushed (retention's `keep_last` and
    `untagged_after`). `ref` is a tag, or the manifest's digest for its own push time."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS sizes (digest TEXT PRIMARY KEY, size INTEGER NOT NULL)"
        " WITHOUT ROWID"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS pushes (repository TEXT NOT NULL, ref TEXT NOT NULL,"
        " digest TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (repository, ref)) WITHOUT ROWID"
    )
    # Unfinished uploads of tenants under a quota: per upload session, the bytes the backend
    # said it holds (`stored`) and those being sent now (`pending`), and the last activity.
    db.execute(
        "CREATE TABLE IF NOT EXISTS uploads (tenant TEXT NOT NULL, session TEXT NOT NULL,"
        " stored INTEGER NOT NULL, pending INTEGER NOT NULL, at REAL NOT NULL,"
        " PRIMARY KEY (tenant, session)) WITHOUT ROWID"
    )


@dataclass(frozen=True)
class Reservation:
    """A quota decision (`reserve`, `admit`): true when it fits. `used`: the tenant's bytes
    before this request (its blobs and manifests, plus every unfinished upload's bytes);
    `uploads`: its unfinished uploads; `reason`: "quota" or "uploads" when refused."""

    ok: bool
    used: int
    uploads: int = 0
    reason: str = ""
    granted: int = 0  # bytes reserved by this decision (`upto`: maybe fewer than asked)

    def __bool__(self) -> bool:
        return self.ok


def upload_decision(
    tenant: str,
    used: int,
    uploads: int,
    new_session: bool,
    adding: int,
    limit: int,
    max_uploads: int,
    upto: bool = False,
) -> Reservation:
    """The pure rule `reserve` applies inside its transaction: a new upload session beyond
    `max_uploads` is refused, then bytes that would take the tenant over its quota. `upto`:
    grant what is left of the quota, at most `adding` (refused only when nothing is left)."""
    if new_session and uploads >= max_uploads:
        return Reservation(False, used, uploads, "uploads")
    if upto:
        granted = max(0, min(adding, limit - used))
        return Reservation(granted > 0, used, uploads, "" if granted else "quota", granted)
    if quota.would_exceed(tenant, {tenant: used}, limit, adding):
        return Reservation(False, used, uploads, "quota")
    return Reservation(True, used, uploads, granted=max(adding, 0))


class LedgerState:
    """Up or down: what every ledger (SQLite, S3, PostgreSQL) reports to /healthz, and how it
    goes down and comes back. A ledger calls `_init_state` in its constructor; it has `path`
    (named in logs), `_clock` and a re-entrant `_lock`."""

    path: object
    _clock: Callable[[], float]
    _lock: threading.RLock

    def _init_state(self) -> None:
        self._retry_at = 0.0  # until then, calls that need the store fail at once
        self.state, self.reason, self.since = "ok", "", time.time()
        self.errors = 0

    def _down(self, reason: str, retry_after: float | None) -> None:
        """Down, saying why; for `retry_after` seconds the store is not tried again (None:
        tried at the next call)."""
        with self._lock:
            if self.state != "down":
                logger.error("ledger down: %s", reason)
                self.since = time.time()
            self.state, self.reason = "down", reason
            self.errors += 1
            if retry_after is not None:
                self._retry_at = self._clock() + retry_after

    def _failing_fast(self) -> bool:
        return self.state == "down" and self._clock() < self._retry_at

    def _up(self) -> None:
        with self._lock:
            if self.state != "ok":
                logger.warning("ledger up again (%s)", self.path)
                self.state, self.reason, self.since = "ok", "", time.time()

    def status(self) -> dict[str, object]:
        out: dict[str, object] = {"state": self.state, "since": self.since}
        if self.reason:
            out["reason"] = self.reason
        return out


_HELD = "SELECT 1 FROM seen WHERE tenant = ? AND digest = ?"
_SIZE = "INSERT OR REPLACE INTO sizes VALUES (?, ?)"  # content-addressed: one size, ever
_USAGE = (
    "SELECT COALESCE(SUM(s.size), 0) FROM seen JOIN sizes s ON s.digest = seen.digest"
    " WHERE seen.tenant = ?"
)
_EXPIRE = "DELETE FROM uploads WHERE tenant = ? AND at < ?"
_IN_FLIGHT = "SELECT COUNT(*), COALESCE(SUM(stored + pending), 0) FROM uploads WHERE tenant = ?"


class Ledger(LedgerState):
    """(tenant, digest) pairs, and (/repository, digest) pairs: what a repository holds.
    Positive answers cached in memory (`known.KnownRecords`: the hot path is a HEAD)."""

    accounts = True  # sizes, usage and push times (addons/accounting.py, gc)

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.monotonic, cache: int = 100_000
    ) -> None:
        self.path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self.known = KnownRecords(cache)
        # One connection, used from the event loop and from worker threads: serialise.
        self._lock = threading.RLock()
        self._init_state()
        self.recovered = 0  # times the file was found deleted or replaced
        with self._lock:
            self._open()

    # --- the connection -------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")  # a confirmed push survives a power cut
            db.execute(
                "CREATE TABLE IF NOT EXISTS seen (tenant TEXT NOT NULL, digest TEXT NOT NULL,"
                " PRIMARY KEY (tenant, digest)) WITHOUT ROWID"
            )
            db.execute("CREATE TABLE IF NOT EXISTS walked (repository TEXT PRIMARY KEY, at REAL)")
            # Repositories that hold a manifest (for the catalog), by name.
            db.execute("CREATE TABLE IF NOT EXISTS repos (repository TEXT PRIMARY KEY)")
            _accounting_schema(db)
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA:
                # Version 1 adds repositories' own records (`/<repository>` rows): walk
                # everything again once to fill them in.
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("DELETE FROM walked")
                    db.execute(f"PRAGMA user_version={SCHEMA}")
            st = os.stat(self.path)
        except BaseException:
            db.close()
            raise
        self._db, self._identity = db, (st.st_dev, st.st_ino)
        return db

    def _connection(self, verify: bool) -> sqlite3.Connection:
        """The open connection; reopened after a failure (at most once a second), and, when
        `verify`, after the file was deleted or replaced under it."""
        if self._db is None:
            # Writes wait for the next attempt; reads try at once (a read-only or full
            # file still answers them, and a miss must not become a 503 for a second).
            if verify and self._clock() < self._retry_at:
                raise LedgerUnavailable(self.reason)
            try:
                self._open()
            except (sqlite3.Error, OSError) as e:
                self._failed(f"cannot open the ledger: {e}")
                raise LedgerUnavailable(self.reason) from None
            self._up()
        if verify and not self._same_file():
            self._replaced()
        assert self._db is not None
        return self._db

    def _same_file(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def _replaced(self) -> None:
        """The file was deleted or replaced: open what is at the path now (or create it) and
        put back every record this process still knows, before anything new is confirmed."""
        logger.error("ledger %s was deleted or replaced; reopening it", self.path)
        self.recovered += 1
        self._close()
        try:
            db = self._open()
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", list(self.known))
        except (sqlite3.Error, OSError) as e:
            self._failed(f"cannot reopen the ledger: {e}")
            raise LedgerUnavailable(self.reason) from None
        self._up()

    def _failed(self, reason: str, keep_open: bool = False) -> None:
        """Down: no confirmation until a write succeeds again. `keep_open` for a statement
        that failed on a sound connection (a full disk, a read-only file, a lock held too
        long): reads go on; otherwise the connection is closed and reopened later."""
        self._down(reason, None if keep_open else REOPEN_EVERY)
        if not keep_open:
            self._close()

    def _close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None

    def _run(self, verify: bool, action: Callable[[sqlite3.Connection], object]) -> object:
        """Run `action` on the connection; `verify` for writes (the file is checked first,
        and a success after a failure brings the ledger up again)."""
        with self._lock:
            db = self._connection(verify)
            try:
                result = action(db)
            except sqlite3.Error as e:
                name = getattr(e, "sqlite_errorname", "")
                self._failed(f"{type(e).__name__}: {e}", keep_open=name in _SOUND_CONNECTION)
                raise LedgerUnavailable(self.reason) from None
            if verify:
                self._up()
            return result

    # --- records ----------------------------------------------------------------------------

    def has(self, tenant: str, digest: str) -> bool:
        key = (tenant, digest)
        if self.known.known(key):
            return True
        self.known.misses += 1
        row = self._run(
            False,
            lambda db: db.execute(_HELD, key).fetchone(),
        )
        if row is not None:
            with self._lock:
                self.known.remember(key)
        return row is not None

    def add(
        self,
        tenant: str,
        digests: Iterable[str],
        repository: str | None = None,
        listed: bool = False,
    ) -> None:
        """Record durably, all of them or none (one transaction); raises LedgerUnavailable.
        `repository`: where they were pushed (recorded for it too); `listed`: it now holds a
        manifest (the catalog lists it)."""
        unique = list(dict.fromkeys(digests))
        rows = [(tenant, d) for d in unique]
        if repository is not None:
            rows += [(holder(repository), d) for d in unique]
        listed = listed and repository is not None
        if not rows and not listed:
            return

        def insert(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", rows)
                if listed:
                    # Pushed through the gateway: listed, and nothing in it for a walk to find.
                    db.execute("INSERT OR IGNORE INTO repos VALUES (?)", (repository,))
                    db.execute(
                        "INSERT OR IGNORE INTO walked VALUES (?, ?)", (repository, time.time())
                    )

        with self._lock:
            self._run(True, insert)
            for key in rows:
                self.known.remember(key)

    def count(self, tenant: str | None = None) -> int:
        if tenant is None:
            sql, args = "SELECT COUNT(*) FROM seen WHERE tenant NOT LIKE '/%'", ()
        else:
            sql, args = "SELECT COUNT(*) FROM seen WHERE tenant = ?", (tenant,)
        return int(self._run(False, lambda db: db.execute(sql, args).fetchone()[0]))  # type: ignore[arg-type]

    def repositories(self, prefix: str, after: str, limit: int) -> list[str]:
        """Up to `limit` repository names starting with `prefix` and sorting after `after`,
        in order: one index range scan, whatever else the registry holds. (Names are ASCII
        below DEL, so every name with the prefix sorts before `prefix + DEL`.)"""
        op, start = (">", after) if after > prefix else (">=", prefix)
        sql = (
            f"SELECT repository FROM repos WHERE repository {op} ? AND repository < ?"
            " ORDER BY repository LIMIT ?"
        )
        rows = self._run(
            False, lambda db: db.execute(sql, (start, prefix + "\x7f", limit)).fetchall()
        )
        return [r[0] for r in rows]  # type: ignore[union-attr]

    # --- sizes, push times, forgetting (quotas, retention, GC) ------------------------------

    def record_sizes(self, sizes: dict[str, int]) -> None:
        """The size of each digest (content-addressed: one size per digest, ever)."""
        rows = [(d, int(n)) for d, n in sizes.items() if n >= 0]
        if rows:
            self._run(
                True,
                lambda db: db.executemany(_SIZE, rows),
            )

    def sizes(self, digests: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(digests))
        out: dict[str, int] = {}
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT digest, size FROM sizes WHERE digest IN ({marks})"
            rows = self._run(
                False, lambda db, sql=sql, chunk=chunk: db.execute(sql, chunk).fetchall()
            )
            out.update({d: int(n) for d, n in rows})  # type: ignore[union-attr]
        return out

    def admit(
        self,
        tenant: str,
        digest: str,
        size: int,
        limit: int,
        session: str | None = None,
        *,
        now: float | None = None,
        age: float = UPLOAD_AGE,
    ) -> Reservation:
        """A confirmed upload under a quota, decided and recorded in one write transaction:
        its size is recorded and its upload `session` forgotten (its bytes become the blob's);
        then, unless the tenant holds it already, either the tenant's usage plus its other
        unfinished uploads plus `size` fits `limit` and the tenant holds it from now on, or
        it does not fit and nothing is added. The transaction takes the write lock first, so
        uploads confirmed at once by several workers are decided one after the other and
        cannot overshoot together."""
        key = (tenant, digest)
        when = time.time() if now is None else now

        def decide(db: sqlite3.Connection) -> Reservation:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(_SIZE, (digest, max(size, 0)))
                if session is not None:
                    db.execute("DELETE FROM uploads WHERE tenant = ? AND session = ?",
                               (tenant, session))  # fmt: skip
                db.execute(_EXPIRE, (tenant, when - age))
                uploads, flying = db.execute(_IN_FLIGHT, (tenant,)).fetchone()
                used = int(db.execute(_USAGE, (tenant,)).fetchone()[0]) + int(flying)
                if db.execute(_HELD, key).fetchone():
                    return Reservation(True, used, int(uploads))
                if quota.would_exceed(tenant, {tenant: used}, limit, size):
                    return Reservation(False, used, int(uploads), "quota")
                db.execute("INSERT INTO seen VALUES (?, ?)", key)
                return Reservation(True, used, int(uploads))

        with self._lock:
            admitted = self._run(True, decide)
            assert isinstance(admitted, Reservation)
            if admitted:
                self.known.remember(key)
        return admitted

    # --- unfinished uploads of tenants under a quota (addons/accounting.py) -------------------

    def reserve(
        self,
        tenant: str,
        session: str,
        adding: int,
        limit: int,
        *,
        force: bool = False,
        upto: bool = False,
        now: float | None = None,
        age: float = UPLOAD_AGE,
        max_uploads: int = MAX_UPLOADS,
    ) -> Reservation:
        """Bytes about to be sent into an upload session, decided and reserved in one write
        transaction (so across workers): the tenant's usage plus every unfinished upload's
        bytes plus `adding` must fit `limit`, and a session not known yet must fit
        `max_uploads`. Reserved: the session's `pending` grows by `adding` until `settle`.
        `force`: record the bytes whatever the quota decision says (a streamed body's bytes
        already sent; a re-push, never refused) but never a session beyond `max_uploads`;
        `upto`: reserve what is left of the quota, at most `adding` (`granted` says how much).
        Sessions untouched for `age` seconds are forgotten first (the backend purges them)."""
        when = time.time() if now is None else now

        def decide(db: sqlite3.Connection) -> Reservation:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(_EXPIRE, (tenant, when - age))
                known = db.execute(
                    "SELECT 1 FROM uploads WHERE tenant = ? AND session = ?", (tenant, session)
                ).fetchone()
                uploads, flying = db.execute(_IN_FLIGHT, (tenant,)).fetchone()
                used = int(db.execute(_USAGE, (tenant,)).fetchone()[0]) + int(flying)
                decided = upload_decision(
                    tenant, used, int(uploads), not known, adding, limit, max_uploads, upto
                )
                if force and decided.reason != "uploads":
                    decided = replace(decided, granted=max(adding, 0))
                if decided.granted or decided:
                    db.execute(
                        "INSERT INTO uploads VALUES (?, ?, 0, ?, ?) ON CONFLICT (tenant, session)"
                        " DO UPDATE SET pending = pending + excluded.pending, at = excluded.at",
                        (tenant, session, decided.granted, when),
                    )
                return decided

        result = self._run(True, decide)
        assert isinstance(result, Reservation)
        return result

    def settle(
        self,
        tenant: str,
        session: str,
        released: int,
        stored: int | None = None,
        grown: int = 0,
        *,
        now: float | None = None,
    ) -> None:
        """A request into an upload session ended: `released` pending bytes are no longer in
        flight; the session now holds `stored` bytes (what the backend answered), or `grown`
        more than before when the backend did not say. A forgotten session stays forgotten."""
        when = time.time() if now is None else now
        self._run(
            True,
            lambda db: db.execute(
                "UPDATE uploads SET pending = MAX(pending - ?, 0),"
                " stored = COALESCE(?, stored + ?), at = ? WHERE tenant = ? AND session = ?",
                (max(released, 0), stored, max(grown, 0), when, tenant, session),
            ),
        )

    def rename_upload(self, tenant: str, placeholder: str, session: str) -> None:
        """An upload start (POST) reserved under `placeholder` got its session id."""

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "DELETE FROM uploads WHERE tenant = ? AND session = ?", (tenant, session)
                )
                db.execute(
                    "UPDATE uploads SET session = ? WHERE tenant = ? AND session = ?",
                    (session, tenant, placeholder),
                )

        self._run(True, write)

    def drop_upload(self, tenant: str, session: str) -> None:
        """The upload was cancelled, or the backend does not know it (any more)."""
        self._run(
            True,
            lambda db: db.execute(
                "DELETE FROM uploads WHERE tenant = ? AND session = ?", (tenant, session)
            ),
        )

    def uploads(self, tenant: str) -> dict[str, tuple[int, int]]:
        """The tenant's unfinished uploads: session → (stored, pending)."""
        sql = "SELECT session, stored, pending FROM uploads WHERE tenant = ?"
        rows = self._run(False, lambda db: db.execute(sql, (tenant,)).fetchall())
        return {s: (int(a), int(b)) for s, a, b in rows}  # type: ignore[union-attr]

    def uploading_all(self) -> dict[str, int]:
        """Bytes in unfinished uploads, per tenant that has any (for /metrics)."""
        sql = "SELECT tenant, SUM(stored + pending) FROM uploads GROUP BY tenant"
        rows = self._run(False, lambda db: db.execute(sql).fetchall())
        return {t: int(n) for t, n in rows}  # type: ignore[union-attr]

    def expire_uploads(self, now: float | None = None, age: float = UPLOAD_AGE) -> int:
        """Forget every upload session untouched for `age` seconds (every tenant's)."""
        cutoff = (time.time() if now is None else now) - age
        return int(
            self._run(  # type: ignore[call-overload]
                True, lambda db: db.execute("DELETE FROM uploads WHERE at < ?", (cutoff,)).rowcount
            )
        )

    def usage(self, tenant: str) -> int:
        """Bytes of the distinct digests the tenant holds whose size is known (quota.py's
        rule: a blob shared with another tenant counts in full for each)."""
        return int(self._run(False, lambda db: db.execute(_USAGE, (tenant,)).fetchone()[0]))  # type: ignore[index]

    def usage_all(self) -> dict[str, int]:
        """Usage of every tenant (not of repositories' own `/…` records)."""
        sql = (
            "SELECT seen.tenant, SUM(s.size) FROM seen JOIN sizes s ON s.digest = seen.digest"
            " WHERE seen.tenant NOT LIKE '/%' GROUP BY seen.tenant"
        )
        rows = self._run(False, lambda db: db.execute(sql).fetchall())
        return {t: int(n) for t, n in rows}  # type: ignore[union-attr]

    def record_push(
        self, repository: str, digest: str, tag: str | None = None, at: float | None = None
    ) -> None:
        """A manifest pushed through the gateway (and the tag it was pushed to): when."""
        when = time.time() if at is None else at
        rows = [(repository, digest, digest, when)]
        if tag is not None:
            rows.append((repository, tag, digest, when))

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                # A manifest's first push counts (a re-push does not make it young again).
                db.execute("INSERT OR IGNORE INTO pushes VALUES (?, ?, ?, ?)", rows[0])
                db.executemany("INSERT OR REPLACE INTO pushes VALUES (?, ?, ?, ?)", rows[1:])

        self._run(True, write)

    def pushes(self, repository: str) -> dict[str, tuple[str, float]]:
        """ref (a tag, or a manifest digest) → (digest, when it was pushed)."""
        rows = self._run(
            False,
            lambda db: db.execute(
                "SELECT ref, digest, at FROM pushes WHERE repository = ?", (repository,)
            ).fetchall(),
        )
        return {r: (d, float(at)) for r, d, at in rows}  # type: ignore[union-attr]

    def holdings(self, holder_name: str) -> list[str]:
        """Every digest recorded under one tenant or `holder(repository)`."""
        rows = self._run(
            False,
            lambda db: db.execute(
                "SELECT digest FROM seen WHERE tenant = ?", (holder_name,)
            ).fetchall(),
        )
        return [r[0] for r in rows]  # type: ignore[union-attr]

    def forget(self, digests: Iterable[str]) -> int:
        """Garbage collection removed this content from storage: nobody holds it any more.
        Returns the number of (holder, digest) records dropped. Other worker processes keep
        positive answers in their caches until they evict them; the backend then answers
        for what is gone (404, MANIFEST_BLOB_UNKNOWN)."""
        gone = list(dict.fromkeys(digests))

        def delete(db: sqlite3.Connection) -> int:
            dropped = 0
            with db:
                db.execute("BEGIN IMMEDIATE")
                for i in range(0, len(gone), 500):
                    chunk = gone[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    dropped += db.execute(
                        f"DELETE FROM seen WHERE digest IN ({marks})", chunk
                    ).rowcount
                    db.execute(f"DELETE FROM sizes WHERE digest IN ({marks})", chunk)
                    db.execute(f"DELETE FROM pushes WHERE digest IN ({marks})", chunk)
            return dropped

        with self._lock:
            dropped = int(self._run(True, delete))  # type: ignore[call-overload]
            self.known.discard_digests(gone)
        return dropped

    def forget_manifests(self, repository: str, digests: Iterable[str]) -> None:
        """Manifests deleted from one repository (their content may live on elsewhere)."""
        rows = [(holder(repository), d) for d in dict.fromkeys(digests)]

        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany("DELETE FROM seen WHERE tenant = ? AND digest = ?", rows)
                db.executemany(
                    "DELETE FROM pushes WHERE repository = ? AND digest = ?",
                    [(repository, d) for _, d in rows],
                )

        with self._lock:
            self._run(True, delete)
            self.known.discard(rows)

    # --- the start-up walk's progress (backfill.py) -------------------------------------------

    def walked(self, repository: str) -> bool:
        return bool(
            self._run(
                False,
                lambda db: db.execute(
                    "SELECT 1 FROM walked WHERE repository = ?", (repository,)
                ).fetchone(),
            )
        )

    def mark_walked(self, repository: str) -> None:
        self._run(
            True,
            lambda db: db.execute(
                "INSERT OR REPLACE INTO walked VALUES (?, ?)", (repository, time.time())
            ),
        )

    # --- health -------------------------------------------------------------------------------

    def check(self) -> None:
        """For the health check, without a request: notice a deleted or replaced file, and
        try to reopen a failed ledger."""
        if self.state == "ok":
            probe = "SELECT 1"
        else:  # up again only once a write succeeds: a read works on a read-only file too
            probe = "INSERT OR REPLACE INTO walked VALUES ('/health', 0)"
        with contextlib.suppress(LedgerUnavailable):
            self._run(True, lambda db: db.execute(probe).fetchone())

    def close(self) -> None:
        with self._lock:
            self._close()
