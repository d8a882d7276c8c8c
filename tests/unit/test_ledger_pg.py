"""The shared ledger in PostgreSQL (addons/storage/postgres.py) against a real server (Debian's
postgresql, a throwaway cluster): records across nodes, credentials, failures and recovery.
The answers it shares with the other ledgers are in tests/unit/test_ledger_s3.py (`any_ledger`)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from addons.storage import postgres as ledger_pg
from addons.storage.ledger import LedgerUnavailable
from addons.storage.postgres import PgLedger, redacted
from addons.storage.spec import is_shared, open_ledger
from tests.support.cutter import Cutter
from tests.support.postgres import PASSWORD, Postgres
from tests.support.stack import wait_for
from tests.unit.test_ledger import racing_admits, racing_reservations, unfinished_uploads_count

D = ["sha256:" + c * 64 for c in "0123456789abcdef"]


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    """libpq's own variable, as a node gets it (never in the URL)."""
    monkeypatch.setenv("PGPASSWORD", PASSWORD)


def test_the_factory_opens_it_and_logs_show_no_secret(postgres: Postgres) -> None:
    url = postgres.database()
    ledger = open_ledger(url)
    assert isinstance(ledger, PgLedger) and ledger.state == "ok" and is_shared(url)
    ledger.close()
    assert redacted("postgresql://u:secret@[::1]:5433/db?sslmode=require") == (
        "postgresql://u@[::1]:5433/db"
    )


def test_a_record_made_on_one_node_is_seen_on_another(postgres: Postgres) -> None:
    url = postgres.database()
    a, b = PgLedger(url), PgLedger(url)  # the first creates the tables, the second finds them
    a.mark_whole()
    b.check()
    assert not b.has("acme", D[0])  # a miss is never cached ...
    a.add("acme", [D[0], D[1], D[0]])
    assert b.has("acme", D[0]) and b.has("acme", D[1])  # ... so B sees A's push at once
    assert not b.has("globex", D[0])  # per tenant
    assert b.recorded.cached(("acme", D[0])) and (b.recorded.hits, b.recorded.misses) == (1, 4)
    a.add("acme", [D[2]], repository="acme/app", listed=True)
    a.add("acme", [D[2]], repository="acme/app", listed=True)  # idempotent
    assert b.has("/acme/app", D[2]) and b.walked("acme/app")
    assert b.repositories("acme/", "", 10) == ["acme/app"]
    assert a.count("acme") == 3 and a.count() == 3  # repositories' own records not counted
    a.close()
    b.close()


def test_names_are_matched_literally_and_in_byte_order(postgres: Postgres) -> None:
    ledger = PgLedger(postgres.database())
    names = ["acme/a_b", "acme/a%b", "acme/aXb", "acme/B", "acme/a", "acmeX/a", "acme_/a"]
    for i, name in enumerate(names):
        ledger.add(name.split("/")[0], [D[i]], repository=name, listed=True)
    # LIKE's wildcards in a prefix match nothing but themselves; "B" sorts before "a" (bytes).
    assert ledger.repositories("acme/", "", 100) == [
        "acme/B", "acme/a", "acme/a%b", "acme/aXb", "acme/a_b"
    ]  # fmt: skip
    assert ledger.repositories("acme/a_", "", 100) == ["acme/a_b"]
    assert ledger.repositories("acme_/", "", 100) == ["acme_/a"]
    ledger.close()


def test_a_wrong_password_is_down_not_fatal(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres.database()
    monkeypatch.setenv("PGPASSWORD", "wrong")
    ledger = PgLedger(url)
    assert ledger.state == "down" and "password authentication failed" in ledger.reason
    with pytest.raises(LedgerUnavailable):
        ledger.has("acme", D[0])
    assert PASSWORD not in ledger.reason and "wrong" not in ledger.reason
    ledger.close()


def test_a_database_that_goes_away_refuses_then_recovers_by_itself(postgres: Postgres) -> None:
    ledger = PgLedger(postgres.database())
    ledger.add("acme", [D[0]])
    postgres.stop()
    try:
        assert ledger.has("acme", D[0])  # held in memory: hits need no database
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable):
            ledger.has("acme", D[1])
        with pytest.raises(LedgerUnavailable):
            ledger.add("acme", [D[1]])  # never a false confirmation
        assert time.monotonic() - started < ledger_pg.CONNECT_TIMEOUT + 1
        assert ledger.state == "down" and ledger.status()["state"] == "down"
    finally:
        postgres.restart()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            ledger.add("acme", [D[1]])
            break
        except LedgerUnavailable:
            time.sleep(0.2)  # fails fast for a second after each failure, then tries again
    assert ledger.state == "ok" and ledger.has("acme", D[1]) and ledger.errors >= 1
    ledger.close()


def test_a_statement_stuck_behind_a_lock_gives_up(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded: a held lock turns into a 503 the client retries, not a hang."""
    monkeypatch.setattr(ledger_pg, "STATEMENT_TIMEOUT_MS", 300)
    url = postgres.database()
    ledger = PgLedger(url)
    with psycopg.connect(url) as other:
        other.execute("LOCK TABLE registry_ledger_seen IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable):
            ledger.add("acme", [D[0]])
        assert time.monotonic() - started < 3
        assert "QueryCanceled" in ledger.reason
    ledger.close()


def test_accounts_sizes_usage_and_push_times(postgres: Postgres) -> None:
    ledger = PgLedger(postgres.database())
    ledger.add("acme", [D[0], D[1]], repository="acme/app")
    ledger.add("globex", [D[0]], repository="globex/app")
    ledger.record_sizes({D[0]: 100, D[1]: 30, D[2]: 7})
    # A shared blob counts in full for each tenant; repositories' own records never count.
    assert ledger.usage("acme") == 130 and ledger.usage("globex") == 100
    assert ledger.usage_all() == {"acme": 130, "globex": 100} and ledger.usage("nobody") == 0
    ledger.record_push("acme/app", D[1], "v1", at=10.0)
    ledger.record_push("acme/app", D[1], None, at=30.0)  # a re-push keeps the first time
    ledger.record_push("acme/app", D[2], "v1", at=40.0)  # the tag moves
    assert ledger.pushes("acme/app") == {
        D[1]: (D[1], 10.0), D[2]: (D[2], 40.0), "v1": (D[2], 40.0)
    }  # fmt: skip
    ledger.close()


def test_admit_counts_confirmations_of_every_node_one_after_the_other(postgres: Postgres) -> None:
    """Four nodes confirming a tenant's uploads at the same moment: exactly the quota."""
    url = postgres.database()
    PgLedger(url).close()  # the tables, once
    admitted = racing_admits(lambda: PgLedger(url))
    check = PgLedger(url)
    assert len(admitted) == 10 and check.usage("acme") == 100
    assert check.admit("acme", admitted[0], 10, limit=100)  # held already: never counts again
    assert not check.admit("acme", D[5], 1, limit=100)  # full: one byte more is refused
    check.close()


def test_unfinished_uploads_count_against_the_quota_on_every_node(postgres: Postgres) -> None:
    ledger = PgLedger(postgres.database())
    unfinished_uploads_count(ledger)
    ledger.close()


def test_reservations_of_every_node_cannot_overshoot(postgres: Postgres) -> None:
    """Four nodes reserving a tenant's upload bytes at the same moment: exactly the quota."""
    url = postgres.database()
    PgLedger(url).close()
    assert len(racing_reservations(lambda: PgLedger(url))) == 10
    check = PgLedger(url)
    assert sum(s + p for s, p in check.uploads("acme").values()) == 100
    check.close()


def test_a_tag_claimed_on_one_node_is_refused_on_another_until_released(
    postgres: Postgres,
) -> None:
    url = postgres.database()
    a, b = PgLedger(url), PgLedger(url)
    key = a.claim_tag("acme/releases/app", "v1")
    assert key is not None
    assert b.claim_tag("acme/releases/app", "v1") is None
    other = b.claim_tag("acme/releases/app", "v2")  # another tag is free
    assert other is not None
    b.release_tag(other)
    a.release_tag(key)
    again = b.claim_tag("acme/releases/app", "v1")
    assert again is not None
    b.close()  # a node gone: its session, and its claims, with it
    # once the server has ended that session (a moment after the close, on a loaded machine)
    wait_for(lambda: a.claim_tag("acme/releases/app", "v1") is not None, 10)
    a.close()


def test_emptied_tables_are_not_whole_and_one_node_rebuilds(postgres: Postgres) -> None:
    """An operator empties the ledger's tables (or restores an older dump): every node's
    health check finds it not whole; the rebuild lock is one node's at a time."""
    url = postgres.database()
    a, b = PgLedger(url), PgLedger(url)
    a.mark_whole()
    b.check()
    assert b.whole and b.status()["state"] == "ok"
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("TRUNCATE registry_ledger_seen, registry_ledger_walked, registry_ledger_repos")
    a.check()
    b.check()
    assert not a.whole and b.status()["state"] == "rebuilding"
    with a.rebuild_lock() as first, b.rebuild_lock() as second:
        assert first and not second
        a.mark_whole()
    b.check()
    assert b.whole


# --- a lost connection is not an outage --------------------------------------------------------


def backend_pids(postgres: Postgres, url: str) -> list[int]:
    """The server sessions of the ledgers on the database of `url`."""
    name = url.rsplit("/", 1)[1]
    out = postgres.sql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'tabbify-registry'"
        f" AND datname = '{name}'"
    )
    return [int(p) for p in out.split()]


def terminate(postgres: Postgres, url: str) -> None:
    """What a fail-over, an idle-connection reaper or an operator does: the server ends the
    ledger's session (and it is gone before this returns)."""
    pids = backend_pids(postgres, url)
    assert pids
    postgres.sql(f"SELECT pg_terminate_backend(p) FROM unnest(ARRAY{pids}) p")
    wait_for(lambda: not set(pids) & set(backend_pids(postgres, url)), 10)


def test_a_session_ended_by_the_server_costs_no_failed_call(postgres: Postgres) -> None:
    url = postgres.database()
    ledger = PgLedger(url)
    ledger.add("acme", [D[0]])
    assert ledger.reserve("acme", "s1", 10, limit=100)
    for call in (  # reads, idempotent writes, and writes that must not run twice: each works
        lambda: ledger.has("acme", D[1]),
        lambda: ledger.add("acme", [D[1]]),
        lambda: ledger.settle("acme", "s1", 4),
        lambda: ledger.reserve("acme", "s1", 5, limit=100),
    ):
        terminate(postgres, url)
        call()
    assert ledger.uploads("acme") == {"s1": (0, 11)}  # 10 - 4 + 5: each applied once
    assert ledger.state == "ok" and ledger.errors == 0 and ledger.reconnects == 4
    ledger.close()


def test_a_server_restart_costs_no_failed_call(postgres: Postgres) -> None:
    url = postgres.database()
    a, b = PgLedger(url), PgLedger(url)  # two workers, both connected before the restart
    a.mark_whole()
    a.add("acme", [D[0]])
    b.add("acme", [D[1]])
    postgres.stop()
    postgres.restart()
    assert a.has("acme", D[1]) and not a.has("acme", D[2])  # their very next calls
    assert b.reserve("acme", "s1", 10, limit=100)
    assert a.state == b.state == "ok" and a.errors == b.errors == 0
    assert a.status()["state"] == "ok"
    a.close()
    b.close()


def test_a_connection_lost_under_a_call_is_retried_when_safe(postgres: Postgres) -> None:
    """Lost while the statement runs (it waits for a lock): a read is run again; so is a
    transaction that had not sent its COMMIT (the server rolled it back): counted once."""
    url = postgres.database()
    ledger = PgLedger(url)
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtextextended('acme', 0))")  # the tenant's

        def reserving() -> object:
            return ledger.reserve("acme", "s1", 10, limit=100)

        with ThreadPoolExecutor(1) as pool:
            reserved = pool.submit(reserving)
            wait_for(lambda: waiting_for_a_lock(postgres, url), 10)
            terminate(postgres, url)
            other.execute("SELECT pg_advisory_unlock_all()")
            assert reserved.result(timeout=10)
        with ThreadPoolExecutor(1) as pool:
            other.execute("BEGIN")
            other.execute("LOCK TABLE registry_ledger_seen IN ACCESS EXCLUSIVE MODE")
            held = pool.submit(ledger.has, "acme", D[0])
            wait_for(lambda: waiting_for_a_lock(postgres, url), 10)
            terminate(postgres, url)
            other.execute("COMMIT")
            assert held.result(timeout=10) is False
    assert ledger.uploads("acme") == {"s1": (0, 10)}
    assert ledger.state == "ok" and ledger.errors == 0 and ledger.reconnects == 2
    ledger.close()


def waiting_for_a_lock(postgres: Postgres, url: str) -> bool:
    name = url.rsplit("/", 1)[1]
    out = postgres.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tabbify-registry'"
        f" AND datname = '{name}' AND wait_event_type = 'Lock'"
    )
    return int(out) > 0


def test_a_write_whose_commit_went_unseen_is_never_counted_twice(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server commits, the acknowledgement is lost with the connection: a write that would
    count twice is not run again (503, applied once); one that leaves the same rows is (no
    503, counted once)."""
    monkeypatch.setattr(ledger_pg, "FAIL_FAST", 0)  # the next call may try again at once
    url = postgres.database()
    check = PgLedger(url)
    cutter = Cutter(postgres.port)
    ledger = PgLedger(url.replace(f":{postgres.port}/", f":{cutter.listen_port}/"))
    assert ledger.state == "ok"

    cutter.arm(b"COMMIT")  # reserve: `pending` grows, so not retried after COMMIT
    with pytest.raises(LedgerUnavailable):
        ledger.reserve("acme", "s1", 10, limit=100)
    assert cutter.cut.is_set() and check.uploads("acme") == {"s1": (0, 10)}  # once

    cutter.arm(b"UPDATE registry_ledger_uploads SET pending")  # settle commits as it ends
    with pytest.raises(LedgerUnavailable):
        ledger.settle("acme", "s1", 4)
    assert cutter.cut.is_set() and check.uploads("acme") == {"s1": (0, 6)}  # released once
    assert not ledger.has("acme", D[0])  # connected again (creating tables commits too)
    errors = ledger.errors

    cutter.arm(b"COMMIT")  # admit: run again, it finds the digest held
    assert ledger.admit("acme", D[0], 30, limit=100, session="s1")
    assert cutter.cut.is_set() and ledger.state == "ok" and ledger.errors == errors
    assert check.usage("acme") == 30 and check.uploads("acme") == {}  # counted once
    ledger.close()
    check.close()
    cutter.close()
