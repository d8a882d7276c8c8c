"""The ledger: durable (tenant, digest) records."""

from __future__ import annotations

import threading

from addons.ledger import Ledger

D = ["sha256:" + c * 64 for c in "0123456789abcdef"]


def test_records_are_per_tenant_and_survive_reopening(tmp_path):
    path = tmp_path / "ledger" / "ledger.db"
    ledger = Ledger(path)
    ledger.add("acme", [D[0], D[1], D[0]])
    assert ledger.has("acme", D[0]) and not ledger.has("globex", D[0])
    assert ledger.count("acme") == 2
    ledger.close()
    again = Ledger(path)
    assert again.has("acme", D[1]) and not again.has("acme", D[2])


def test_concurrent_writers_lose_nothing(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    digests = [f"sha256:{i:064x}" for i in range(400)]

    def write(tenant: str) -> None:
        for i in range(0, len(digests), 20):
            ledger.add(tenant, digests[i : i + 20])

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b", "c", "d")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [ledger.count(t) for t in "abcd"] == [400] * 4


def test_the_cache_is_bounded(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.CACHE = 10
    ledger.add("acme", [f"sha256:{i:064x}" for i in range(50)])
    assert len(ledger._cache) == 10
    assert ledger.has("acme", "sha256:" + "0" * 64)  # evicted from the cache, still recorded
