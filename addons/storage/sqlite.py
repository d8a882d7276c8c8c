"""Which digests each tenant may see: a durable per-tenant ledger (SQLite).

A tenant may see a digest it uploaded, mounted within its namespace, or pushed in a manifest
(the manifest and what it references). The backend cannot be trusted with this: Zot without
its own access control serves and links any known digest from any repository (dedupe).

A confirmation (201) promises that the record is durable, so the file is watched, not trusted:

- Rollback journal, not WAL: WAL maps its `-shm` index into memory, and a shm file that turns
  read-only or shrinks under SQLite kills the process with SIGBUS. `synchronous=FULL`.
- Before every use the path is checked to still be the file that is open (same device and
  inode: one stat): a deleted or replaced ledger is reopened (a new file if it is gone) and
  refilled from what this process still holds in memory, instead of writing into an unlinked
  inode. It has lost records nonetheless (what other processes knew), so it is not whole.
- Whole: a record `/whole` in `walked`, written once a walk of the whole backend has finished
  (`addons/gateway/isolation.py` rebuilds: one worker, under `rebuild_lock`). A new, emptied,
  truncated or replaced file lacks it (a copy put back from earlier holds an older one, which
  is dropped). While the ledger is not whole a miss is not an answer: the gateway says 503,
  never a 4xx (`whole`).
- Corruption is noticed by SQLite itself when it reads a bad page (SQLITE_CORRUPT,
  SQLITE_NOTADB; a `quick_check` per request would read the whole file): the file is then
  checked once, and a corrupt one moved aside (`<name>.corrupt-<time>`) and started anew.
- Any other SQLite error closes the connection and marks the ledger down (reads and writes
  raise LedgerUnavailable: the gateway answers 503, never a 201 or a false 404); the next use,
  at most once a second, reopens it. A write that fails (a read-only file, a full disk) keeps
  it down until a write succeeds again: the health check writes one small record every few
  seconds, so a read-only ledger is reported even when nobody pushes.

Several gateway processes may share the file (SQLite locking; busy timeout below).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from addons.decisions import quota
from addons.storage.ledger import (
    MAX_UPLOADS,
    UPLOAD_AGE,
    WHOLE,
    LedgerState,
    LedgerUnavailable,
    Reservation,
    holder,
    upload_decision,
)
from addons.storage.recorded import RecordedPairs

logger = logging.getLogger(__name__)

SCHEMA = 1  # PRAGMA user_version
REOPEN_EVERY = 1.0  # seconds between two attempts to reopen a failed ledger
BUSY_TIMEOUT_MS = 5000  # another gateway process holding the write lock


# Errors after which the connection is still sound: the statement failed, nothing else.
_SOUND_CONNECTION = frozenset({"SQLITE_FULL", "SQLITE_READONLY", "SQLITE_BUSY", "SQLITE_LOCKED"})
# Errors that say the file is not (or no longer) a sound database: check it, move it aside.
_CORRUPT = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def _corrupt(e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorname", "").startswith(_CORRUPT)


def _accounting_schema(db: sqlite3.Connection) -> None:
    """Tables added later (additive): the size of each confirmed digest (quotas, GC report),
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


_HELD = "SELECT 1 FROM seen WHERE tenant = ? AND digest = ?"
_SIZE = "INSERT OR REPLACE INTO sizes VALUES (?, ?)"  # content-addressed: one size, ever
_USAGE = (
    "SELECT COALESCE(SUM(s.size), 0) FROM seen JOIN sizes s ON s.digest = seen.digest"
    " WHERE seen.tenant = ?"
)
_EXPIRE = "DELETE FROM uploads WHERE tenant = ? AND at < ?"
_IN_FLIGHT = (
    "SELECT COUNT(*), COALESCE(SUM(stored + pending), 0), COALESCE(SUM(pending), 0)"
    " FROM uploads WHERE tenant = ?"
)


class SqliteLedger(LedgerState):
    """(tenant, digest) pairs, and (/repository, digest) pairs: what a repository holds.
    Positive answers cached in memory (`recorded.RecordedPairs`: the hot path is a HEAD)."""

    accounts = True  # sizes, usage and push times (addons/gateway/accounting.py, gc)

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.monotonic, cache: int = 100_000
    ) -> None:
        self.path = path
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._verified_at = 0.0  # wall time this process last saw its file at the path
        self._suspect = False  # SQLite said the file is corrupt: check it at the next open
        self._replaced_unopened = False  # seen replaced, but reopening it failed: still is
        self.recorded = RecordedPairs(cache)
        # One connection, used from the event loop and from worker threads: serialise.
        self._lock = threading.RLock()
        self._init_state()
        self.recovered = 0  # times the file was found deleted, replaced or corrupt
        with self._lock:
            self._open()

    # --- the connection -------------------------------------------------------------------

    def _prepare(self) -> tuple[sqlite3.Connection, os.stat_result]:
        """Connect to what is at the path (a new file if nothing is) and make the schema."""
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
            if self._suspect:  # once, after SQLite reported corruption: not per request
                self._suspect = False
                verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
                if verdict != "ok":
                    raise sqlite3.DatabaseError(f"quick_check: {verdict}")
            st = os.stat(self.path)
        except BaseException:
            db.close()
            raise
        return db, st

    def _open(self, replaced: bool = False) -> sqlite3.Connection:
        """Open the file at the path. One that is not the file this process had open
        (`replaced`: deleted or replaced, as seen while it was open: once closed, its inode
        number may be reused at once; moved aside as corrupt), or that is not whole, gets back
        every record this process knows, before anything new is confirmed; a mark of
        wholeness older than the moment this process last saw its own file is dropped (a
        copy put back from earlier said it was whole then, not now)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        previous, seen_until = self._identity, self._verified_at
        try:
            before = os.stat(self.path)
        except FileNotFoundError:
            before = None
        lost = ""
        try:
            db, st = self._prepare()
        except sqlite3.DatabaseError as e:
            if before is None or not (_corrupt(e) or str(e).startswith("quick_check")):
                raise
            lost = self._quarantine((before.st_dev, before.st_ino), str(e))
            db, st = self._prepare()
        identity = (st.st_dev, st.st_ino)
        changed = replaced or self._replaced_unopened or identity != (previous or identity)
        try:
            marker = db.execute("SELECT at FROM walked WHERE repository = ?", (WHOLE,)).fetchone()
            if changed or (marker is None and len(self.recorded)):
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    if changed:
                        db.execute(
                            "DELETE FROM walked WHERE repository = ? AND at < ?",
                            (WHOLE, seen_until),
                        )
                    db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", list(self.recorded))
                marker = db.execute(
                    "SELECT at FROM walked WHERE repository = ?", (WHOLE,)
                ).fetchone()
        except BaseException:
            db.close()
            raise
        self._db, self._identity = db, identity
        self._verified_at, self._replaced_unopened = time.time(), False
        if changed or lost:
            self.recovered += 1
        if changed and not lost:
            lost = "the ledger file was deleted or replaced"
        new = "no record of a complete walk of the backend in it (new, emptied or replaced)"
        reason = lost or (self.lost if not self.whole else new)
        self._set_whole(marker is not None, reason, fresh=changed or bool(lost))
        return db

    @contextlib.contextmanager
    def _file_lock(self, suffix: str, wait: bool) -> Iterator[bool]:
        """An flock on `<ledger>.<suffix>` shared by every process on this node: True if
        held (`wait`: until it is), False if another process holds it."""
        try:
            fd = os.open(self.path.with_name(f"{self.path.name}.{suffix}"), os.O_RDWR | os.O_CREAT)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def rebuild_lock(self) -> contextlib.AbstractContextManager[bool]:
        """Held by the one process rebuilding the ledger (False: another one is)."""
        return self._file_lock("rebuild", wait=False)

    def _quarantine(self, identity: tuple[int, int], why: str) -> str:
        """Move a corrupt ledger file aside (kept for the operator), unless another process
        did already: the next open starts a new, empty one, which is not whole. Returns
        why it is not whole."""
        with self._file_lock("lock", wait=True):
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                return f"the ledger file was corrupt ({why})"
            if (st.st_dev, st.st_ino) != identity:
                return f"the ledger file was corrupt ({why})"  # another worker moved it
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            journal = self.path.with_name(self.path.name + "-journal")
            with contextlib.suppress(FileNotFoundError):
                os.replace(journal, aside.with_name(aside.name + "-journal"))
        logger.error("ledger %s is corrupt (%s): moved to %s", self.path, why, aside.name)
        return f"the ledger file was corrupt ({why}) and was started anew"

    def _connection(self, verify: bool) -> sqlite3.Connection:
        """The open connection, checked to still be the file at the path (one stat); reopened
        after a failure (writes: at most once a second) or after the file was deleted or
        replaced under it. Opening does not make the ledger up: a write succeeding does."""
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
        elif not self._same_file():
            self._replaced()
        assert self._db is not None
        return self._db

    def _same_file(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != self._identity:
            return False
        self._verified_at = time.time()
        return True

    def _replaced(self) -> None:
        """The file was deleted or replaced under the open connection (which would go on
        using the old inode): open what is at the path now, or a new file (`_open`)."""
        logger.error("ledger %s was deleted or replaced; reopening it", self.path)
        self._close()
        self._replaced_unopened = True
        try:
            self._open(replaced=True)
        except (sqlite3.Error, OSError) as e:
            self._failed(f"cannot reopen the ledger: {e}")
            raise LedgerUnavailable(self.reason) from None

    def _failed(self, reason: str, keep_open: bool = False) -> None:
        """Down: no confirmation until a write succeeds again. `keep_open` for a statement
        that failed on a sound connection (a full disk, a read-only file, a lock held too
        long): reads go on; otherwise the connection is closed and reopened later."""
        if not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)):
            # chattr +i, a read-only mount, a directory this user may not write: not "busy"
            reason = f"the ledger {self.path} is read-only ({reason})"
        self._down(reason, None if keep_open else REOPEN_EVERY)
        if not keep_open:
            self._close()

    def _close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None

    def _run(self, verify: bool, action: Callable[[sqlite3.Connection], object]) -> object:
        """Run `action` on the connection; `verify` for writes (a success after a failure
        brings the ledger up again)."""
        with self._lock:
            db = self._connection(verify)
            try:
                result = action(db)
            except sqlite3.Error as e:
                name = getattr(e, "sqlite_errorname", "")
                if _corrupt(e):
                    self._suspect = True  # checked once at the reopen, moved aside if so
                # A connection SQLite opened read-only (the file was then) stays read-only:
                # once the file can be written again, it is reopened.
                sound = name in _SOUND_CONNECTION and not (
                    name == "SQLITE_READONLY" and os.access(self.path, os.W_OK)
                )
                self._failed(f"{type(e).__name__}: {e}", keep_open=sound)
                raise LedgerUnavailable(self.reason) from None
            if verify:
                self._up()
            return result

    # --- records ----------------------------------------------------------------------------

    def has(self, tenant: str, digest: str) -> bool:
        key = (tenant, digest)
        if self.recorded.holds(key):
            return True
        self.recorded.misses += 1
        row = self._run(
            False,
            lambda db: db.execute(_HELD, key).fetchone(),
        )
        if row is not None:
            with self._lock:
                self.recorded.remember(key)
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
                    # Pushed through the gateway: listed, and nothing in it for a walk to find
                    # (unless the ledger lost records: its older content is for a walk to find).
                    db.execute("INSERT OR IGNORE INTO repos VALUES (?)", (repository,))
                    db.execute(
                        "INSERT OR IGNORE INTO walked SELECT ?, ? WHERE EXISTS"
                        " (SELECT 1 FROM walked WHERE repository = ?)",
                        (repository, time.time(), WHOLE),
                    )

        with self._lock:
            self._run(True, insert)
            for key in rows:
                self.recorded.remember(key)

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
                uploads, flying, _ = db.execute(_IN_FLIGHT, (tenant,)).fetchone()
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
                self.recorded.remember(key)
        return admitted

    # --- unfinished uploads of tenants under a quota (addons/gateway/accounting.py) ---------------

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
                uploads, flying, pending = db.execute(_IN_FLIGHT, (tenant,)).fetchone()
                used = int(db.execute(_USAGE, (tenant,)).fetchone()[0]) + int(flying)
                decided = upload_decision(
                    tenant, used, int(uploads), not known, adding, limit, max_uploads, upto
                )
                decided = replace(decided, pending=int(pending))
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
            self.recorded.discard_digests(gone)
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
            self.recorded.discard(rows)

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
        """For the health check, without a request (every few seconds): notice a deleted,
        replaced or corrupt file, write one small record (a read-only or full ledger is down
        even while nobody pushes), and read whether it is whole."""
        with contextlib.suppress(LedgerUnavailable):
            self._run(
                True,
                lambda db: db.execute(
                    "INSERT OR REPLACE INTO walked VALUES ('/health', ?)", (time.time(),)
                ),
            )
        with contextlib.suppress(LedgerUnavailable):
            self.refresh_whole()

    def close(self) -> None:
        with self._lock:
            self._close()
