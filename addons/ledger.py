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
from pathlib import Path

from addons import quota
from addons.known import KnownRecords

logger = logging.getLogger(__name__)

SCHEMA = 1  # PRAGMA user_version
REOPEN_EVERY = 1.0  # seconds between two attempts to reopen a failed ledger
BUSY_TIMEOUT_MS = 5000  # another gateway process holding the write lock


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
        # `after` is exclusive, also when it is the prefix itself (a grant naming one
        # repository: `acme/app` is both the prefix and the name the last page ended on).
        op, start = (">", after) if after and after >= prefix else (">=", prefix)
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

    def admit(self, tenant: str, digest: str, size: int, limit: int) -> bool:
        """A confirmed upload under a quota, decided and recorded in one write transaction:
        its size is recorded; then, unless the tenant holds it already, either the tenant's
        usage plus `size` fits `limit` and the tenant holds it from now on (True), or it does
        not fit and nothing is added (False). The transaction takes the write lock first, so
        uploads confirmed at once by several workers are decided one after the other and
        cannot overshoot together."""
        key = (tenant, digest)

        def decide(db: sqlite3.Connection) -> bool:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute(_SIZE, (digest, max(size, 0)))
                if db.execute(_HELD, key).fetchone():
                    return True
                used = db.execute(_USAGE, (tenant,)).fetchone()[0]
                if quota.would_exceed(tenant, {tenant: int(used)}, limit, size):
                    return False
                db.execute("INSERT INTO seen VALUES (?, ?)", key)
                return True

        with self._lock:
            admitted = bool(self._run(True, decide))
            if admitted:
                self.known.remember(key)
        return admitted

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
