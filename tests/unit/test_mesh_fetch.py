"""The coordinator exchange is bounded: a raw TCP server on loopback answers the way a broken or
hostile coordinator would (huge, slow, redirecting, not JSON...), and the client gives up within
its deadline and size cap with a reason, never following, never hanging."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mesh import fetch
from mesh.coordinator import Coordinator, CoordinatorUnusable, JoinRequest
from mesh.model import NodeState

OWN = base64.b64encode(bytes(range(3, 35))).decode()
KEY = base64.b64encode(bytes(range(1, 33))).decode()
STATE = NodeState("n-1", "fd5a:1f02:0:1::1", "fd5a:1f02::/32", 51820)
Behaviour = Callable[[socket.socket], None]


def http(status: int, body: bytes, *headers: str, length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *headers, "Connection: close"]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@contextlib.contextmanager
def server(behaviour: Behaviour) -> Iterator[str]:
    """A one-behaviour HTTP server; yields its base URL."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:  # shut down: the test is over
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)  # the request (small)
                    behaviour(conn)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            srv.shutdown(socket.SHUT_RDWR)  # wakes accept() at once
        srv.close()
        thread.join(5)


def send(data: bytes) -> Behaviour:
    return lambda conn: conn.sendall(data)


def drip(data: bytes, every: float) -> Behaviour:
    def behaviour(conn: socket.socket) -> None:
        for i in range(len(data)):
            conn.sendall(data[i : i + 1])
            time.sleep(every)

    return behaviour


def peers_json(n: int = 1) -> bytes:
    peer = {"public_key": KEY, "endpoint": "10.0.0.2:51820", "allowed_ips": ["fd5a:1f02:0:2::1"]}
    return json.dumps({"peers": [peer] * n}).encode()


# --- fetch -------------------------------------------------------------------------------------


def test_a_normal_answer_is_returned_whole():
    with server(send(http(200, peers_json()))) as url:
        answer = fetch.request("GET", url + "/x")
    assert answer.status == 200 and json.loads(answer.body)["peers"][0]["public_key"] == KEY


def test_a_declared_huge_body_is_refused_before_reading_it():
    huge = http(200, b"", "Content-Length: 52428800", length=False)  # 50 MiB announced
    with server(send(huge)) as url, pytest.raises(fetch.FetchError, match="52428800 bytes"):
        fetch.request("GET", url)


def test_an_undeclared_huge_body_is_cut_at_the_cap():
    def endless(conn: socket.socket) -> None:
        conn.sendall(http(200, b"", length=False) + b'{"peers": [')
        chunk = b" " * 65536
        for _ in range(50 * 16):  # 50 MiB if nobody stops reading
            conn.sendall(chunk)

    started = time.monotonic()
    with server(endless) as url, pytest.raises(fetch.FetchError, match="larger than"):
        fetch.request("GET", url, max_bytes=1 << 20)
    assert time.monotonic() - started < 5


def test_a_slow_drip_body_hits_the_overall_deadline():
    body = peers_json()
    with server(drip(http(200, body), 0.05)) as url:  # every read is quick; the whole is not
        started = time.monotonic()
        with pytest.raises(fetch.FetchError, match="within 1s"):
            fetch.request("GET", url, deadline=1.0)
    assert time.monotonic() - started < 2


def test_slow_dripped_headers_hit_the_overall_deadline():
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: y\r\n" % i for i in range(90))
    with server(drip(head, 0.05)) as url:
        started = time.monotonic()
        with pytest.raises(fetch.FetchError, match="within 1s"):
            fetch.request("GET", url, deadline=1.0)
    assert time.monotonic() - started < 2


def test_a_server_that_never_answers_hits_the_deadline():
    silent = server(lambda conn: conn.recv(1))  # waits for the client to give up
    with silent as url, pytest.raises(fetch.FetchError, match=r"within 0\.5s"):
        fetch.request("GET", url, deadline=0.5)


def test_a_redirect_is_returned_not_followed():
    followed: list[bool] = []
    with (
        server(send(b"should not be asked")) as other,
        server(send(http(302, b"", f"Location: {other}/v1/nodes"))) as url,
    ):
        answer = fetch.request("GET", url)
        followed.append(answer.status == 302 and answer.location == f"{other}/v1/nodes")
    assert followed == [True]


def test_connection_refused_and_garbage_http_are_fetch_errors():
    port = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    with pytest.raises(fetch.FetchError, match="unreachable"):
        fetch.request("GET", url)
    with server(send(b"SSH-2.0-OpenSSH\r\n")) as url, pytest.raises(fetch.FetchError):
        fetch.request("GET", url)
    with server(send(b"")) as url, pytest.raises(fetch.FetchError):
        fetch.request("GET", url)
    with pytest.raises(fetch.FetchError, match="invalid URL"):
        fetch.request("GET", "ftp://x/")


# --- the coordinator client --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (http(200, b"<html>maintenance</html>"), "without JSON"),
        (http(200, b"\xff\xfe garbage"), "without JSON"),
        (http(200, b"[" * 100_000 + b"]" * 100_000), "without JSON"),  # nesting bomb
        (http(200, b"[]"), "not a JSON object"),
        (http(200, b"null"), "not a JSON object"),
        (http(200, b'{"peers": "all"}'), "peers is not a list"),
        (http(200, b'{"peers": [1, 2]}'), "none of the 2 peers"),
        (http(503, b"{}"), "503"),
        (http(500, b""), "500"),
        (http(302, b"", "Location: http://elsewhere/"), "redirect"),
        (http(418, b"{}"), "418"),
    ],
)
def test_every_kind_of_bad_peers_answer_is_unusable(answer, reason):
    with server(send(answer)) as url, pytest.raises(CoordinatorUnusable, match=reason):
        Coordinator(url, "k").peers(STATE, OWN)


def test_a_refused_key_an_unknown_node_and_an_unreachable_coordinator_are_told_apart():
    with server(send(http(401, b"{}"))) as url, pytest.raises(CoordinatorUnusable) as refused:
        Coordinator(url, "k").peers(STATE, OWN)
    assert refused.value.auth_refused and refused.value.answered
    unknown = pytest.raises(CoordinatorUnusable, match="does not know this node")
    with server(send(http(404, b"{}"))) as url, unknown:
        Coordinator(url, "k").peers(STATE, OWN)
    with server(send(b"")) as url, pytest.raises(CoordinatorUnusable) as unreachable:
        Coordinator(url, "k").peers(STATE, OWN)
    assert not unreachable.value.answered


def test_a_join_answer_with_a_bad_identity_is_unusable_but_bad_peers_are_only_skipped():
    good = {
        "node_id": "n-1",
        "ula": "fd5a:1f02:0:1::1",
        "prefix": "fd5a:1f02::/32",
        "listen_port": 51820,
        "peers": [
            {"public_key": KEY, "endpoint": "10.0.0.2:51820", "allowed_ips": []},
            {"public_key": OWN, "endpoint": "10.0.0.3:51820", "allowed_ips": []},
        ],
    }
    request = JoinRequest(OWN, "h", None, None)
    with server(send(http(200, json.dumps(good).encode()))) as url:
        joined = Coordinator(url, "k").join(request)
    assert [p.public_key for p in joined.state.peers] == [KEY]
    assert "own key" in joined.skipped[0].reason
    bad = {**good, "ula": "fd00::1"}
    refused = pytest.raises(CoordinatorUnusable, match="join answer refused")
    with server(send(http(200, json.dumps(bad).encode()))) as url, refused:
        Coordinator(url, "k").join(request)
