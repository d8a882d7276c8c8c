"""The isolation ledger in PostgreSQL, shared by several registry nodes (contract §9), for
operators who run a database rather than give the nodes a ledger prefix in the bucket.

Same interface as the SQLite and S3 ledgers (ledger.py: `AnyLedger`; isolation, listing and
the start-up walk use any of them), tables that the first node to connect creates:

    registry_ledger_seen    (holder, digest)   the tenant (or "/<repository>") may see it
    registry_ledger_repos   (repository)       holds a manifest: the catalog lists it
    registry_ledger_walked  (repository, at)   the start-up walk has seen it
    registry_ledger_sizes   (digest, size)     for quotas (addons/gateway/accounting.py)
    registry_ledger_pushes  (repository, ref, digest, at)   when a manifest or tag was pushed
    registry_ledger_uploads (holder, session, stored, pending, at)   unfinished uploads of
                                               tenants under a quota (their bytes count)

Unlike the S3 ledger it keeps accounts as the SQLite one does (`accounts`): sizes, usage and
push times, so `[[quota]]` holds across nodes. A confirmed upload under a quota is decided
and recorded in one transaction holding a per-tenant advisory lock (`admit`): uploads of one
tenant confirmed at once on any nodes are counted one after the other.

Names are compared in byte order (COLLATE "C"), as the other ledgers page the catalog.
Records are only ever inserted here (ON CONFLICT DO NOTHING: idempotent, no lost update
between nodes); a positive answer is cached in memory (`recorded.RecordedPairs`), a miss asks the
database, so no node holds a stale "no". Cost: a hit is a dict lookup; a miss is one SELECT;
a confirmation one transaction.

Bounded: connecting waits at most CONNECT_TIMEOUT seconds, every statement
STATEMENT_TIMEOUT_MS, and a server that stops answering is dropped after ~5 s of TCP
keepalives; any database error marks the ledger down (LedgerUnavailable: 503, never a
201 or a false 404), the connection is dropped, and for FAIL_FAST seconds calls fail at once;
then the next call connects again, and a success brings the ledger up.

A lost connection (the server restarted, a fail-over, an idle-connection reaper,
pg_terminate_backend) is not an outage: before each call a connection the server has closed
while idle is replaced (nothing was sent on it), and a call whose connection is lost under it
runs once more on a fresh one when running it twice is harmless (`_run`'s `retry`: reads, and
writes that leave the same rows when done twice) or when the loss came before its COMMIT went
out (`_transaction`). A write whose commit may have happened unseen (its acknowledgement lost)
and that would count twice is never retried: 503, as before. Only a failure that remains is
an error (`errors`, down); a loss is logged and counted in `reconnects`.

Credentials: never in the URL this gets (it is on the gateway's command line): `run` moves a
password given in REGISTRY_LEDGER_URL into PGPASSWORD; libpq reads that, or PGPASSFILE, or
certificates (sslcert/sslkey in the URL's query).
Blocking (psycopg): callers on the event loop run these methods in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

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

CONNECT_TIMEOUT = 2  # seconds (libpq's connect_timeout: whole seconds, at least 2)
STATEMENT_TIMEOUT_MS = 5000
FAIL_FAST = 1.0  # seconds after a failure during which calls fail at once
SCHEMA_LOCK = 0x7462665F6C656467  # pg_advisory_xact_lock key: nodes create the tables in turn
REBUILD_LOCK = SCHEMA_LOCK + 1  # pg_advisory_lock key: one node rebuilds a lost ledger

SCHEMA = (
    'CREATE TABLE IF NOT EXISTS registry_ledger_seen (holder text COLLATE "C" NOT NULL,'
    ' digest text COLLATE "C" NOT NULL, PRIMARY KEY (holder, digest))',
    'CREATE TABLE IF NOT EXISTS registry_ledger_repos (repository text COLLATE "C" PRIMARY KEY)',
    'CREATE TABLE IF NOT EXISTS registry_ledger_walked (repository text COLLATE "C" PRIMARY KEY,'
    " at double precision NOT NULL)",
    'CREATE TABLE IF NOT EXISTS registry_ledger_sizes (digest text COLLATE "C" PRIMARY KEY,'
    " size bigint NOT NULL)",
    'CREATE TABLE IF NOT EXISTS registry_ledger_pushes (repository text COLLATE "C" NOT NULL,'
    ' ref text COLLATE "C" NOT NULL, digest text NOT NULL, at double precision NOT NULL,'
    " PRIMARY KEY (repository, ref))",
    'CREATE TABLE IF NOT EXISTS registry_ledger_uploads (holder text COLLATE "C" NOT NULL,'
    ' session text COLLATE "C" NOT NULL, stored bigint NOT NULL, pending bigint NOT NULL,'
    " at double precision NOT NULL, PRIMARY KEY (holder, session))",
)
HELD = "SELECT 1 FROM registry_ledger_seen WHERE holder = %s AND digest = %s"
SIZE = (  # content-addressed: one size per digest, ever
    "INSERT INTO registry_ledger_sizes VALUES (%s, %s)"
    " ON CONFLICT (digest) DO UPDATE SET size = excluded.size"
)
USAGE = (
    "SELECT COALESCE(sum(s.size), 0) FROM registry_ledger_seen h"
    " JOIN registry_ledger_sizes s ON s.digest = h.digest WHERE h.holder = %s"
)
TENANT_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
EXPIRE = "DELETE FROM registry_ledger_uploads WHERE holder = %s AND at < %s"
IN_FLIGHT = (
    "SELECT count(*), COALESCE(sum(stored + pending), 0), COALESCE(sum(pending), 0)"
    " FROM registry_ledger_uploads WHERE holder = %s"
)
DROP_UPLOAD = "DELETE FROM registry_ledger_uploads WHERE holder = %s AND session = %s"


def _idle_alive(conn: Any) -> bool:
    """False when the server has closed an idle connection. Nothing is expected on an idle
    connection (every answer was read to its end, and nothing is LISTENed for), so bytes
    waiting on it are the server's goodbye (a FATAL error, then the end of the stream): the
    connection is replaced even if that end has not arrived yet. A poll, not a read."""
    try:
        poller = select.poll()  # not select(): a gateway may hold more than 1024 descriptors
        poller.register(conn.fileno(), select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError, psycopg.Error):
        return False


def redacted(url: str) -> str:
    """The URL as operators see it in logs and status: no password, no query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{parts.username}@" if parts.username else "") + host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class PgLedger(LedgerState):
    """(holder, digest) pairs in PostgreSQL; positive answers cached in memory."""

    accounts = True  # sizes, usage and push times: quotas work (addons/gateway/accounting.py)

    def __init__(
        self,
        url: str,
        connect: Callable[..., Any] = psycopg.connect,
        clock: Callable[[], float] = time.monotonic,
        cache: int = 100_000,
    ) -> None:
        self.url = url
        self.path = redacted(url)  # what operators see (no credentials in it)
        self._connect = connect
        self._clock = clock
        self._conn: Any = None
        self._lock = threading.RLock()  # one connection, used from worker threads: serialise
        self.recorded = RecordedPairs(cache)
        self._init_state()
        self.recovered = 0  # nothing to recreate: the database is the record
        self.reconnects = 0  # connections found lost (a failed reconnect is also an error)
        self._uncommitted = False  # the running action's transaction has not sent COMMIT
        self.check()  # a database that cannot be reached at start: down, retried, not fatal

    # --- one connection, every failure a LedgerUnavailable ------------------------------------

    def _connection(self) -> Any:
        if self._conn is not None and not self._conn.closed and not _idle_alive(self._conn):
            # Closed by the server while idle (a restart, pg_terminate_backend, a reaper):
            # replaced before anything is sent on it, so even a write that must not run twice
            # gets a connection that works.
            logger.warning("ledger connection closed by the server while idle: reconnecting")
            self.reconnects += 1
            self.close()
        if self._conn is None or self._conn.closed:
            conn = self._connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                application_name="tabbify-registry",
                # A server gone silent (a partition, not a refusal) is noticed in seconds,
                # not after the kernel's TCP timeouts: keepalives while waiting for an
                # answer, and a bound on unacknowledged data while sending.
                keepalives=1,
                keepalives_idle=2,
                keepalives_interval=1,
                keepalives_count=3,
                tcp_user_timeout=STATEMENT_TIMEOUT_MS,
            )
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    for statement in SCHEMA:
                        conn.execute(statement)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _run(self, what: str, action: Callable[[Any], Any], retry: bool = False) -> Any:
        """`action` on the connection; every failure a LedgerUnavailable. A connection lost
        under it (not an error about what it asked: a constraint, a timeout, bad data) is
        replaced and the action run once more when that is safe: `retry` (a read, or a write
        that leaves the same rows when done twice), or the loss came inside `_transaction`
        before its COMMIT was sent (nothing was committed). A second loss, or a database that
        cannot be reached, is down: bounded by CONNECT_TIMEOUT and STATEMENT_TIMEOUT_MS."""
        with self._lock:
            if self._failing_fast():
                raise LedgerUnavailable(self.reason)
            for attempt in (1, 2):
                conn = None
                self._uncommitted = False  # in doubt unless `_transaction` says otherwise
                try:
                    conn = self._connection()
                    result = action(conn)
                except psycopg.Error as e:
                    reason = f"{what}: {type(e).__name__}: {str(e).strip()}"
                    lost = conn is not None and conn.broken  # not a failure to connect
                    if attempt == 1 and lost and (retry or self._uncommitted):
                        logger.warning("ledger connection lost (%s): retrying once", reason)
                        self.reconnects += 1
                        self.close()
                        continue
                    self._failed(reason)
                    raise LedgerUnavailable(self.reason) from None
                self._up()
                return result
            raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def _transaction(self, db: Any) -> Iterator[None]:
        """A transaction whose loss before COMMIT is known to have committed nothing (the
        server rolls back a transaction whose connection is gone): `_run` may retry it."""
        self._uncommitted = True
        with db.transaction():
            yield
            self._uncommitted = False  # COMMIT goes out next: its outcome may go unseen

    def _failed(self, reason: str) -> None:
        self.close()  # the next try connects again
        self._down(reason, FAIL_FAST)

    # --- records ------------------------------------------------------------------------------

    def has(self, tenant: str, digest: str) -> bool:
        key = (tenant, digest)
        if self.recorded.holds(key):
            return True
        self.recorded.misses += 1
        row = self._run("SELECT", lambda db: db.execute(HELD, key).fetchone(), retry=True)
        if row is not None:
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
        holders = [tenant] if repository is None else [tenant, holder(repository)]
        pairs = [(h, d) for h in holders for d in unique if not self.recorded.holds((h, d))]
        new_repo = listed and repository is not None and repository not in self._repos_known
        if not pairs and not new_repo:
            return

        def insert(db: Any) -> None:
            with db.transaction(), db.cursor() as cur:
                if pairs:
                    cur.executemany(
                        "INSERT INTO registry_ledger_seen VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        pairs,
                    )
                if new_repo:
                    # Pushed through the gateway: listed, and nothing in it for a walk to find.
                    cur.execute(
                        "INSERT INTO registry_ledger_repos VALUES (%s) ON CONFLICT DO NOTHING",
                        (repository,),
                    )
                    cur.execute(  # unless the ledger lost records (then: for a walk to find)
                        "INSERT INTO registry_ledger_walked SELECT %s, %s WHERE EXISTS"
                        " (SELECT 1 FROM registry_ledger_walked WHERE repository = %s)"
                        " ON CONFLICT DO NOTHING",
                        (repository, time.time(), WHOLE),
                    )

        with self._lock:
            # Retry: inserts that do nothing when the rows are there (a commit whose
            # acknowledgement was lost, done again, changes nothing).
            self._run("INSERT", insert, retry=True)
            for pair in pairs:
                self.recorded.remember(pair)
            if new_repo and repository is not None and self.whole:
                self._repos_known.add(repository)

    def count(self, tenant: str | None = None) -> int:
        sql = "SELECT count(*) FROM registry_ledger_seen WHERE "
        if tenant is None:  # tenants' records, not repositories' (`ledger.holder`)
            sql, args = sql + "holder NOT LIKE %s", ("/%",)
        else:
            sql, args = sql + "holder = %s", (tenant,)
        return int(self._run("SELECT", lambda db: db.execute(sql, args).fetchone()[0], retry=True))

    def repositories(self, prefix: str, after: str, limit: int) -> list[str]:
        """Up to `limit` names starting with `prefix` and sorting after `after`, in byte order:
        one index range scan."""
        if limit <= 0:
            return []
        sql = (
            "SELECT repository FROM registry_ledger_repos WHERE starts_with(repository, %s)"
            " AND repository > %s ORDER BY repository LIMIT %s"
        )
        rows = self._run(
            "SELECT", lambda db: db.execute(sql, (prefix, after, limit)).fetchall(), retry=True
        )
        return [r[0] for r in rows]

    # --- accounts: sizes, usage, push times (addons/gateway/accounting.py) ------------------------

    def record_sizes(self, sizes: dict[str, int]) -> None:
        """The size of each digest (content-addressed: one size per digest, ever)."""
        rows = [(d, int(n)) for d, n in sizes.items() if n >= 0]
        if not rows:
            return

        def write(db: Any) -> None:
            with db.transaction(), db.cursor() as cur:
                cur.executemany(SIZE, rows)

        self._run("INSERT", write, retry=True)  # one size per digest: the same values again

    def usage(self, tenant: str) -> int:
        """Bytes of the distinct digests the tenant holds whose size is known."""
        return int(
            self._run("SELECT", lambda db: db.execute(USAGE, (tenant,)).fetchone()[0], retry=True)
        )

    def usage_all(self) -> dict[str, int]:
        """Usage of every tenant (not of repositories' own `/…` records)."""
        sql = (
            "SELECT h.holder, sum(s.size) FROM registry_ledger_seen h JOIN registry_ledger_sizes"
            " s ON s.digest = h.digest WHERE h.holder NOT LIKE %s GROUP BY h.holder"
        )
        rows = self._run("SELECT", lambda db: db.execute(sql, ("/%",)).fetchall(), retry=True)
        return {t: int(n) for t, n in rows}

    def _used(self, db: Any, tenant: str, now: float, age: float) -> tuple[int, int, int]:
        """(unfinished uploads, bytes used: blobs and manifests plus those uploads, bytes
        reserved by requests not settled yet), after forgetting the tenant's uploads untouched
        for `age` seconds. Inside a transaction holding the tenant's lock."""
        db.execute(EXPIRE, (tenant, now - age))
        uploads, flying, pending = db.execute(IN_FLIGHT, (tenant,)).fetchone()
        used = int(db.execute(USAGE, (tenant,)).fetchone()[0]) + int(flying)
        return int(uploads), used, int(pending)

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
        """As `Ledger.admit`: the size recorded and the upload `session` forgotten; then,
        unless the tenant holds the digest already, it fits `limit` with the tenant's other
        unfinished uploads and the tenant holds it from now on, or nothing is added. One
        transaction under the tenant's advisory lock: every node's confirmations and
        reservations for one tenant are decided one after the other."""
        key = (tenant, digest)
        when = time.time() if now is None else now

        def decide(db: Any) -> Reservation:
            with db.transaction():
                db.execute(TENANT_LOCK, (tenant,))
                db.execute(SIZE, (digest, max(size, 0)))
                if session is not None:
                    db.execute(DROP_UPLOAD, (tenant, session))
                uploads, used, _ = self._used(db, tenant, when, age)
                if db.execute(HELD, key).fetchone():
                    return Reservation(True, used, uploads)
                if quota.would_exceed(tenant, {tenant: used}, limit, size):
                    return Reservation(False, used, uploads, "quota")
                db.execute(
                    "INSERT INTO registry_ledger_seen VALUES (%s, %s) ON CONFLICT DO NOTHING", key
                )
                return Reservation(True, used, uploads)

        with self._lock:
            # Retry: done twice it leaves the same rows (the size upserted to the same value,
            # the session and expired uploads deleted, the pair inserted unless held), and a
            # second run after a commit that went unseen finds the digest held: admitted,
            # counted once (usage sums distinct digests).
            admitted: Reservation = self._run("INSERT", decide, retry=True)
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
        """As `Ledger.reserve`, under the tenant's advisory lock (every node's reservations
        and confirmations for one tenant one after the other)."""
        when = time.time() if now is None else now

        def decide(db: Any) -> Reservation:
            with self._transaction(db):
                db.execute(TENANT_LOCK, (tenant,))
                uploads, used, pending = self._used(db, tenant, when, age)
                known = db.execute(
                    "SELECT 1 FROM registry_ledger_uploads WHERE holder = %s AND session = %s",
                    (tenant, session),
                ).fetchone()
                decided = upload_decision(
                    tenant, used, uploads, known is None, adding, limit, max_uploads, upto
                )
                decided = replace(decided, pending=pending)
                if force and decided.reason != "uploads":
                    decided = replace(decided, granted=max(adding, 0))
                if decided.granted or decided:
                    db.execute(
                        "INSERT INTO registry_ledger_uploads AS u VALUES (%s, %s, 0, %s, %s)"
                        " ON CONFLICT (holder, session) DO UPDATE"
                        " SET pending = u.pending + excluded.pending, at = excluded.at",
                        (tenant, session, decided.granted, when),
                    )
                return decided

        # Not retried once COMMIT is out: `pending` grows by what is granted, and a commit
        # that went unseen, done again, would reserve the bytes twice (`_transaction`).
        result: Reservation = self._run("INSERT", decide)
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
        """As `Ledger.settle`."""
        when = time.time() if now is None else now
        sql = (
            "UPDATE registry_ledger_uploads SET pending = greatest(pending - %s, 0),"
            " stored = COALESCE(%s, stored + %s), at = %s WHERE holder = %s AND session = %s"
        )
        args = (max(released, 0), stored, max(grown, 0), when, tenant, session)
        # Never retried once sent: one statement commits as it ends, and done twice after an
        # unseen commit it would release (or grow) the bytes twice. A connection closed while
        # idle is replaced before it is sent (`_connection`).
        self._run("UPDATE", lambda db: db.execute(sql, args))

    def rename_upload(self, tenant: str, placeholder: str, session: str) -> None:
        """An upload start (POST) reserved under `placeholder` got its session id."""

        def write(db: Any) -> None:
            with self._transaction(db):
                db.execute(DROP_UPLOAD, (tenant, session))
                db.execute(
                    "UPDATE registry_ledger_uploads SET session = %s"
                    " WHERE holder = %s AND session = %s",
                    (session, tenant, placeholder),
                )

        # Retried only before COMMIT: done again after an unseen commit, the first DELETE
        # would drop the renamed reservation itself.
        self._run("UPDATE", write)

    def drop_upload(self, tenant: str, session: str) -> None:
        # Retry: deleting one session's row twice deletes it once (session ids are not reused).
        self._run("DELETE", lambda db: db.execute(DROP_UPLOAD, (tenant, session)), retry=True)

    def uploads(self, tenant: str) -> dict[str, tuple[int, int]]:
        """The tenant's unfinished uploads: session → (stored, pending)."""
        sql = "SELECT session, stored, pending FROM registry_ledger_uploads WHERE holder = %s"
        rows = self._run("SELECT", lambda db: db.execute(sql, (tenant,)).fetchall(), retry=True)
        return {s: (int(a), int(b)) for s, a, b in rows}

    def uploading_all(self) -> dict[str, int]:
        """Bytes in unfinished uploads, per tenant that has any (for /metrics)."""
        sql = "SELECT holder, sum(stored + pending) FROM registry_ledger_uploads GROUP BY holder"
        rows = self._run("SELECT", lambda db: db.execute(sql).fetchall(), retry=True)
        return {t: int(n) for t, n in rows}

    def expire_uploads(self, now: float | None = None, age: float = UPLOAD_AGE) -> int:
        """Forget every upload session untouched for `age` seconds (every tenant's)."""
        cutoff = (time.time() if now is None else now) - age
        sql = "DELETE FROM registry_ledger_uploads WHERE at < %s"
        # Retry: the same cutoff deletes nothing more (a count after an unseen commit: 0).
        return int(self._run("DELETE", lambda db: db.execute(sql, (cutoff,)).rowcount, retry=True))

    def record_push(
        self, repository: str, digest: str, tag: str | None = None, at: float | None = None
    ) -> None:
        """A manifest pushed through the gateway (and the tag it was pushed to): when. A
        manifest's first push counts; a tag points at its latest."""
        when = time.time() if at is None else at

        def write(db: Any) -> None:
            with db.transaction():
                db.execute(
                    "INSERT INTO registry_ledger_pushes VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING",
                    (repository, digest, digest, when),
                )
                if tag is not None:
                    db.execute(
                        "INSERT INTO registry_ledger_pushes VALUES (%s, %s, %s, %s)"
                        " ON CONFLICT (repository, ref)"
                        " DO UPDATE SET digest = excluded.digest, at = excluded.at",
                        (repository, tag, digest, when),
                    )

        # Retry: the first push's row is kept (DO NOTHING), the tag set to the same values.
        self._run("INSERT", write, retry=True)

    def pushes(self, repository: str) -> dict[str, tuple[str, float]]:
        """ref (a tag, or a manifest digest) → (digest, when it was pushed)."""
        sql = "SELECT ref, digest, at FROM registry_ledger_pushes WHERE repository = %s"
        rows = self._run("SELECT", lambda db: db.execute(sql, (repository,)).fetchall(), retry=True)
        return {r: (d, float(at)) for r, d, at in rows}

    # --- claims of immutable tags across nodes (addons/gateway/immutable.py) ----------------------

    def claim_tag(self, repository: str, tag: str) -> int | None:
        """A session advisory lock for (repository, tag), held until `release_tag`: the key,
        or None when a session (another node's) holds it. Within one process the caller's
        node-local claim comes first, as these locks are re-entrant per session. A dropped
        connection drops its locks: a claim is then only the node's until released."""
        sql = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0)), hashtextextended(%s, 0)"
        name = f"tag:{repository}:{tag}"
        # Retry: a lock taken by a session that is gone went with it; the new one takes it.
        got, key = self._run(
            "SELECT", lambda db: db.execute(sql, (name, name)).fetchone(), retry=True
        )
        return int(key) if got else None

    def release_tag(self, key: int) -> None:
        # Retry: the lock went with a lost session; unlocking on a new one is a no-op.
        sql = "SELECT pg_advisory_unlock(%s)"
        self._run("SELECT", lambda db: db.execute(sql, (key,)), retry=True)

    # --- the start-up walk's progress (backfill.py) -------------------------------------------

    def walked(self, repository: str) -> bool:
        if repository in self._repos_known:
            return True
        sql = "SELECT 1 FROM registry_ledger_walked WHERE repository = %s"
        row = self._run("SELECT", lambda db: db.execute(sql, (repository,)).fetchone(), retry=True)
        return row is not None

    def mark_walked(self, repository: str) -> None:
        sql = (
            "INSERT INTO registry_ledger_walked VALUES (%s, %s)"
            " ON CONFLICT (repository) DO UPDATE SET at = excluded.at"
        )
        now = time.time()  # retry: an upsert of the same values
        self._run("INSERT", lambda db: db.execute(sql, (repository, now)), retry=True)

    # --- health -------------------------------------------------------------------------------

    def check(self) -> None:
        """For the health check: can the database be written (a server turned read-only, a
        replica after a fail-over: down), and is the ledger whole (tables emptied or dropped
        and made anew: not)? A failure is recorded."""
        probe = (
            "INSERT INTO registry_ledger_walked VALUES ('/health', %s)"
            " ON CONFLICT (repository) DO UPDATE SET at = excluded.at"
        )
        with contextlib.suppress(LedgerUnavailable):
            now = time.time()  # retry: an upsert of the same values
            self._run("INSERT", lambda db: db.execute(probe, (now,)), retry=True)
            self.refresh_whole()

    @contextlib.contextmanager
    def _advisory(self) -> Iterator[bool]:
        key = REBUILD_LOCK
        got = self._run(  # retry: as `claim_tag`
            "SELECT",
            lambda db: db.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0],
            retry=True,
        )
        try:
            yield bool(got)
        finally:
            if got:
                with contextlib.suppress(LedgerUnavailable):
                    self._run(
                        "SELECT",
                        lambda db: db.execute("SELECT pg_advisory_unlock(%s)", (key,)),
                        retry=True,
                    )

    def rebuild_lock(self) -> contextlib.AbstractContextManager[bool]:
        """One node rebuilds a lost ledger: a session advisory lock (dropped with the
        connection if that node dies)."""
        return self._advisory()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
