"""Connection lifetimes at the front door: slow or idle clients and connection floods.

Two stacks with short limits. With a 2 s head deadline and a 3 s idle timeout, a client that
drips its request head gets 408 and a close, and a silent or idle connection is closed. With
20 connections per client address and 60 in all, a client over its cap gets 503 while other
clients (other loopback source addresses) are still served, and the admin endpoint answers
throughout.
"""

from __future__ import annotations

import json
import select
import time
from collections.abc import Iterator

import pytest
import requests

from tests.support.rawhttp import Conn
from tests.support.stack import Stack, wait_for

# Deadlines of a few seconds measured from outside, and connection counts published once a
# second: in a parallel run, nothing else runs meanwhile (conftest.py).
pytestmark = [pytest.mark.e2e, pytest.mark.alone]

HEADER_TIMEOUT, IDLE_TIMEOUT = 2, 3
PER_CLIENT, TOTAL = 20, 60
PLAIN = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
SLOW_HEADS = 200
PENDING_PER_CLIENT = 32  # REGISTRY_MAX_CLIENT_PENDING's default


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, auth) -> Iterator[Stack]:
    """Short timeouts."""
    s = Stack(
        tmp_path_factory.mktemp("conn") / "data",
        auth.url,
        REGISTRY_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        REGISTRY_IDLE_TIMEOUT=str(IDLE_TIMEOUT),
    ).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, auth) -> Iterator[Stack]:
    """Small connection caps (and timeouts long enough not to interfere). One worker: the
    caps are the node's, split between workers, and the kernel spreads connections over them
    by hash, so only with one is the 21st connection of a client exactly the one refused."""
    s = Stack(
        tmp_path_factory.mktemp("cap") / "data",
        auth.url,
        REGISTRY_WORKERS="1",
        REGISTRY_MAX_CLIENT_CONNECTIONS=str(PER_CLIENT),
        REGISTRY_MAX_CONNECTIONS=str(TOTAL),
    ).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Anonymous (GET /v2/ is 200), one worker, 200 connections in all: a front door's
    capacity shrunk so that 200 connections from one address would fill it."""
    s = Stack(
        tmp_path_factory.mktemp("front") / "data",
        None,
        REGISTRY_WORKERS="1",
        REGISTRY_MAX_CONNECTIONS=str(SLOW_HEADS),
    ).start()
    yield s
    s.stop()


def seconds_until_closed(conn: Conn) -> float:
    started = time.monotonic()
    assert conn.closed()
    return time.monotonic() - started


def served(stack: Stack, source: str) -> int:
    conn = Conn(stack.port, source=source)
    try:
        conn.send(PLAIN)
        answer = conn.read_answer()
        return answer.status if answer else 0
    finally:
        conn.close()


def test_a_head_dripped_byte_by_byte_is_cut_off_with_408(stack):
    conn = Conn(stack.port)
    try:
        conn.send(b"GET /v2/ HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        # One byte every 0.3 s: never idle, never done, until the gateway answers.
        while time.monotonic() - started < HEADER_TIMEOUT + 5:
            if select.select([conn.sock], [], [], 0.3)[0] or not conn.send(b"a"):
                break
        elapsed = time.monotonic() - started
        answer = conn.read_answer()
    finally:
        conn.close()
    assert answer is not None and answer.status == 408, answer
    assert json.loads(answer.body)["errors"][0]["code"]
    assert HEADER_TIMEOUT <= elapsed < HEADER_TIMEOUT + 2.5, elapsed


def test_a_silent_connection_is_closed_after_the_head_deadline(stack):
    conn = Conn(stack.port)
    try:
        waited = seconds_until_closed(conn)
    finally:
        conn.close()
    assert HEADER_TIMEOUT - 0.5 <= waited < HEADER_TIMEOUT + 2.5, waited


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(stack):
    conn = Conn(stack.port)
    try:
        conn.send(PLAIN)
        assert conn.read_answer().status == 401
        # Still usable just before the deadline, once; then idle until closed.
        time.sleep(IDLE_TIMEOUT - 1.5)
        conn.send(PLAIN)
        assert conn.read_answer().status == 401
        waited = seconds_until_closed(conn)
    finally:
        conn.close()
    assert IDLE_TIMEOUT - 0.5 <= waited < IDLE_TIMEOUT + 2.5, waited


def test_one_client_over_its_cap_does_not_starve_the_others(capped):
    stack = capped
    held = [Conn(stack.port) for _ in range(PER_CLIENT)]
    try:
        # The workers publish their counts once a second; a loaded machine can lag a few.
        wait_for(lambda: open_connections(stack) >= PER_CLIENT, 15)
        assert served(stack, "127.0.0.1") == 503
        assert served(stack, "127.0.0.2") == 401  # another client: served as usual
        health = requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}/healthz", timeout=5)
        assert health.status_code == 200
    finally:
        for conn in held:
            conn.close()
    # Admitted again once it lets go: as soon as the worker has seen the closes (a loaded
    # machine may take longer than a fixed half second).
    wait_for(lambda: served(stack, "127.0.0.1") == 401, 5)


def connection_counts(stack: Stack) -> tuple[int, int]:
    """(open, refused so far) as the admin endpoint reports them (published once a second)."""
    metrics = requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}/metrics", timeout=5).text

    def value(name: str) -> int:
        [line] = [x for x in metrics.splitlines() if x.startswith(name + " ")]
        return int(line.split()[1])

    return value("tabbify_client_connections"), value("tabbify_connections_refused_total")


def open_connections(stack: Stack) -> int:
    return connection_counts(stack)[0]


def test_the_total_cap_answers_503_and_recovers(capped):
    stack = capped
    sources = [f"127.0.0.{i}" for i in range(5, 5 + TOTAL // PER_CLIENT)]  # unused so far
    _, refused_before = connection_counts(stack)
    held = [Conn(stack.port, source=src) for src in sources for _ in range(PER_CLIENT)]
    try:
        # Every held connection is admitted or refused (a connection of an earlier test that
        # the gateway has not seen closed yet may hold one place): the cap is reached.
        def full() -> bool:
            open_now, refused = connection_counts(stack)
            return open_now == TOTAL and open_now + refused - refused_before >= TOTAL

        wait_for(full, 10)
        conn = Conn(stack.port, source="127.0.0.9")
        try:
            conn.send(PLAIN)
            answer = conn.read_answer()
        finally:
            conn.close()
        assert answer is not None and answer.status == 503
        assert json.loads(answer.body)["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert answer.header("retry-after") == "1"
        metrics = requests.get(f"http://{stack.env['REGISTRY_ADMIN_ADDR']}/metrics", timeout=5)
        assert "tabbify_connections_refused_total" in metrics.text
    finally:
        for c in held:
            c.close()
    time.sleep(0.5)
    assert served(stack, "127.0.0.9") == 401


def test_a_down_backend_gives_complete_answers_even_to_head(stack, acme_jwt):
    tok = requests.get(f"{stack.url}/auth/token", auth=("x", acme_jwt), timeout=10).json()["token"]
    stack.supervisorctl("stop", "backend")
    try:
        for method in ("HEAD", "GET", "HEAD"):
            conn = Conn(stack.port)
            try:
                conn.send(
                    f"{method} /v2/acme/app/manifests/v1 HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {tok}\r\n\r\n".encode()
                )
                answer = conn.read_answer(method)
            finally:
                conn.close()
            assert answer is not None and answer.status == 502, (method, answer)
            if method == "HEAD":
                assert answer.body == b""
            else:
                assert json.loads(answer.body)["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        stack.supervisorctl("start", "backend")


def test_slow_heads_from_one_address_do_not_lock_out_other_clients(front):
    """200 half-sent request heads from one address (no token, never finished), taking every
    place at first: within a few seconds a new client from another address is served. Before
    a source's slow heads had a cap of their own, the 200 kept every place (until the 60 s
    head deadline) and every new client got 503."""
    held = [Conn(front.port, source="127.0.0.1") for _ in range(SLOW_HEADS)]
    try:
        for conn in held:
            conn.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        wait_for(lambda: served(front, "127.0.0.20") == 200, 8, interval=0.5)
        # The one address keeps its first places; the rest were closed with the cap's 503.
        cut = [c for c in held if select.select([c.sock], [], [], 0)[0]]
        assert len(cut) == SLOW_HEADS - PENDING_PER_CLIENT
        answer = cut[-1].read_answer()
        assert answer is not None and answer.status == 503, answer
        assert json.loads(answer.body)["errors"][0]["code"] == "TOOMANYREQUESTS"
        # A head finished before the deadline is answered: the slow client was only slow.
        assert held[0].send(b"x\r\n\r\n")
        assert held[0].read_answer().status == 200
    finally:
        for conn in held:
            conn.close()
