"""Which isolation ledger a gateway opens, from its `registry_ledger` option.

- a file path: SQLite (sqlite.py `SqliteLedger`), the single-node default under $REGISTRY_DATA_DIR;
- `s3://bucket/prefix?region=…[&endpoint=…]`: shared by several nodes (s3.py `S3Ledger`);
- `postgresql://…`: shared by several nodes, in PostgreSQL (postgres.py `PgLedger`).

All three answer the calls of ledger.py `AnyLedger`.
"""

from __future__ import annotations

from pathlib import Path

from addons.storage.ledger import AnyLedger
from addons.storage.sqlite import SqliteLedger


def is_shared(spec: str) -> bool:
    """A ledger every node sees (not a node-local file)."""
    return spec.startswith(("s3://", "postgresql://", "postgres://"))


def open_ledger(spec: str) -> AnyLedger:
    if spec.startswith("s3://"):
        from addons.storage.s3 import S3Ledger, S3Location  # boto3 only where it is used

        return S3Ledger(S3Location.parse(spec))
    if spec.startswith(("postgresql://", "postgres://")):
        from addons.storage.postgres import PgLedger  # psycopg only where it is used

        return PgLedger(spec)
    if "://" in spec:
        raise ValueError(f"unknown ledger {spec.split('://')[0]}://")
    return SqliteLedger(Path(spec))
