"""The pure parts of connection handling: head checks, lifetimes, caps (engine/connections.py,
addons/engine/framing.py). End to end: e2e/test_connections.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from addons.admin import capture
from addons.admin import program as admin
from addons.engine import connections
from addons.engine.framing import MAX_HEADERS, head_problem


def request_with(fields: list[tuple[bytes, bytes]]) -> http.Request:
    return tutils.treq(headers=http.Headers(fields))


def test_a_plain_head_passes():
    assert head_problem(request_with([(b"Host", b"x"), (b"Accept", b"*/*\t ok")])) is None


def test_more_than_the_header_limit_is_431():
    fields = [(b"X-%d" % i, b"v") for i in range(MAX_HEADERS + 1)]
    assert head_problem(request_with(fields))[0] == 431
    assert head_problem(request_with(fields[:MAX_HEADERS])) is None


@pytest.mark.parametrize(
    "field",
    [
        (b"X-A", b"a\r\n b"),  # obs-fold as mitmproxy keeps it
        (b"X-A", b"a\rb"),
        (b"X-A", b"a\x00b"),
        (b"X-A", b"a\x7f"),
        (b"Bad Name", b"x"),
        (b"X(A)", b"x"),
    ],
)
def test_a_field_another_parser_reads_differently_is_400(field):
    assert head_problem(request_with([field]))[0] == 400


def server(state: str = "read_headers", first: bool = False, waiting: float | None = 0.0,
           head: float | None = None) -> SimpleNamespace:  # fmt: skip
    s = SimpleNamespace(tbf_first=first, tbf_waiting_since=waiting, tbf_head_since=head)
    s.read_headers = "read_headers"
    s.state = state
    return s


def test_a_connection_in_the_middle_of_an_exchange_never_expires_here():
    assert connections.expired(server("read_body"), 1e9, 60, 75) is None


def test_a_head_in_progress_gets_408_after_the_header_timeout():
    assert connections.expired(server(head=0.0), 59, 60, 75) is None
    assert connections.expired(server(head=0.0), 61, 60, 75) == 408


def test_an_idle_connection_is_closed_after_the_idle_timeout_or_the_first_deadline():
    assert connections.expired(server(waiting=0.0), 70, 60, 75) is None
    assert connections.expired(server(waiting=0.0), 76, 60, 75) == 0
    assert connections.expired(server(waiting=0.0, first=True), 61, 60, 75) == 0


def test_limits_per_client_and_in_total():
    limits = connections.Limits(total=3, per_client=2)
    a1, a2, a3, b, c = ("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1)
    assert limits.admit(a1, 0) and limits.admit(a2, 0)
    assert not limits.admit(a3, 0)
    assert limits.admit(b, 0)
    assert not limits.admit(c, 0)
    assert limits.refused == 2
    limits.release(a1)
    assert limits.admit(c, 0)
    for peer in (a2, b, c):
        limits.release(peer)
    assert limits.count == 0 and not limits.open and not limits.pending


def test_slow_heads_of_one_source_hold_only_its_pending_places():
    """Connections whose first head has taken over SLOW_HEAD: a lower cap per source, on new
    connections and (through the sweeper) on those already open. A burst is not slow."""
    slow = connections.SLOW_HEAD + 0.1
    limits = connections.Limits(total=100, per_client=10, per_client_pending=3)
    burst = [("10.0.0.1", port) for port in range(1, 6)]
    assert all(limits.admit(p, 0) for p in burst)  # five at once: admitted
    assert limits.excess(1.0) == []  # not slow yet
    assert limits.excess(slow) == burst[3:]  # its first three keep their places
    assert not limits.admit(("10.0.0.1", 9), slow)  # more from that source: refused
    assert limits.admit(("10.0.0.2", 1), slow)  # another source: admitted
    limits.head_done(burst[0])
    limits.head_done(burst[0])  # reported once per connection, counted once
    for peer in burst[3:]:
        limits.release(peer)  # the sweeper closed them
    assert limits.excess(slow) == []
    assert limits.admit(("10.0.0.1", 10), slow)
    for peer in (*burst[:3], ("10.0.0.2", 1), ("10.0.0.1", 10)):
        limits.release(peer)
    assert limits.count == 0 and not limits.open and not limits.pending


@pytest.mark.parametrize(
    ("host", "source"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("127.0.0.2", "127.0.0.2"),  # every loopback address its own (tests)
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9%eth0", "2001:db8:1:2::/64"),  # one /64: one source
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4 on a dual-stack socket
        ("::1", "::/64"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_the_source_of_a_connection(host, source):
    assert connections.source_of(host) == source


def test_a_worker_share_of_a_node_cap_leaves_room_for_an_uneven_spread():
    from addons.cli.programs import worker_share

    assert worker_share(256, 1) == 256 and worker_share(0, 4) == 0
    assert 128 < worker_share(256, 2) < 256
    assert 32 < worker_share(256, 8) < 64
    assert worker_share(1, 8) == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "1e999", "x", ""])
def test_capture_parameters_must_be_finite_and_positive(value):
    assert capture.positive(value) is None


@pytest.mark.parametrize("query", ["seconds=nan", "seconds=inf", "max_mb=-1", "seconds=0"])
def test_a_bad_capture_request_is_400_and_starts_nothing(query, tmp_path):
    args = admin.parse_args(
        ["--listen", "127.0.0.1:1", "--backend", "http://127.0.0.1:1",
         "--state-dir", str(tmp_path / "state"), "--capture-dir", str(tmp_path / "cap")]
    )  # fmt: skip
    (tmp_path / "state").mkdir()
    endpoint = admin.Admin(args)
    status, _, _ = asyncio.run(endpoint.route("POST", f"/capture?{query}"))
    assert status == 400 and not (tmp_path / "state" / "capture.json").exists()
    status, _, body = asyncio.run(endpoint.route("POST", "/capture?seconds=5&max_mb=2"))
    assert status == 200 and json.loads(body)["active"]
    request = json.loads((tmp_path / "state" / "capture.json").read_text())
    assert request["max_bytes"] == 2 * 1024 * 1024


def _read_chunked(data: bytes, step: int) -> tuple[bytes, str]:
    """The body the gateway's chunked reader takes from `data` fed `step` bytes at a time, and
    how it ended: "end", "waiting", or "400" (a protocol error: the gateway answers 400)."""
    import h11
    from h11._receivebuffer import ReceiveBuffer

    from addons.engine.hardening import BoundedChunkedReader

    reader, buf, body = BoundedChunkedReader(), ReceiveBuffer(), b""
    try:
        for i in range(0, len(data), step):
            buf += data[i : i + step]
            while (event := reader(buf)) is not None:
                if isinstance(event, h11.EndOfMessage):
                    assert not event.headers  # a trailer section is dropped
                    return body, "end"
                body += bytes(event.data)
    except h11.ProtocolError:
        return b"", "400"
    return body, "waiting"


@pytest.mark.parametrize(
    ("data", "outcome"),
    [
        (b"5\r\nhello\r\n0\r\n\r\n", "end"),
        (b'5;a=b;c="x y"\r\nhello\r\n3; d = "\\""\r\nabc\r\n0\r\nX: y\r\nZ: w\r\n\r\n', "end"),
        (b"3 ;d\r\nabc\r\n0\r\n\r\n", "400"),
        (b"5\r\nhello\r\n0\r\nX: y\nZ: w\r\n\r\n", "400"),
        (b"5\r\nhello\r\n0\r\nX: a\rb\r\n\r\n", "400"),
        (b"5\nhello\n0\n\n", "400"),
        (b"5 \r\nhello", "400"),
        (b"5\rhello\r\n", "400"),
        (b"5\r\nhelloX", "400"),
        (b"F" * 17 + b"\r\n", "400"),
        (b"5;" + b"a" * 70_000, "400"),
    ],
)
def test_a_chunked_body_read_byte_by_byte_is_judged_as_in_one_read(data, outcome):
    results = {step: _read_chunked(data, step) for step in (1, 7, len(data))}
    assert {r[1] for r in results.values()} == {outcome}, results
    assert len({r[0] for r in results.values()}) == 1
