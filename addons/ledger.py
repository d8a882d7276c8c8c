"""Which digests each tenant may see: a durable per-tenant ledger (SQLite, WAL).

A tenant may see a digest it uploaded, mounted within its namespace, or pushed in a manifest
(the manifest and what it references). The backend cannot be trusted with this: Zot without
its own access control serves and links any known digest from any repository (dedupe).
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path


class Ledger:
    """(tenant, digest) pairs; positive answers cached in memory (the hot path is a HEAD)."""

    CACHE = 100_000

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a confirmed push survives a power cut
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS seen (tenant TEXT NOT NULL, digest TEXT NOT NULL,"
            " PRIMARY KEY (tenant, digest)) WITHOUT ROWID"
        )
        self._cache: OrderedDict[tuple[str, str], None] = OrderedDict()
        # One connection, used from the event loop and the backfill thread: serialise.
        self._lock = threading.Lock()

    def has(self, tenant: str, digest: str) -> bool:
        key = (tenant, digest)
        if key in self._cache:
            self._cache.move_to_end(key)
            return True
        row = self.db.execute("SELECT 1 FROM seen WHERE tenant = ? AND digest = ?", key).fetchone()
        if row is not None:
            self._remember(key)
        return row is not None

    def add(self, tenant: str, digests: Iterable[str]) -> None:
        rows = [(tenant, d) for d in dict.fromkeys(digests)]
        if not rows:
            return
        with self._lock:
            with self.db:  # one transaction: all of a manifest's references or none
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?)", rows)
            for key in rows:
                self._remember(key)

    def _remember(self, key: tuple[str, str]) -> None:
        self._cache[key] = None
        if len(self._cache) > self.CACHE:
            self._cache.popitem(last=False)

    def count(self, tenant: str | None = None) -> int:
        if tenant is None:
            return self.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM seen WHERE tenant = ?", (tenant,)).fetchone()[
            0
        ]

    def close(self) -> None:
        self.db.close()
