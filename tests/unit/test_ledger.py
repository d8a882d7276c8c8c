"""The ledger: durable (tenant, digest) records."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest

from addons.storage.ledger import LedgerUnavailable
from addons.storage.sqlite import SqliteLedger

D = ["sha256:" + c * 64 for c in "0123456789abcdef"]


def test_records_are_per_tenant_and_survive_reopening(tmp_path):
    path = tmp_path / "ledger" / "ledger.db"
    ledger = SqliteLedger(path)
    ledger.add("acme", [D[0], D[1], D[0]])
    assert ledger.has("acme", D[0]) and not ledger.has("globex", D[0])
    assert ledger.count("acme") == 2
    ledger.close()
    again = SqliteLedger(path)
    assert again.has("acme", D[1]) and not again.has("acme", D[2])


def test_concurrent_writers_lose_nothing(tmp_path):
    ledger = SqliteLedger(tmp_path / "l.db")
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
    ledger = SqliteLedger(tmp_path / "l.db", cache=10)
    ledger.add("acme", [f"sha256:{i:064x}" for i in range(50)])
    assert len(ledger.recorded) == 10
    assert ledger.has("acme", "sha256:" + "0" * 64)  # evicted from the cache, still recorded


# --- a ledger file in trouble: never a false confirmation, recovery without a restart ---------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def records(path) -> set[tuple[str, str]]:
    db = sqlite3.connect(path)
    try:
        return set(db.execute("SELECT tenant, digest FROM seen"))
    finally:
        db.close()


def test_a_deleted_ledger_is_recreated_with_what_the_process_knows(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path)
    ledger.mark_whole()
    ledger.add("acme", [D[0], D[1]])
    path.unlink()  # an operator's mistake: SQLite would go on writing into the unlinked inode
    ledger.add("acme", [D[2]])
    assert path.exists()
    assert records(path) == {("acme", D[0]), ("acme", D[1]), ("acme", D[2])}
    # Other processes knew other records: not whole until rebuilt from the backend.
    assert ledger.recovered == 1 and not ledger.whole
    status = ledger.status()
    assert status["state"] == "rebuilding" and "deleted or replaced" in str(status["reason"])
    ledger.mark_whole()
    assert ledger.whole and ledger.status()["state"] == "ok"


def test_a_replaced_ledger_is_reopened_before_the_next_confirmation(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path)
    ledger.add("acme", [D[0]])
    other = SqliteLedger(tmp_path / "restored.db")
    other.add("globex", [D[5]])
    other.close()
    os.replace(tmp_path / "restored.db", path)  # a restore from backup while running
    ledger.add("acme", [D[1]])
    assert records(path) == {("globex", D[5]), ("acme", D[0]), ("acme", D[1])}
    assert ledger.has("globex", D[5])


def test_a_failing_ledger_refuses_then_recovers_by_itself(tmp_path, monkeypatch):
    clock = Clock()
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path, clock=clock)
    ledger.mark_whole()
    ledger.add("acme", [D[0]])
    broken = {"on": True}
    real_open = SqliteLedger._open

    def flaky_open(self, replaced=False):  # the file cannot be opened while the fault lasts
        if broken["on"]:
            raise sqlite3.OperationalError("unable to open database file")
        return real_open(self, replaced)

    monkeypatch.setattr(SqliteLedger, "_open", flaky_open)
    ledger._failed("disk I/O error")  # as after any failed statement
    with pytest.raises(LedgerUnavailable):
        ledger.add("acme", [D[1]])
    assert ledger.status()["state"] == "down"
    assert ledger.has("acme", D[0])  # still known from memory
    with pytest.raises(LedgerUnavailable):
        ledger.has("acme", D[3])  # a miss cannot be answered: not a false 404
    broken["on"] = False
    with pytest.raises(LedgerUnavailable):  # reopened at most once a second
        ledger.add("acme", [D[1]])
    clock.now += 1.5
    ledger.add("acme", [D[1]])
    assert ledger.status()["state"] == "ok" and ledger.has("acme", D[1])
    assert ("acme", D[1]) in records(path)


def test_a_write_error_marks_the_ledger_down_and_closes_it(tmp_path, monkeypatch):
    ledger = SqliteLedger(tmp_path / "ledger.db")

    class ReadOnly:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, *args):
            raise sqlite3.OperationalError("attempt to write a readonly database")

        executemany = execute

    monkeypatch.setattr(ledger, "_connection", lambda verify: ReadOnly())
    with pytest.raises(LedgerUnavailable, match="readonly"):
        ledger.add("acme", [D[0]])
    assert ledger.status()["state"] == "down" and ledger.errors == 1


def test_walk_progress_is_recorded(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.db")
    assert not ledger.walked("acme/app")
    ledger.mark_walked("acme/app")
    assert ledger.walked("acme/app")
    ledger.close()
    assert SqliteLedger(tmp_path / "ledger.db").walked("acme/app")


def test_sizes_usage_pushes_and_forgetting(tmp_path):
    ledger = SqliteLedger(tmp_path / "l.db")
    ledger.add("acme", [D[0], D[1]], repository="acme/app")
    ledger.add("globex", [D[0]], repository="globex/app")
    ledger.record_sizes({D[0]: 100, D[1]: 30, D[2]: 7})
    assert ledger.sizes([D[0], D[2], D[3]]) == {D[0]: 100, D[2]: 7}
    # A shared blob counts in full for each tenant; repositories' own records never count.
    assert ledger.usage("acme") == 130 and ledger.usage("globex") == 100
    assert ledger.usage_all() == {"acme": 130, "globex": 100}
    assert ledger.usage("nobody") == 0

    ledger.record_push("acme/app", D[1], "v1", at=10.0)
    ledger.record_push("acme/app", D[1], "v2", at=20.0)
    ledger.record_push("acme/app", D[1], None, at=30.0)  # a re-push keeps the first time
    assert ledger.pushes("acme/app") == {D[1]: (D[1], 10.0), "v1": (D[1], 10.0), "v2": (D[1], 20.0)}
    assert sorted(ledger.holdings("/acme/app")) == [D[0], D[1]]

    ledger.forget_manifests("acme/app", [D[1]])
    assert not ledger.has("/acme/app", D[1]) and ledger.has("acme", D[1])
    assert ledger.pushes("acme/app") == {}

    assert ledger.forget([D[0]]) == 4  # acme, globex and both repositories
    assert not ledger.has("acme", D[0]) and not ledger.has("globex", D[0])
    assert ledger.usage_all() == {"acme": 30}
    ledger.close()


def test_admit_decides_and_records_in_one_step(tmp_path):
    ledger = SqliteLedger(tmp_path / "l.db")
    assert ledger.admit("acme", D[0], 60, limit=100)
    assert ledger.has("acme", D[0]) and ledger.usage("acme") == 60
    assert not ledger.admit("acme", D[1], 41, limit=100)  # 101 > 100: nothing added
    assert not ledger.has("acme", D[1]) and ledger.sizes([D[1]]) == {D[1]: 41}
    assert ledger.admit("acme", D[0], 60, limit=10)  # held already: a re-push never counts
    assert ledger.admit("acme", D[2], 40, limit=100)  # reaching the quota exactly is allowed
    assert ledger.usage("acme") == 100
    assert ledger.admit("globex", D[0], 60, limit=60)  # a shared blob counts for each tenant


def racing_admits(open_ledger: Callable[[], Any]) -> list[str]:
    """Four workers (or nodes), each with its own ledger on one store, confirm 40 uploads of
    10 bytes for a tenant with a quota of 100, all at once: the digests admitted."""
    digests = [f"sha256:{i:064x}" for i in range(40)]
    admitted: list[str] = []
    start = threading.Barrier(4)

    def worker(mine: list[str]) -> None:
        ledger = open_ledger()
        start.wait()
        for d in mine:
            if ledger.admit("acme", d, 10, limit=100):
                admitted.append(d)
        ledger.close()

    threads = [threading.Thread(target=worker, args=(digests[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return admitted


def test_uploads_confirmed_at_once_by_several_workers_cannot_overshoot(tmp_path):
    """Each thread has its own SqliteLedger on one file, as each worker process does."""
    path = tmp_path / "l.db"
    SqliteLedger(path).count()  # the schema, once
    assert len(racing_admits(lambda: SqliteLedger(path))) == 10
    assert SqliteLedger(path).usage("acme") == 100


# --- whole or not: a ledger that lost records says so (isolation answers 503, not a 4xx) -----


def whole_ledger(path, clock: Clock | None = None) -> SqliteLedger:
    ledger = SqliteLedger(path, clock=clock or Clock())
    ledger.mark_whole()  # as after the start-up walk
    return ledger


def later(ledger: SqliteLedger) -> None:
    """The next health check, a few seconds on (a failed ledger is retried once a second)."""
    ledger._clock.now += 5  # type: ignore[attr-defined]
    ledger.check()


def test_a_new_ledger_is_not_whole_until_a_walk_of_everything_marks_it(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.db")
    assert not ledger.whole and ledger.status()["state"] == "rebuilding"
    ledger.mark_whole()
    ledger.close()
    assert SqliteLedger(tmp_path / "ledger.db").whole  # the mark is in the file


def test_a_deletion_is_noticed_by_a_read_too(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = whole_ledger(path)
    ledger.add("acme", [D[0]])
    path.unlink()
    assert not ledger.has("acme", D[1])  # a miss: asked of the file at the path, not the old one
    assert path.exists() and not ledger.whole and ledger.recovered == 1


def test_the_health_check_notices_a_deleted_ledger_without_any_request(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = whole_ledger(path)
    path.unlink()
    ledger.check()
    assert ledger.status()["state"] == "rebuilding" and not ledger.whole


def test_a_copy_put_back_from_earlier_is_not_whole(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = whole_ledger(path)
    ledger.close()
    old = tmp_path / "backup.db"
    old.write_bytes(path.read_bytes())  # whole when it was copied
    ledger = SqliteLedger(path)
    assert ledger.whole
    ledger.add("acme", [D[0]])
    os.replace(old, path)  # put back while running: it lacks what was recorded since
    ledger.check()
    assert not ledger.whole and ledger.has("acme", D[0])  # refilled from memory


def test_a_ledger_rebuilt_by_another_worker_is_picked_up(tmp_path):
    path = tmp_path / "ledger.db"
    one, two = whole_ledger(path), SqliteLedger(path)
    assert two.whole
    path.unlink()
    one.check()  # worker 0 notices, rebuilds (walks the backend), marks it
    assert not one.whole
    one.add("acme", [D[0]])
    one.mark_whole()
    two.check()  # the other worker finds the file replaced, and rebuilt since it last looked
    assert two.whole and two.has("acme", D[0]) and two.recovered == 1


def test_a_truncated_ledger_is_not_whole(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = whole_ledger(path)
    ledger.add("acme", [D[0]])
    os.truncate(path, 0)  # same inode, nothing in it
    with pytest.raises(LedgerUnavailable):
        ledger.has("acme", D[1])  # SQLite: no such table
    later(ledger)
    assert not ledger.whole and ledger.status()["state"] == "rebuilding"


def test_a_corrupt_ledger_is_moved_aside_and_started_anew(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = whole_ledger(path)
    ledger.add("acme", [D[0]])
    with open(path, "r+b") as f:
        f.write(os.urandom(100))  # the header: "file is not a database"
    with pytest.raises(LedgerUnavailable):
        ledger.has("acme", D[1])
    later(ledger)
    assert not ledger.whole and ledger.status()["state"] == "rebuilding"
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.glob("*.corrupt-*")] == ["ledger.db"]
    assert records(path) == {("acme", D[0])}  # what this process knew, put back


def test_a_corrupt_file_at_start_is_moved_aside(tmp_path):
    path = tmp_path / "ledger.db"
    path.write_bytes(os.urandom(4096))
    ledger = SqliteLedger(path)
    assert not ledger.whole and ledger.status()["state"] == "rebuilding"
    assert len(list(tmp_path.glob("ledger.db.corrupt-*"))) == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr needs root")
def test_the_health_check_notices_a_read_only_ledger_without_any_request(tmp_path):
    import subprocess

    path = tmp_path / "ledger.db"
    ledger = whole_ledger(path)
    ledger.add("acme", [D[0]])
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        ledger.check()  # nobody pushed: the check writes
        status = ledger.status()
        assert status["state"] == "down" and "read-only" in str(status["reason"])
        with pytest.raises(LedgerUnavailable):
            ledger.add("acme", [D[1]])
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    later(ledger)
    assert ledger.status()["state"] == "ok"


def test_a_push_into_a_ledger_that_lost_records_leaves_the_repository_for_the_walk(tmp_path):
    ledger = SqliteLedger(tmp_path / "ledger.db")  # not whole: the repository's older content is
    ledger.add("acme", [D[0]], repository="acme/app", listed=True)  # for the rebuild to find
    assert not ledger.walked("acme/app") and ledger.repositories("acme/", "", 10) == ["acme/app"]
    ledger.mark_whole()
    ledger.add("acme", [D[1]], repository="acme/new", listed=True)
    assert ledger.walked("acme/new")


def test_only_one_process_holds_the_rebuild_lock(tmp_path):
    one, two = SqliteLedger(tmp_path / "ledger.db"), SqliteLedger(tmp_path / "ledger.db")
    with one.rebuild_lock() as first, two.rebuild_lock() as second:
        assert first and not second
    with two.rebuild_lock() as again:
        assert again


# --- what isolation makes of a miss while the ledger is not whole ---------------------------


class StubWalker:
    """The backend walk: records what `holds` says for a walked repository / tenant; or
    fails like a backend that cannot answer (`fails`)."""

    def __init__(self, ledger: SqliteLedger, holds: dict[str, list[str]]) -> None:
        self.ledger, self.holds, self.fails, self.walks = ledger, holds, False, []

    def repository(self, repo: str) -> int:
        self.walks.append(repo)
        if self.fails:
            raise OSError("backend unreachable")
        self.ledger.add(repo.split("/")[0], self.holds.get(repo, []), repository=repo)
        self.ledger.mark_walked(repo)
        return 0

    def tenant(self, tenant: str) -> int:
        for repo in [r for r in self.holds if r.startswith(tenant + "/")]:
            if not self.ledger.walked(repo):
                self.repository(repo)
        if self.fails:
            raise OSError("backend unreachable")
        return 0


def test_a_miss_in_a_ledger_that_lost_records_is_looked_up_or_503_never_a_no(tmp_path):
    import asyncio

    from addons.gateway.isolation import REBUILDING, TenantIsolation, Unresolved

    path = tmp_path / "ledger.db"
    ledger = whole_ledger(path)
    isolation = TenantIsolation()
    isolation.ledger, isolation.walk_done = ledger, True
    walker = StubWalker(ledger, {"acme/app": [D[0]], "globex/own": [D[1]]})
    isolation.walker = walker  # type: ignore[assignment]
    has = lambda *a: asyncio.run(isolation._has(*a))  # noqa: E731
    assert not has("globex", D[0], "globex/own") and walker.walks == []  # whole: a "no"
    path.unlink()  # lost: nothing this process knew about acme's D[0]
    walker.fails = True
    with pytest.raises(Unresolved):
        has("globex", D[0], "globex/own")  # unknown: 503, not 404
    assert isolation.unavailable(Unresolved("x")) == REBUILDING
    with pytest.raises(Unresolved):
        has("acme", D[0], "acme/app")
    walker.fails = False
    assert has("acme", D[0], "acme/app")  # the owner's: found by walking its repository
    assert not has("globex", D[0], "globex/own")  # walked: as a rebuild would say, a "no"
    path.unlink()  # lost again: what was walked for globex went with it
    walker.walks.clear()
    assert not has("globex", D[0], "globex/own") and "globex/own" in walker.walks


def test_health_names_a_ledger_that_is_down_or_being_rebuilt():
    from addons.admin.health import ledger_health

    ok = {"state": "ok"}
    rebuilding = {"state": "rebuilding", "reason": "the ledger file was deleted or replaced"}
    down = {"state": "down", "reason": "the ledger /x is read-only (disk I/O error)"}
    assert ledger_health([None, None]) == {"ledger": "absent"}
    assert ledger_health([ok, ok]) == {"ledger": "ok"}
    assert ledger_health([ok, rebuilding]) == {
        "ledger": "rebuilding",
        "ledger_reason": "the ledger file was deleted or replaced",
    }
    assert ledger_health([rebuilding, down])["ledger"] == "down"  # fix that first
    assert ledger_health([{"state": "?"}])["ledger"] == "down"


def unfinished_uploads_count(ledger: Any) -> None:
    """Unfinished uploads' bytes count against the quota (`reserve`, `settle`, `admit`),
    a tenant holds a bounded number of them, and they are forgotten when abandoned."""
    t0 = 1_000_000.0
    assert ledger.admit("acme", D[0], 300, limit=1000, now=t0)
    # A chunk of 400 bytes reserved while it is sent, then stored: 700 used.
    assert ledger.reserve("acme", "acme/app@u1", 400, 1000, now=t0)
    ledger.settle("acme", "acme/app@u1", 400, stored=400, now=t0)
    assert ledger.uploads("acme") == {"acme/app@u1": (400, 0)}
    got = ledger.reserve("acme", "acme/app@u2", 300, 1000, now=t0)
    assert got and got.used == 700  # reaching the quota exactly is allowed
    refused = ledger.reserve("acme", "acme/app@u2", 1, 1000, now=t0)
    assert not refused and (refused.reason, refused.used) == ("quota", 1000)
    # What requests in flight hold (not settled yet) is said: room that may come back.
    assert (got.pending, refused.pending) == (0, 300)
    assert ledger.uploads("acme")["acme/app@u2"] == (0, 300)  # nothing added by a refusal
    # A confirmed upload must fit beside the others' bytes in flight.
    assert not ledger.admit("acme", D[1], 1, limit=1000, now=t0)
    # A cancelled upload releases its bytes; a completed one becomes its blob (no double
    # count): u1's 400 stored bytes are now D[2]'s 400.
    ledger.drop_upload("acme", "acme/app@u2")
    done = ledger.admit("acme", D[2], 400, limit=1000, session="acme/app@u1", now=t0)
    assert done and done.used == 300 and ledger.uploads("acme") == {}
    assert ledger.usage("acme") == 700
    # `force` records bytes already sent (a streamed body) even past the quota.
    late = ledger.reserve("acme", "acme/app@u3", 500, 1000, force=True, now=t0)
    assert not late and ledger.uploads("acme") == {"acme/app@u3": (0, 500)}
    ledger.settle("acme", "acme/app@u3", 500, grown=500, now=t0)  # the backend did not say
    assert ledger.uploads("acme") == {"acme/app@u3": (500, 0)}
    assert ledger.uploading_all() == {"acme": 500}
    ledger.settle("acme", "acme/app@gone", 10, stored=10, now=t0)  # unknown: stays unknown
    assert "acme/app@gone" not in ledger.uploads("acme")
    # An upload start reserves a place under a placeholder, renamed once the id is known.
    assert ledger.reserve("acme", "post:1", 0, 1000, now=t0, max_uploads=2)
    ledger.rename_upload("acme", "post:1", "acme/app@u4")
    assert set(ledger.uploads("acme")) == {"acme/app@u3", "acme/app@u4"}
    # At most `max_uploads` sessions: a new one is refused, a known one goes on.
    full = ledger.reserve("acme", "acme/app@u5", 0, 10**9, now=t0, max_uploads=2)
    assert not full and (full.reason, full.uploads) == ("uploads", 2)
    assert ledger.reserve("acme", "acme/app@u4", 0, 10**9, now=t0, max_uploads=2)
    forced = ledger.reserve("acme", "acme/app@u6", 5, 10**9, force=True, now=t0, max_uploads=2)
    assert not forced and "acme/app@u6" not in ledger.uploads("acme")  # `force` is no way around
    assert ledger.reserve("globex", "globex/app@u1", 0, 10**9, now=t0, max_uploads=2)
    # Abandoned: untouched for `age`, forgotten by the next decision of that tenant ...
    later = t0 + 61
    assert ledger.reserve("acme", "acme/app@u5", 300, 1000, now=later, age=60, max_uploads=2)
    assert set(ledger.uploads("acme")) == {"acme/app@u5"}
    # ... or by the periodic sweep, for every tenant.
    assert ledger.expire_uploads(now=later, age=60) == 1  # globex's
    assert ledger.uploads("globex") == {}
    # `upto` (a streamed body): what is left of the quota, at most what was asked.
    ledger.drop_upload("acme", "acme/app@u5")
    part = ledger.reserve("acme", "acme/app@u7", 500, 1000, upto=True, now=later)
    assert part and (part.used, part.granted) == (700, 300)
    none = ledger.reserve("acme", "acme/app@u7", 500, 1000, upto=True, now=later)
    assert not none and (none.reason, none.granted, none.pending) == ("quota", 0, 300)
    assert ledger.uploads("acme") == {"acme/app@u7": (0, 300)}


def test_unfinished_uploads_count_against_the_quota(tmp_path):
    ledger = SqliteLedger(tmp_path / "l.db")
    unfinished_uploads_count(ledger)
    ledger.close()


def racing_reservations(open_ledger: Callable[[], Any]) -> list[str]:
    """Four workers (or nodes), each with its own ledger on one store, reserve 10 bytes in
    40 upload sessions of a tenant with a quota of 100, all at once: the sessions that got
    their bytes."""
    sessions = [f"acme/app@{i}" for i in range(40)]
    reserved: list[str] = []
    start = threading.Barrier(4)

    def worker(mine: list[str]) -> None:
        ledger = open_ledger()
        start.wait()
        for s in mine:
            if ledger.reserve("acme", s, 10, 100):
                reserved.append(s)
        ledger.close()

    threads = [threading.Thread(target=worker, args=(sessions[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return reserved


def test_reservations_made_at_once_by_several_workers_cannot_overshoot(tmp_path):
    path = tmp_path / "l.db"
    SqliteLedger(path).count()
    assert len(racing_reservations(lambda: SqliteLedger(path))) == 10
    assert sum(s + p for s, p in SqliteLedger(path).uploads("acme").values()) == 100
