"""What one isolation-ledger lookup and one record cost: SQLite (one node) against the shared
S3 ledger and the PostgreSQL ledger (several nodes), on real servers (SeaweedFS, PostgreSQL on
loopback), called as the gateway calls them.

    .venv/bin/python -m tests.bench.ledger_lookup [--digests 300]

Per lookup, p50 / p99:
- hit: the digest is in this process's memory (`known.cached`, on the event loop): every request
  after the first for a digest on a gateway process;
- miss, recorded: a fresh process (or another node) asks the store once (`has` in a thread,
  as isolation does): SQLite SELECT or S3 HEAD 200;
- miss, absent: a digest the tenant does not hold (`has`): SELECT or HEAD 404: every request
  that isolation refuses;
- record: a confirmed blob push (`add` of one digest, in a thread): SQLite transaction with
  fsync, or one S3 PUT; and a first manifest push to a repository (manifest + catalog + walk
  records: three PUTs sent at once).
On loopback SeaweedFS is a lower bound for S3 itself (AWS S3 within a region: HEAD/PUT are
typically 10-30 ms first byte); the numbers show where the cost is, not AWS's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from addons.storage.postgres import PgLedger
from addons.storage.s3 import S3Ledger, S3Location
from addons.storage.sqlite import SqliteLedger
from tests.bench.httpload import percentile
from tests.support.postgres import PASSWORD, Postgres
from tests.support.standins.seaweed import SeaweedS3

BUCKET = "tbf-bench"


def digest(i: int, salt: str) -> str:
    return "sha256:" + hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def timed(calls: list[Callable[[], Any]]) -> list[float]:
    out = []
    for call in calls:
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return sorted(out)


async def timed_in_thread(calls: list[Callable[[], Any]]) -> list[float]:
    out = []
    for call in calls:
        start = time.perf_counter()
        await asyncio.to_thread(call)
        out.append(time.perf_counter() - start)
    return sorted(out)


def row(name: str, values: list[float]) -> str:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    unit, scale = ("µs", 1e6) if p99 < 1e-3 else ("ms", 1e3)
    return f"  {name:<34} p50 {p50 * scale:8.2f} {unit}   p99 {p99 * scale:8.2f} {unit}"


def measure(name: str, make: Callable[[], Any], n: int) -> None:
    writer = make()
    held = [digest(i, "held") for i in range(n)]
    blobs = [digest(i, "blob") for i in range(n)]
    # Records: one confirmed blob push each; then first manifest pushes to new repositories.
    record = asyncio.run(
        timed_in_thread([lambda d=d: writer.add("acme", [d]) for d in blobs])  # type: ignore[misc]
    )
    manifest = asyncio.run(
        timed_in_thread(
            [
                lambda i=i: writer.add("acme", [digest(i, "m"), blobs[i]], f"acme/r{i}")  # type: ignore[misc]
                for i in range(min(n, 100))
            ]
        )
    )
    writer.add("acme", held)
    reader = make()  # another process / node: nothing cached
    miss_found = asyncio.run(
        timed_in_thread([lambda d=d: reader.has("acme", d) for d in held])  # type: ignore[misc]
    )
    assert all(reader.recorded.cached(("acme", d)) for d in held)
    hit = timed([lambda d=d: reader.recorded.cached(("acme", d)) for d in held] * 20)  # type: ignore[misc]
    miss_absent = asyncio.run(
        timed_in_thread([lambda i=i: reader.has("globex", digest(i, "held")) for i in range(n)])  # type: ignore[misc]
    )
    print(name)
    print(row("hit (memory)", hit))
    print(row("miss, recorded (store lookup)", miss_found))
    print(row("miss, absent (store lookup)", miss_absent))
    print(row("record a blob push", record))
    print(row("record a first manifest push", manifest))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--digests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tbf-ledger-lookup-") as tmp:
        # Started before the credentials are set: SeaweedFS would take AWS_* from its
        # environment as the only identity and refuse the anonymous bucket creation.
        s3 = SeaweedS3(Path(tmp) / "seaweed").start()
        try:
            s3.create_bucket(BUCKET)
            os.environ.update(
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench-secret",
                AWS_EC2_METADATA_DISABLED="true",
            )
            where = S3Location(BUCKET, "ledger", "us-east-1", s3.url)
            local = Path(tmp) / "ledger.db"
            measure("SQLite (one node)", lambda: SqliteLedger(local), args.digests)
            measure("S3 (shared, SeaweedFS on loopback)", lambda: S3Ledger(where), args.digests)
            pg = Postgres(durable=True).start()
            try:
                os.environ["PGPASSWORD"] = PASSWORD
                url = pg.database()
                name = "PostgreSQL (shared, loopback, fsync on)"
                measure(name, lambda: PgLedger(url), args.digests)
            finally:
                pg.remove()
        finally:
            s3.stop()


if __name__ == "__main__":
    main()
