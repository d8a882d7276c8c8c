"""The isolation ledger in an S3 bucket, shared by several registry nodes (contract §9).

Same interface as the SQLite ledger (ledger.py: `AnyLedger`; isolation, listing and the
start-up walk use either),
one small object per fact under a reserved prefix, so that nothing is ever read, changed and
written back (no lost update between nodes, no lock):

    <prefix>/format                      {"format": "tabbify-ledger", "version": 1}
    <prefix>/seen/<tenant>/<digest>      empty: the tenant may see this digest
    <prefix>/repos/<hex of the name>     empty: a repository that holds a manifest (catalog)
    <prefix>/walked/<hex of the name>    the time: the start-up walk has seen this repository

Repository names are hex-encoded: one flat "directory" whose byte order is the names' byte
order (each byte becomes two order-preserving hex digits), so the catalog is one ordered
LIST with a prefix and a start-after, as the SQLite ledger's index range scan, and no name
can contain `/` or `//` (which filer-backed servers such as SeaweedFS turn into directories).

Consistency: S3 (since 2020) and SeaweedFS are read-after-write consistent for PUT, HEAD and
LIST, so a digest confirmed through node A is found by node B's next HEAD. Only positive
answers are cached (in memory, per process): a miss always asks the bucket, so no node ever
holds a stale "no". Records are never removed here, so a positive answer cannot go stale.

Cost: a hit is a dict lookup; a miss is one HEAD; a confirmed blob push is one PUT, a manifest
push one PUT for the manifest (its references were just checked, so they are cached and not
written again) plus, the first time this process sees that repository, the catalog and walk
records, all sent at once: one round trip. Blocking (boto3): callers on the event loop run
these methods in a thread.

Failures: any S3 error marks the ledger down (LedgerUnavailable: 503, never a 201 or a false
404). For a second after a failure calls fail at once instead of each waiting out timeouts;
then the next call tries the bucket again, and a success brings the ledger up.

Credentials: the AWS SDK default chain (instance role, or AWS_* in the environment), as the
storage drivers; nothing in the URL. The role needs s3:GetObject, s3:PutObject and
s3:ListBucket on the prefix (without ListBucket, S3 answers 403 instead of 404 for a missing
key, which the ledger reports as down rather than guess).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from addons.storage.ledger import LedgerState, LedgerUnavailable, holder
from addons.storage.recorded import RecordedPairs

FORMAT = {"format": "tabbify-ledger", "version": 1}
FAIL_FAST = 1.0  # seconds after a failure during which calls fail at once
WRITERS = 8  # parallel PUTs of one confirmation
LIST_PAGE = 1000  # keys per LIST request (S3's maximum)
_MISSING = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing slash; may be empty
    region: str
    endpoint: str | None  # S3-compatible server; None = AWS

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """`s3://bucket/prefix?region=…&endpoint=…` (the query is added by `run` from
        REGISTRY_S3_REGION / REGISTRY_S3_ENDPOINT)."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"{url!r} is not s3://<bucket>/<prefix>")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        region = query.get("region", "")
        if not region:
            raise ValueError(f"{url!r}: no region")
        return cls(parts.netloc, parts.path.strip("/"), region, query.get("endpoint") or None)

    def url(self) -> str:
        query = f"region={quote(self.region, safe='')}"
        if self.endpoint:
            query += f"&endpoint={quote(self.endpoint, safe='')}"
        return f"s3://{self.bucket}/{self.prefix}?{query}"


def name_key(name: str) -> str:
    """A repository name as an order-preserving, slash-free key component."""
    return name.encode().hex()


def name_from_key(key: str) -> str:
    return bytes.fromhex(key).decode()


class S3Ledger(LedgerState):
    """(tenant, digest) pairs in a bucket; positive answers cached in memory
    (`recorded.RecordedPairs`)."""

    accounts = False  # no sizes nor push times here: quotas refuse pushes (README, known limits)

    def __init__(
        self,
        where: S3Location,
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
        cache: int = 100_000,
    ) -> None:
        self.where = where
        self.path = where.url()  # what operators see in logs (no credentials in it)
        self._clock = clock
        self._s3 = client or boto3.client(
            "s3",
            region_name=where.region,
            endpoint_url=where.endpoint,
            config=Config(
                # Bounded: a slow bucket turns into a 503 the client retries, not a hang.
                connect_timeout=2,
                read_timeout=5,
                retries={"mode": "standard", "max_attempts": 3},
                max_pool_connections=32,
                s3={"addressing_style": "path" if where.endpoint else "auto"},
            ),
        )
        base = f"{where.prefix}/" if where.prefix else ""
        self._seen, self._repos, self._walked = f"{base}seen/", f"{base}repos/", f"{base}walked/"
        self._format = f"{base}format"
        self.recorded = RecordedPairs(cache)
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(WRITERS, thread_name_prefix="ledger-s3")
        self._formatted = False
        self._init_state()
        self.recovered = 0  # nothing to recreate: the bucket is the record
        self.check()  # a bucket that cannot be reached at start: down, retried, not fatal

    # --- S3 calls, each turning any failure into LedgerUnavailable -------------------------

    def _call(self, what: str, action: Callable[[], Any]) -> Any:
        if self._failing_fast():
            raise LedgerUnavailable(self.reason)
        try:
            result = action()
        except (BotoCoreError, ClientError) as e:
            self._down(f"{what}: {_describe(e)}", FAIL_FAST)
            raise LedgerUnavailable(self.reason) from None
        return result

    def _exists(self, key: str) -> bool:
        def head() -> bool:
            try:
                self._s3.head_object(Bucket=self.where.bucket, Key=key)
            except ClientError as e:
                if _code(e) in _MISSING:
                    return False
                raise
            return True

        return bool(self._call("HEAD", head))

    def _put(self, key: str, body: bytes = b"") -> None:
        self._s3.put_object(Bucket=self.where.bucket, Key=key, Body=body)

    def _ensure_format(self) -> None:
        """The prefix is ours (or empty): never mix records into another layout."""
        if self._formatted:
            return

        def read_or_write() -> None:
            try:
                body = self._s3.get_object(Bucket=self.where.bucket, Key=self._format)["Body"]
                found = json.loads(body.read() or b"null")
            except ClientError as e:
                if _code(e) not in _MISSING:
                    raise
                self._put(self._format, json.dumps(FORMAT).encode())
                return
            except ValueError:
                found = None
            if found != FORMAT:
                raise ClientError(
                    {"Error": {"Code": "LedgerFormat", "Message": f"{self._format}: {found!r}"}},
                    "GetObject",
                )

        self._call("format", read_or_write)
        self._formatted = True

    # --- records ------------------------------------------------------------------------------

    def has(self, tenant: str, digest: str) -> bool:
        if self.recorded.holds((tenant, digest)):
            return True
        self.recorded.misses += 1
        found = self._exists(self._seen_key(tenant, digest))
        self._up()
        if found:
            with self._lock:
                self.recorded.remember((tenant, digest))
        return found

    def add(
        self,
        tenant: str,
        digests: Iterable[str],
        repository: str | None = None,
        listed: bool = False,
    ) -> None:
        """Record durably (each PUT is durable when answered); raises LedgerUnavailable if any
        failed. Idempotent, so a retried push writes the same objects again; a partial record
        only names content the backend already confirmed for this tenant. `repository`: where
        they were pushed (recorded for it too, as `ledger.holder`); `listed`: it now holds a
        manifest (the catalog lists it)."""
        unique = list(dict.fromkeys(digests))
        holders = [tenant] if repository is None else [tenant, holder(repository)]
        pairs = [(h, d) for h in holders for d in unique if not self.recorded.holds((h, d))]
        keys = [self._seen_key(t, d) for t, d in pairs]
        new_repo = listed and repository is not None and repository not in self._repos_known
        if repository is not None and new_repo:
            # Pushed through the gateway: listed, and nothing in it for a walk to find
            # (unless the ledger lost records: its older content is then for a walk to find).
            keys.append(self._repos + name_key(repository))
            if self.whole:
                keys.append(self._walked + name_key(repository))
        if not keys:
            return
        self._ensure_format()

        def put_all() -> None:
            if len(keys) == 1:
                self._put(keys[0])
                return
            for future in [self._pool.submit(self._put, k) for k in keys]:
                future.result()  # the first failure raises

        self._call("PUT", put_all)
        self._up()
        with self._lock:
            for pair in pairs:
                self.recorded.remember(pair)
            if repository is not None and listed and self.whole:
                self._repos_known.add(repository)

    def _seen_key(self, tenant: str, digest: str) -> str:
        return f"{self._seen}{quote(tenant, safe='')}/{quote(digest, safe=':')}"

    def _list(self, prefix: str, start_after: str = "", limit: int = 0) -> list[str]:
        """Keys under `prefix` in byte order, after `start_after`, at most `limit` (0: all)."""

        def pages() -> list[str]:
            found: list[str] = []
            args: dict[str, Any] = {"Bucket": self.where.bucket, "Prefix": prefix}
            if start_after:
                args["StartAfter"] = start_after
            while True:
                if limit:
                    args["MaxKeys"] = min(LIST_PAGE, limit - len(found))
                else:
                    args["MaxKeys"] = LIST_PAGE
                page = self._s3.list_objects_v2(**args)
                found += [o["Key"] for o in page.get("Contents", [])]
                if not page.get("IsTruncated") or (limit and len(found) >= limit):
                    return found[:limit] if limit else found
                args["ContinuationToken"] = page["NextContinuationToken"]
                args.pop("StartAfter", None)

        keys = self._call("LIST", pages)
        self._up()
        return list(keys)

    def count(self, tenant: str | None = None) -> int:
        prefix = self._seen + (f"{quote(tenant, safe='')}/" if tenant is not None else "")
        keys = self._list(prefix)
        if tenant is None:  # tenants' records, not repositories' (`ledger.holder`)
            keys = [k for k in keys if not k.removeprefix(self._seen).startswith("%2F")]
        return len(keys)

    def repositories(self, prefix: str, after: str, limit: int) -> list[str]:
        """Up to `limit` names starting with `prefix` and sorting after `after`, in order: one
        LIST (hex keys sort as the names do, and share their prefixes)."""
        if limit <= 0:
            return []
        # Start-after is exclusive, also when `after` is the prefix itself (one repository).
        start = self._repos + name_key(after) if after and after >= prefix else ""
        keys = self._list(self._repos + name_key(prefix), start, limit)
        return [name_from_key(k.removeprefix(self._repos)) for k in keys]

    # --- the start-up walk's progress (backfill.py) -------------------------------------------

    def walked(self, repository: str) -> bool:
        if repository in self._repos_known:
            return True
        found = self._exists(self._walked + name_key(repository))
        self._up()
        return found

    def mark_walked(self, repository: str) -> None:
        self._ensure_format()
        key = self._walked + name_key(repository)
        self._call("PUT", lambda: self._put(key, str(time.time()).encode()))
        self._up()

    # --- health -------------------------------------------------------------------------------

    def check(self) -> None:
        """For the health check: can the bucket be read (and the prefix is ours)?"""
        with contextlib.suppress(LedgerUnavailable):
            self._formatted = False
            self._ensure_format()
            self._up()
            self.refresh_whole()  # a prefix emptied (format written anew) lacks the record

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _describe(e: Exception) -> str:
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        return f"{error.get('Code', '?')} {error.get('Message', '')}".strip()
    return f"{type(e).__name__}: {e}"
