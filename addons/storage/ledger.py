"""The isolation ledger, as every store keeps it: which digests each tenant may see.

A tenant may see a digest it uploaded, mounted within its namespace, or pushed in a manifest
(the manifest and what it references). The backend cannot be trusted with this: Zot without
its own access control serves and links any known digest from any repository (dedupe).

Here is what every store shares: the calls they answer (`AnyLedger`, and `Accounts` for those
that also keep sizes, usage and push times), up/down and whole/rebuilding (`LedgerState`,
written once), the quota rule applied inside their transactions (`upload_decision`), and the
holder of a repository's own records. The stores: sqlite.py (one node, the default), s3.py
and postgres.py (several nodes, contract §9); spec.py opens the one the option names.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from addons.decisions import quota
from addons.storage.recorded import RecordedPairs

logger = logging.getLogger(__name__)

# Unfinished uploads (`uploads` table): a reservation not touched for this long is forgotten,
# as the backend purges the upload itself (Zot's gcDelay, Distribution's uploadpurging age:
# zot/config.py renders both from the same setting, REGISTRY_UPLOAD_MAX_AGE).
UPLOAD_AGE = 3600.0
MAX_UPLOADS = 64  # unfinished uploads one tenant under a quota may hold at once
WHOLE = "/whole"  # a `walked` record (not a repository name): a walk of everything finished


class LedgerUnavailable(Exception):
    """The ledger cannot answer or record right now (503, retry)."""


def holder(repository: str) -> str:
    """The `tenant` column value under which a repository's own digests are kept: what that
    repository references, which callers granted pull on it may read. A tenant is one name
    component, so a leading '/' never clashes with one."""
    return "/" + repository


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
    # `reserve`: the tenant's bytes reserved by requests not settled yet (this session's too),
    # before this decision: room that may come back when they end
    pending: int = 0

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
    """Up or down, whole or not: what every ledger (SQLite, S3, PostgreSQL) reports to
    /healthz, and how it goes down and comes back. A ledger calls `_init_state` in its
    constructor; it has `path` (named in logs), `_clock`, a re-entrant `_lock`, and
    `walked` / `mark_walked` (where the `WHOLE` record lives).

    Whole: the store holds every record a walk of the backend finds (plus what was pushed
    since). A store found new, emptied or replaced is not whole until a rebuild (a walk of the
    whole backend, `mark_whole`) has finished; meanwhile a miss is "unknown", not "no"."""

    path: object
    _clock: Callable[[], float]
    _lock: threading.RLock

    def walked(self, repository: str) -> bool:
        raise NotImplementedError

    def mark_walked(self, repository: str) -> None:
        raise NotImplementedError

    def _init_state(self) -> None:
        self._retry_at = 0.0  # until then, calls that need the store fail at once
        self.state, self.reason, self.since = "ok", "", time.time()
        self.errors = 0
        self.whole, self.lost = True, ""  # `lost`: why it is not whole
        self.losses = 0  # times it was found not whole (what was resolved before is stale)
        self._repos_known: set[str] = set()  # shared ledgers: walk records this process wrote

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

    def _set_whole(self, whole: bool, lost: str = "", fresh: bool = False) -> None:
        """Whole or not, saying why not; `fresh`: records were just found lost (again)."""
        with self._lock:
            if whole and not self.whole:
                logger.warning("ledger whole again (%s): rebuilt from the backend", self.path)
            elif not whole and (self.whole or fresh):
                logger.warning(
                    "ledger %s is not whole: %s; rebuilding it from the backend (until then a"
                    " miss is looked up there, and answered 503 when that cannot be done)",
                    self.path,
                    lost,
                )
            if not whole and (self.whole or fresh):
                self.losses += 1
                self._repos_known.clear()  # the store may have lost them too
            self.whole, self.lost = whole, "" if whole else lost

    def rebuild_lock(self) -> contextlib.AbstractContextManager[bool]:
        """Held by the one process that rebuilds the ledger (yields False: another holds it).
        Here none: every node's worker 0 may walk (records are idempotent)."""
        return contextlib.nullcontext(True)

    def refresh_whole(self) -> bool:
        """Read from the store whether it is whole (another worker or node may have rebuilt
        it, or found it lost). Raises LedgerUnavailable."""
        found = self.walked(WHOLE)
        self._set_whole(found, self.lost or "no record of a complete walk of the backend")
        return found

    def mark_whole(self) -> None:
        """A walk of the whole backend has just finished: the ledger is whole."""
        self.mark_walked(WHOLE)
        self._set_whole(True)

    def status(self) -> dict[str, object]:
        state, reason = self.state, self.reason
        if state == "ok" and not self.whole:
            state, reason = "rebuilding", f"{self.lost}; being rebuilt from the backend"
        out: dict[str, object] = {"state": state, "since": self.since}
        if reason:
            out["reason"] = reason
        return out


class AnyLedger(Protocol):
    state: str
    errors: int
    recovered: int
    whole: bool  # holds what a walk of the backend finds (else: lost records, rebuilding)
    lost: str  # why it is not whole
    losses: int
    recorded: RecordedPairs
    accounts: bool  # keeps sizes, usage and push times too (`Accounts`): SQLite, PostgreSQL

    def has(self, tenant: str, digest: str) -> bool: ...
    def add(
        self,
        tenant: str,
        digests: Iterable[str],
        repository: str | None = None,
        listed: bool = False,
    ) -> None: ...
    def walked(self, repository: str) -> bool: ...
    def mark_walked(self, repository: str) -> None: ...
    def repositories(self, prefix: str, after: str, limit: int) -> list[str]: ...
    def count(self, tenant: str | None = None) -> int: ...
    def check(self) -> None: ...
    def refresh_whole(self) -> bool: ...
    def mark_whole(self) -> None: ...
    def rebuild_lock(self) -> contextlib.AbstractContextManager[bool]: ...
    def status(self) -> dict[str, object]: ...
    def close(self) -> None: ...


class Accounts(Protocol):
    """What storage accounting (gateway/accounting.py) asks of a ledger that keeps accounts."""

    def has(self, tenant: str, digest: str) -> bool: ...
    def record_sizes(self, sizes: dict[str, int]) -> None: ...
    def usage_all(self) -> dict[str, int]: ...
    def usage(self, tenant: str) -> int: ...
    def admit(
        self,
        tenant: str,
        digest: str,
        size: int,
        limit: int,
        session: str | None = None,
        *,
        now: float | None = None,
        age: float = ...,
    ) -> Reservation: ...
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
        age: float = ...,
        max_uploads: int = ...,
    ) -> Reservation: ...
    def settle(
        self,
        tenant: str,
        session: str,
        released: int,
        stored: int | None = None,
        grown: int = 0,
        *,
        now: float | None = None,
    ) -> None: ...
    def rename_upload(self, tenant: str, placeholder: str, session: str) -> None: ...
    def drop_upload(self, tenant: str, session: str) -> None: ...
    def expire_uploads(self, now: float | None = None, age: float = ...) -> int: ...
    def uploading_all(self) -> dict[str, int]: ...
    def uploads(self, tenant: str) -> dict[str, tuple[int, int]]: ...
    def record_push(
        self, repository: str, digest: str, tag: str | None = None, at: float | None = None
    ) -> None: ...
