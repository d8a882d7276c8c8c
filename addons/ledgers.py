"""Which isolation ledger a gateway opens, from its `registry_ledger` option.

- a file path: SQLite (`ledger.Ledger`), the single-node default under $REGISTRY_DATA_DIR;
- `s3://bucket/prefix?region=…[&endpoint=…]`: shared by several nodes (`ledger_s3.S3Ledger`);
- `postgresql://…`: shared by several nodes, in PostgreSQL (`ledger_pg.PgLedger`).

All three answer the same calls: `has`, `add`, `walked`, `mark_walked`, `repositories`,
`count`, `check`, `status`, `close`, whether they are whole (`whole`, `refresh_whole`,
`mark_whole`, `rebuild_lock`: `ledger.LedgerState`), and carry `state`, `errors`,
`recovered`, `losses` and `known`
(what this process knows is recorded, `known.KnownRecords`: `known.cached` answers from
memory, with its hit and miss counts). Every call but `known`'s, `status` and `close` may
block on I/O.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from addons.known import KnownRecords
from addons.ledger import Ledger, Reservation


class AnyLedger(Protocol):
    state: str
    errors: int
    recovered: int
    whole: bool  # holds what a walk of the backend finds (else: lost records, rebuilding)
    lost: str  # why it is not whole
    losses: int
    known: KnownRecords
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
    """What storage accounting (addons/accounting.py) asks of a ledger that keeps accounts."""

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


def is_shared(spec: str) -> bool:
    """A ledger every node sees (not a node-local file)."""
    return spec.startswith(("s3://", "postgresql://", "postgres://"))


def open_ledger(spec: str) -> AnyLedger:
    if spec.startswith("s3://"):
        from addons.ledger_s3 import S3Ledger, S3Location  # boto3 only where it is used

        return S3Ledger(S3Location.parse(spec))
    if spec.startswith(("postgresql://", "postgres://")):
        from addons.ledger_pg import PgLedger  # psycopg only where it is used

        return PgLedger(spec)
    if "://" in spec:
        raise ValueError(f"unknown ledger {spec.split('://')[0]}://")
    return Ledger(Path(spec))
