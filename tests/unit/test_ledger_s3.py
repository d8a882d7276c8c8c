"""The shared ledger in S3 (addons/storage/s3.py) against a real S3 server (SeaweedFS), and the
contract every ledger keeps (the same answers from SQLite, S3 and PostgreSQL)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from addons.storage import s3 as ledger_s3
from addons.storage.ledger import LedgerUnavailable
from addons.storage.postgres import PgLedger
from addons.storage.s3 import S3Ledger, S3Location, name_from_key, name_key
from addons.storage.spec import is_shared, open_ledger
from addons.storage.sqlite import SqliteLedger
from tests.support.postgres import PASSWORD
from tests.support.standins.seaweed import SeaweedS3

BUCKET = "tbf-ledger"
D = ["sha256:" + c * 64 for c in "0123456789abcdef"]
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "tabbify-test",
    "AWS_SECRET_ACCESS_KEY": "tabbify-test-secret",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed-ledger")).start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's default chain, from the environment (an instance role on AWS)."""
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)


_prefixes = Counter[str]()


def location(s3: SeaweedS3, name: str) -> S3Location:
    _prefixes[name] += 1  # every test its own prefix in the one bucket
    return S3Location(BUCKET, f"t/{name}-{_prefixes[name]}", "us-east-1", s3.url)


class Counting:
    """A boto3 client that counts the S3 calls made through it."""

    def __init__(self, client: Any) -> None:
        self.client, self.calls = client, Counter[str]()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return method(*args, **kwargs)

        return call


def client(where: S3Location) -> Any:
    return boto3.client("s3", region_name=where.region, endpoint_url=where.endpoint)


def test_the_url_carries_bucket_prefix_region_and_endpoint() -> None:
    where = S3Location.parse("s3://b/some/prefix/?region=eu-central-1&endpoint=http%3A//h%3A1")
    assert where == S3Location("b", "some/prefix", "eu-central-1", "http://h:1")
    assert S3Location.parse(where.url()) == where
    assert S3Location.parse("s3://b?region=r").prefix == ""
    for bad in ("s3:///p?region=r", "http://b/p?region=r", "s3://b/p"):
        with pytest.raises(ValueError):
            S3Location.parse(bad)


def test_repository_keys_sort_as_the_names_do() -> None:
    names = ["acme/a-c", "acme/a/b", "acme/a", "acme/a.b", "acme/a_b", "acme/z", "acme0/x"]
    assert sorted(names, key=name_key) == sorted(names)
    assert all(name_from_key(name_key(n)) == n for n in names)
    assert all("/" not in name_key(n) for n in names)


def test_the_factory_picks_the_ledger(tmp_path: Path, s3: SeaweedS3) -> None:
    assert isinstance(open_ledger(str(tmp_path / "l.db")), SqliteLedger)
    shared = open_ledger(location(s3, "factory").url())
    assert isinstance(shared, S3Ledger) and shared.state == "ok"
    with pytest.raises(ValueError, match="unknown"):
        open_ledger("ftp://x/y")
    assert is_shared("s3://b/p") and not is_shared("/var/lib/x/ledger.db")


def test_a_record_made_on_one_node_is_seen_on_another(s3: SeaweedS3) -> None:
    where = location(s3, "nodes")
    a, b = S3Ledger(where), S3Ledger(where)
    assert not b.has("acme", D[0])  # a miss is never cached ...
    a.add("acme", [D[0], D[1], D[0]])
    assert b.has("acme", D[0]) and b.has("acme", D[1])  # ... so B sees A's push at once
    assert not b.has("globex", D[0])  # per tenant
    assert b.recorded.cached(("acme", D[0])) and not b.recorded.cached(("globex", D[0]))
    assert a.count("acme") == 2 and a.count() == 2


def test_an_emptied_prefix_is_not_whole_until_rebuilt(s3: SeaweedS3) -> None:
    """Records lost in the bucket (the prefix emptied): the health check finds the ledger
    not whole; a push then does not mark its repository walked (its older content is for
    the rebuild to find); the rebuild's mark makes it whole for every node."""
    where = location(s3, "emptied")
    a, b = S3Ledger(where), S3Ledger(where)
    assert not a.whole and a.status()["state"] == "rebuilding"  # new: nothing walked yet
    a.mark_whole()
    b.check()
    assert b.whole and b.status()["state"] == "ok"
    a.add("acme", [D[0]], repository="acme/app", listed=True)
    raw = client(where)
    for key in a._list(where.prefix + "/"):
        raw.delete_object(Bucket=where.bucket, Key=key)
    b.check()
    assert not b.whole and b.status()["state"] == "rebuilding"
    b.add("acme", [D[1]], repository="acme/app", listed=True)
    assert not b.walked("acme/app")
    a.mark_whole()
    b.check()
    assert b.whole


def test_costs_hit_miss_and_confirmation(s3: SeaweedS3) -> None:
    """A hit costs nothing, a miss one HEAD, a blob push one PUT, a manifest push one PUT
    plus the catalog and walk records the first time (all in one round trip)."""
    where = location(s3, "costs")
    counting = Counting(client(where))
    ledger = S3Ledger(where, client=counting)
    ledger.mark_whole()  # as after the start-up walk
    counting.calls.clear()
    ledger.add("acme", [D[0]])  # a blob upload confirmed
    assert counting.calls == {"put_object": 1}
    counting.calls.clear()
    assert ledger.has("acme", D[0]) and not counting.calls  # hit: memory
    assert not ledger.has("acme", D[9])
    assert counting.calls == {"head_object": 1}  # miss: one HEAD
    counting.calls.clear()
    # A manifest push: its references are held (cached), so only the manifest is new.
    ledger.add("acme", [D[2], D[0]], repository="acme/app", listed=True)
    # the manifest for acme; manifest and layer for the repository; catalog; walked
    assert counting.calls == {"put_object": 5}
    counting.calls.clear()
    ledger.add("acme", [D[3], D[0]], repository="acme/app", listed=True)
    assert counting.calls == {"put_object": 2}  # the repository is known now
    counting.calls.clear()
    assert ledger.walked("acme/app") and not counting.calls
    recorded = ledger.recorded
    assert (recorded.hits, recorded.misses) == (0, 1)  # `has` on a cached digest: not a lookup
    assert ledger.recorded.cached(("acme", D[0])) and not ledger.recorded.cached(("acme", D[8]))
    assert (recorded.hits, recorded.misses) == (1, 1)  # what isolation's hot path counts


@pytest.fixture(params=["sqlite", "s3", "postgresql"])
def any_ledger(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    if request.param == "sqlite":
        return SqliteLedger(tmp_path / "ledger.db")
    if request.param == "postgresql":
        monkeypatch.setenv("PGPASSWORD", PASSWORD)
        return PgLedger(request.getfixturevalue("postgres").database())
    s3 = request.getfixturevalue("s3")
    return S3Ledger(location(s3, "contract"))


def test_every_ledger_list_the_catalog_alike(any_ledger: Any) -> None:
    names = ["acme/a-c", "acme/a/b", "acme/a", "acme/b", "acme0/x", "acm/y", "globex/a"]
    for i, name in enumerate(names):
        any_ledger.add(name.split("/")[0], [D[i]], repository=name, listed=True)
    assert any_ledger.repositories("acme/", "", 100) == ["acme/a", "acme/a-c", "acme/a/b", "acme/b"]
    assert any_ledger.repositories("acme/", "acme/a-c", 100) == ["acme/a/b", "acme/b"]
    assert any_ledger.repositories("acme/", "", 2) == ["acme/a", "acme/a-c"]
    assert any_ledger.repositories("acme/", "acme/b", 10) == []
    assert any_ledger.repositories("acme/", "a", 10) == any_ledger.repositories("acme/", "", 10)
    assert any_ledger.repositories("nobody/", "", 10) == []


def test_every_ledger_record_walks_alike(any_ledger: Any) -> None:
    assert not any_ledger.walked("acme/app")
    any_ledger.mark_walked("acme/app")
    assert any_ledger.walked("acme/app")
    any_ledger.mark_walked("/run/0123abcd")  # the start-up walk's marker: not a name
    assert any_ledger.walked("/run/0123abcd")
    # Not whole yet (new): a push leaves its repository's older content for the walk to find.
    any_ledger.add("acme", [D[0]], repository="acme/early", listed=True)
    assert not any_ledger.walked("acme/early")
    any_ledger.mark_whole()
    any_ledger.add("acme", [D[0]], repository="acme/pushed", listed=True)
    assert any_ledger.walked("acme/pushed")


def test_every_ledger_says_whether_it_is_whole_alike(any_ledger: Any) -> None:
    """New: not whole (its status says "rebuilding", why, and that it is being rebuilt)
    until a walk of everything marks it; the mark is in the store, for every process."""
    assert not any_ledger.whole and not any_ledger.refresh_whole()
    status = any_ledger.status()
    assert status["state"] == "rebuilding" and "rebuilt from the backend" in status["reason"]
    with any_ledger.rebuild_lock() as mine:
        assert mine
        any_ledger.mark_whole()
    assert any_ledger.whole and any_ledger.status()["state"] == "ok"
    any_ledger.whole = False  # as another process would read it before the mark
    assert any_ledger.refresh_whole() and any_ledger.whole


def test_catalog_pages_past_one_list_page(s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_s3, "LIST_PAGE", 10)
    ledger = S3Ledger(location(s3, "pages"))
    names = [f"acme/r{i:04d}" for i in range(25)]
    for name in names:
        ledger.add("acme", [], repository=name, listed=True)
    assert ledger.repositories("acme/", "", 23) == names[:23]
    assert ledger.repositories("acme/", "acme/r0009", 5000) == names[10:]
    # A prefix that is a whole name: `after` stays exclusive (else paging never ends).
    assert ledger.repositories("acme/r0001", "acme/r0001", 10) == []
    assert ledger.repositories("acme/r0001", "", 10) == ["acme/r0001"]
    assert ledger.count() == 0 and len(ledger.repositories("acme/", "", 0)) == 0


class Flaky:
    """A client that fails every call while `broken`."""

    def __init__(self, client: Any) -> None:
        self.client, self.broken = client, False

    def __getattr__(self, name: str) -> Any:
        from botocore.exceptions import EndpointConnectionError

        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.broken:
                raise EndpointConnectionError(endpoint_url="http://down")
            return method(*args, **kwargs)

        return call


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_failing_bucket_refuses_then_recovers_by_itself(s3: SeaweedS3) -> None:
    where, clock = location(s3, "flaky"), Clock()
    flaky = Flaky(client(where))
    ledger = S3Ledger(where, client=flaky, clock=clock)
    ledger.mark_whole()
    ledger.add("acme", [D[0]])
    flaky.broken = True
    with pytest.raises(LedgerUnavailable):
        ledger.add("acme", [D[1]])  # never a 201 that was not recorded
    assert ledger.status()["state"] == "down" and ledger.errors == 1
    assert ledger.has("acme", D[0])  # still known from memory
    with pytest.raises(LedgerUnavailable):
        ledger.has("acme", D[3])  # a miss cannot be answered: not a false 404
    flaky.broken = False
    with pytest.raises(LedgerUnavailable):  # within a second of the failure: at once
        ledger.has("acme", D[3])
    clock.now += 1.5
    ledger.add("acme", [D[1]])
    assert ledger.status()["state"] == "ok" and S3Ledger(where).has("acme", D[1])


def test_an_unreachable_bucket_at_start_is_down_not_fatal(s3: SeaweedS3) -> None:
    where = S3Location(BUCKET, "t/unreachable", "us-east-1", "http://127.0.0.1:9")
    ledger = S3Ledger(where)
    assert ledger.status()["state"] == "down"
    with pytest.raises(LedgerUnavailable):
        ledger.has("acme", D[0])


def test_a_prefix_holding_something_else_is_refused(s3: SeaweedS3) -> None:
    where = location(s3, "foreign")
    client(where).put_object(
        Bucket=BUCKET, Key=f"{where.prefix}/format", Body=json.dumps({"other": 1}).encode()
    )
    ledger = S3Ledger(where)
    assert ledger.status()["state"] == "down"
    assert "format" in str(ledger.status()["reason"])
    with pytest.raises(LedgerUnavailable):
        ledger.add("acme", [D[0]])


def test_the_layout_is_one_object_per_fact(s3: SeaweedS3) -> None:
    where = location(s3, "layout")
    ledger = S3Ledger(where)
    ledger.mark_whole()  # a walk of everything finished
    ledger.add("acme", [D[0]], repository="acme/app", listed=True)
    keys = {
        k.removeprefix(where.prefix + "/") for k in s3.keys(BUCKET) if k.startswith(where.prefix)
    }
    assert keys == {
        "format",
        f"seen/acme/{D[0]}",
        f"seen/%2Facme%2Fapp/{D[0]}",  # what the repository holds (grants of pull share it)
        f"repos/{name_key('acme/app')}",
        f"walked/{name_key('acme/app')}",
        f"walked/{name_key('/whole')}",
    }
