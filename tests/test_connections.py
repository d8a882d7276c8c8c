"""The pure parts of connection handling: head checks, lifetimes, caps (addons/connections.py,
addons/hardening.py). End to end: test_e2e_connections.py."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from addons import connections
from addons.hardening import MAX_HEADERS, head_problem
from tabbify_registry import admin


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
    assert limits.admit("a") and limits.admit("a")
    assert not limits.admit("a")
    assert limits.admit("b")
    assert not limits.admit("c")
    assert limits.refused == 2
    limits.release("a")
    assert limits.admit("c")
    for client in ("a", "b", "c"):
        limits.release(client)
    assert limits.count == 0 and not limits.open


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0", "1e999", "x", ""])
def test_capture_parameters_must_be_finite_and_positive(value):
    assert admin.positive(value) is None


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
