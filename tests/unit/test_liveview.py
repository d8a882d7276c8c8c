"""The live view without a stack: the worker's feed (ring, redaction, sends that never block,
drops counted), the admin program's ring, overview and filters, the flow file, and the admin
endpoint's Host/Origin/CSRF checks as plain HTTP requests against the real program."""

from __future__ import annotations

import asyncio
import http.client as httpclient
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy import io as mitmio
from mitmproxy.test import tflow, tutils

from addons.admin import http as adminhttp
from addons.admin.flowexport import flow_file
from addons.admin.flows import Filters, FlowRing, Overview
from addons.admin.liveview import LiveView, Viewer
from addons.decisions import redact
from addons.gateway import flowfeed
from addons.gateway.accesslog import AccessLog
from addons.gateway.capture import redacted
from addons.gateway.flowfeed import FlowFeed
from tests.support.stack import ROOT, free_port, wait_for

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhY21lIn0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"


def finished_flow(
    path: str = "/v2/acme/app/manifests/v1",
    headers: list[tuple[bytes, bytes]] | None = None,
    status: int = 200,
    error: bool = False,
) -> http.HTTPFlow:
    fields = [(b"host", b"127.0.0.1:5000"), *(headers or [])]
    request = tutils.treq(method=b"GET", path=path.encode(), headers=http.Headers(fields))
    response = tutils.tresp(
        status_code=status,
        headers=http.Headers([(b"content-type", b"application/json"), (b"set-cookie", b"s=1")]),
    )
    flow = tflow.tflow(req=request, resp=response, err=error)
    AccessLog(out=io.StringIO()).response(flow)  # the line the feed takes
    return flow


# --- the worker's feed ----------------------------------------------------------------------


def test_a_snapshot_is_redacted_exactly_as_a_capture():
    flow = finished_flow(
        f"/v2/acme/app/manifests/v1?x={JWT}",
        [
            (b"authorization", f"Bearer {JWT}".encode()),
            (b"cookie", b"session=abc"),
            (b"user-agent", f"agent {JWT} <b>x</b>".encode()),
        ],
    )
    feed = FlowFeed()
    feed.response(flow)
    [snap] = feed.ring
    summary = flowfeed.summary(snap, worker=3)
    captured = redacted(flow)
    assert summary["target"] == captured.request.path
    assert summary["request_headers"] == [
        [k.decode(), v.decode()] for k, v in captured.request.headers.fields
    ]
    assert summary["response_headers"] == [
        [k.decode(), v.decode()] for k, v in captured.response.headers.fields
    ]
    text = json.dumps(summary)
    assert JWT not in text and JWT.split(".")[2] not in text and "abc" not in text
    assert "Bearer" not in text and "s=1" not in text
    assert ["user-agent", "agent REDACTED <b>x</b>"] in summary["request_headers"]
    assert summary["worker"] == 3 and summary["tenant"] is None and summary["status"] == 200


def test_headers_without_secrets_are_kept_as_they_are():
    fields = ((b"host", b"x"), (b"accept", b"*/*"))
    assert redact.fields(fields) is fields  # the common case allocates nothing


NAMES = st.sampled_from(
    [b"Authorization", b"cookie", b"Set-Cookie", b"PROXY-AUTHORIZATION", b"accept", b"x-cookie",
     b"user-agent", b"authorization-x", b"host"]
) | st.binary(min_size=1, max_size=12)  # fmt: skip
VALUES = st.sampled_from([b"", b"eyJ", JWT.encode(), b"cookie", b"x\x00cookie"]) | st.binary(
    max_size=40
)


@given(st.lists(st.tuples(NAMES, VALUES), max_size=8))
def test_the_one_pass_scan_never_misses_a_credential(headers):
    fields = tuple(headers)
    suspect, size = redact.scan(fields)
    assert size == sum(len(n) + len(v) for n, v in fields)
    if redact.replaced(fields) != fields:
        assert suspect
    assert redact.fields(fields) == redact.replaced(fields)


def test_a_huge_head_becomes_a_bounded_snapshot():
    big = [(f"x-h{i}".encode(), b"v" * 1000) for i in range(90)]
    flow = finished_flow(headers=big)
    feed = FlowFeed()
    feed.response(flow)
    summary = flowfeed.summary(feed.ring[0], 0)
    size = sum(len(k) + len(v) for k, v in summary["request_headers"])
    assert size <= flowfeed.MAX_HEADER_BYTES and summary["truncated"]


def test_a_flow_is_kept_once_even_when_it_errors_after_its_response():
    flow = finished_flow()
    feed = FlowFeed()
    feed.response(flow)
    flow.error = tflow.terr()
    feed.error(flow)
    assert len(feed.ring) == 1


def test_the_ring_is_bounded_and_nothing_is_sent_while_nobody_looks(tmp_path):
    feed = FlowFeed(backlog=5)
    for _ in range(12):
        feed.response(finished_flow())
    assert len(feed.ring) == 5 and [s[0] for s in feed.ring] == [8, 9, 10, 11, 12]
    assert not feed.streaming and feed.send_pending() == 0
    assert feed.dropped == 0  # evictions while nobody looks are not losses


def receiver(path: Path, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def received(sock: socket.socket) -> list[dict]:
    """The flows of every datagram waiting: a head line, then `brief TAB headers[ TAB bodies]`
    lines."""
    flows = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return flows
        head, *lines = data.split(b"\n")
        assert isinstance(json.loads(head)["pid"], int)
        for line in lines:
            brief, headers, *kept = line.split(b"\t")
            flows.append({**json.loads(brief), **json.loads(headers)})
            flows[-1].update(*(json.loads(k) for k in kept))


def test_a_viewer_gets_the_backlog_after_what_it_has_then_each_new_flow(tmp_path):
    sock = receiver(tmp_path / "s")
    feed = FlowFeed(backlog=10)
    for _ in range(4):
        feed.response(finished_flow())
    feed.start(str(tmp_path / "s"), seen=1)  # the admin program holds flow 1 already
    assert feed.send_pending() == 3
    assert [f["seq"] for f in received(sock)] == [2, 3, 4]
    feed.response(finished_flow(status=404))
    assert feed.send_pending() == 1
    [flow] = received(sock)
    assert flow["seq"] == 5 and flow["status"] == 404
    assert feed.send_pending() == 0
    feed.stop()


def test_a_full_socket_defers_the_rest_to_the_next_tick(tmp_path):
    sock = receiver(tmp_path / "s", rcvbuf=4096)
    feed = FlowFeed(backlog=5000)
    for _ in range(300):
        feed.response(finished_flow(headers=[(b"x-pad", b"p" * 500)]))
    feed.start(str(tmp_path / "s"))
    seqs: list[int] = []
    for _ in range(200):  # ticks, the admin program reading in between
        feed.send_pending()
        seqs += [f["seq"] for f in received(sock)]
        if feed.cursor == feed.seq:
            break
    assert seqs == list(range(1, 301)) and feed.dropped == 0 and feed.sent == 300
    feed.stop()
    sock.close()


def test_a_lagging_admin_program_costs_dropped_flows_never_a_blocked_loop(tmp_path):
    sock = receiver(tmp_path / "s", rcvbuf=4096)  # and it never reads
    feed = FlowFeed(backlog=500)
    feed.start(str(tmp_path / "s"))
    total = 0
    started = time.monotonic()
    for _ in range(20):
        for _ in range(200):
            feed.response(finished_flow(headers=[(b"x-pad", b"p" * 500)]))
        total += 200
        feed.send_pending()
    assert time.monotonic() - started < 30  # nothing waited for the reader
    assert feed.dropped > 0
    assert feed.sent + feed.dropped + (feed.seq - feed.cursor) == total  # every flow accounted
    assert feed.status() == {"streaming": True, "sent": feed.sent, "dropped": feed.dropped}
    feed.stop()
    sock.close()


def test_flows_the_ring_let_go_before_they_were_sent_are_counted(tmp_path):
    sock = receiver(tmp_path / "s")
    feed = FlowFeed(backlog=3)
    feed.start(str(tmp_path / "s"))
    for _ in range(5):  # the sender did not run in between
        feed.response(finished_flow())
    assert feed.dropped == 2
    assert feed.send_pending() == 3 and [f["seq"] for f in received(sock)] == [3, 4, 5]
    feed.stop()


def test_the_worker_follows_the_admin_programs_request(tmp_path):
    feed = FlowFeed()
    feed.follow({"until": time.time() + 5, "seen": {}}, tmp_path, 1)
    assert feed.streaming and feed.target == str(tmp_path / flowfeed.SOCKET_NAME)
    feed.follow({"until": time.time() + 5}, tmp_path, 1)
    assert feed.streaming
    feed.follow({"until": 0}, tmp_path, 1)
    assert not feed.streaming and feed.sock is None
    feed.follow(None, tmp_path, 1)
    assert not feed.streaming


# --- the admin program's side -----------------------------------------------------------------


def test_the_ring_is_bounded_and_counts_what_it_let_go():
    ring = FlowRing(capacity=3)
    for i in range(5):
        ring.add({"seq": i})
    assert [e.id for e in ring.entries] == [3, 4, 5] and ring.evicted == 2
    assert ring.get(2) is None and ring.get(4).flow["seq"] == 3
    assert [e.id for e in ring.after(3, 10)] == [4, 5]
    assert [e.id for e in ring.after(0, 2)] == [4, 5]  # the newest
    assert ring.after(5, 10) == []


def test_a_slow_viewer_loses_flows_and_is_told_how_many():
    viewer = Viewer(limit=2)
    ring = FlowRing()
    for i in range(5):
        viewer.push(ring.add({"seq": i}))
    assert len(viewer.queue) == 2 and viewer.dropped == 3
    assert [e.id for e in viewer.take()] == [1, 2]


def datagram(pid: int, seqs: list[int], dropped: int = 0, **fields: object) -> bytes:
    """As a worker sends flows (addons/gateway/flowfeed.py `encode`)."""
    lines = [json.dumps({"pid": pid, "worker": 0, "dropped": dropped})]
    headers = {"request_headers": fields.pop("request_headers", []), "response_headers": None}
    for seq in seqs:
        flow = {"seq": seq, "end": time.time(), "status": 200, **fields}
        lines.append(json.dumps(flow) + "\t" + json.dumps(headers))
    return "\n".join(lines).encode()


def live_view(tmp_path: Path, ring_size: int = 100) -> LiveView:
    return LiveView(tmp_path, "token", ring_size=ring_size)


def test_repeats_are_dropped_and_garbage_is_counted(tmp_path):
    live = live_view(tmp_path)
    now = time.time()
    assert live.feed.receive(datagram(10, [1, 2, 3]), now) == 3
    assert live.feed.receive(datagram(10, [2, 3, 4]), now) == 1  # sent again: only 4 is new
    assert live.feed.receive(datagram(11, [1], dropped=7), now) == 1  # another worker
    for garbage in (b"not json", b"[]", b'{"pid": "x"}', b'{"pid": 2}\nnot json\t{}'):
        assert live.feed.receive(garbage, now) == 0
    assert live.feed.receive(b'{"pid": 2}\n[1]\t{}\n"x"', now) == 0  # not flows: skipped
    assert live.feed.bad_input == 4
    assert len(live.feed.ring.entries) == 5 and live.stats()["dropped_by_workers"] == 7
    assert live.feed.seen == {10: 4, 11: 1, 2: 0}
    live.feed.forget_gone(now + 7200)  # both restarted long ago: forgotten, their drops counted
    assert live.feed.seen == {} and live.stats()["dropped_by_workers"] == 7


def test_the_admin_ring_holds_the_last_flows_only(tmp_path):
    live = live_view(tmp_path, ring_size=10)
    live.feed.receive(datagram(1, list(range(1, 26))), time.time())
    assert len(live.feed.ring.entries) == 10 and live.feed.ring.evicted == 15
    assert [e.flow["seq"] for e in live.feed.ring.entries] == list(range(16, 26))


def test_the_workers_are_told_to_stream_while_someone_looks(tmp_path):
    live = live_view(tmp_path)
    live.feed.write_control()
    assert not (tmp_path / flowfeed.CONTROL_NAME).exists()  # never asked: nothing written
    live.feed.receive(datagram(42, [1, 2]), time.time())
    viewer = Viewer()
    live.viewers.add(viewer)
    live.feed.write_control()
    control = json.loads((tmp_path / flowfeed.CONTROL_NAME).read_text())
    assert control["until"] > time.time() and control["seen"] == {"42": 2}
    live.viewers.discard(viewer)
    live.feed.write_control()
    assert json.loads((tmp_path / flowfeed.CONTROL_NAME).read_text()) == {"until": 0}


def test_filters_are_the_pages():
    flows = [
        {"tenant": "acme", "repository": "acme/app", "status": 200, "decision": "allow"},
        {"tenant": "acme", "repository": "acme/db", "status": 404, "decision": "deny:unknown"},
        {"tenant": None, "repository": None, "status": 401, "decision": "deny:unauthenticated"},
        {"tenant": "globex", "repository": "globex/x", "status": None, "decision": "allow"},
    ]

    def picked(**query: str) -> list[int]:
        f = Filters.from_query(query)
        return [i for i, flow in enumerate(flows) if f.match(flow)]

    assert picked() == [0, 1, 2, 3]
    assert picked(tenant="acme") == [0, 1]
    assert picked(tenant="-") == [2]
    assert picked(repository="app") == [0]
    assert picked(status="4xx") == [1, 2]
    assert picked(status="none") == [3]
    assert picked(decision="deny") == [1, 2]
    assert picked(tenant="acme", decision="allow") == [0]


def test_the_overview_counts_per_second_and_per_tenant():
    overview = Overview()
    now = time.time()
    for status, tenant in ((200, "acme"), (404, "acme"), (503, "acme"), (200, "globex")):
        overview.add({"end": now, "tenant": tenant, "status": status, "bytes_out": 100}, now)
    overview.add({"end": now - 10_000, "tenant": "old", "status": 200}, now)  # out of window
    snap = overview.snapshot(now)
    series = snap["series"]
    assert series["requests"][-1] == 4 and series["4xx"][-1] == 1 and series["5xx"][-1] == 1
    assert series["bytes_out"][-1] == 400 and len(series["requests"]) == snap["seconds"]
    acme, globex = snap["tenants"]
    assert acme["tenant"] == "acme" and acme["requests"] == 3
    assert acme["error_rate"] == round(1 / 3, 4) and acme["client_error_rate"] == round(1 / 3, 4)
    assert globex["requests"] == 1 and globex["error_rate"] == 0


def test_the_flow_file_is_readable_by_mitmproxy():
    feed = FlowFeed()
    feed.response(finished_flow(headers=[(b"authorization", f"Bearer {JWT}".encode())]))
    feed.response(finished_flow("/v2/acme/app/blobs/uploads/", status=500, error=True))
    summaries = [flowfeed.summary(s, 0) for s in feed.ring]
    summaries = [json.loads(json.dumps(s)) for s in summaries]  # as they travel
    data = flow_file(summaries)
    assert JWT.encode() not in data
    flows = list(mitmio.FlowReader(io.BytesIO(data)).stream())
    assert len(flows) == 2
    assert flows[0].request.path == "/v2/acme/app/manifests/v1"
    assert flows[0].request.headers["authorization"] == "REDACTED"
    assert flows[0].response.status_code == 200 and "decision=" in flows[0].comment
    assert flows[1].response.status_code == 500 and flows[1].error is not None


# --- the admin endpoint, as a browser and curl reach it -----------------------------------------


@pytest.fixture(scope="module")
def admin_program(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The real admin program (its backend is unreachable: only the checks matter here)."""
    tmp = tmp_path_factory.mktemp("admin")
    port = free_port()
    args = [
        sys.executable, "-m", "addons.admin.program", "--listen", f"127.0.0.1:{port}",
        "--backend", "http://127.0.0.1:9", "--state-dir", str(tmp / "state"),
        "--capture-dir", str(tmp / "captures"),
    ]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)
    wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True)
    yield port
    proc.terminate()
    proc.wait(10)


def ask(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (Host too: http.client adds none then)."""
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    conn.endheaders()
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, body


def host(port: int) -> dict[str, str]:
    return {"Host": f"127.0.0.1:{port}"}


def csrf_token(port: int) -> str:
    _, _, page = ask(port, "GET", "/", host(port))
    marker = b'name="csrf-token" content="'
    start = page.index(marker) + len(marker)
    return page[start : page.index(b'"', start)].decode()


def test_the_page_and_every_answer_carry_the_security_headers(admin_program):
    port = admin_program
    for path in ("/", "/static/live.js", "/live/overview", "/healthz", "/nothing"):
        status, headers, _ = ask(port, "GET", path, host(port))
        assert status in (200, 404, 503), path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp
        assert not [k for k in headers if k.startswith("access-control-")]
    status, headers, page = ask(port, "GET", "/", host(port))
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<script>" not in page and b"style=" not in page  # nothing inline
    assert len(csrf_token(port)) >= 40


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "evil.example:{port}"},  # DNS rebinding: the attacker's name
        {"Host": "127.0.0.1:1"},  # another port
        {"Host": "127.0.0.1"},  # no port
        {},  # no Host at all
        {"Host": "127.0.0.1:{port}", "Origin": "http://evil.example"},
        {"Host": "127.0.0.1:{port}", "Origin": "null"},
        {"Host": "127.0.0.1:{port}", "Origin": "http://localhost:{port}"},  # not this Host
        {"Host": "127.0.0.1:{port}", "Sec-Fetch-Site": "cross-site"},
        {"Host": "127.0.0.1:{port}", "Sec-Fetch-Site": "same-site"},
    ],
)
@pytest.mark.parametrize("path", ["/", "/live/events", "/live/flows", "/live/flow/1", "/metrics"])
def test_requests_that_do_not_name_this_endpoint_are_refused(admin_program, headers, path):
    port = admin_program
    headers = {k: v.format(port=port) for k, v in headers.items()}
    status, answer, body = ask(port, "GET", path, headers)
    assert status == 403 and b"forbidden" in body
    assert not [k for k in answer if k.startswith("access-control-")]


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "127.0.0.1:{port}"},
        {"Host": "localhost:{port}"},
        {"Host": "LOCALHOST:{port}", "Origin": "http://localhost:{port}"},
        {"Host": "127.0.0.1:{port}", "Origin": "http://127.0.0.1:{port}"},
        {"Host": "127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Host": "127.0.0.1:{port}", "Sec-Fetch-Site": "none"},  # typed, bookmarked
    ],
)
def test_the_endpoint_itself_is_served(admin_program, headers):
    port = admin_program
    headers = {k: v.format(port=port) for k, v in headers.items()}
    assert ask(port, "GET", "/live/overview", headers)[0] == 200


def test_a_repeated_host_is_a_bad_request(admin_program):
    port = admin_program
    raw = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        assert s.recv(100).startswith(b"HTTP/1.0 400")


def test_state_changes_need_the_csrf_token_from_a_browser_but_not_from_curl(admin_program):
    port = admin_program
    token = csrf_token(port)
    same = {**host(port), "Origin": f"http://127.0.0.1:{port}"}
    start = "/capture?seconds=5&max_mb=1"
    # A browser (it always sends Origin with a POST): only with the page's token.
    assert ask(port, "POST", start, same)[0] == 403
    assert ask(port, "POST", start, {**same, "X-CSRF-Token": "guess"})[0] == 403
    status, _, body = ask(port, "POST", start, {**same, "X-CSRF-Token": token})
    assert status == 200 and json.loads(body)["active"]
    assert ask(port, "DELETE", "/capture", same)[0] == 403
    assert ask(port, "DELETE", "/capture", {**same, "X-CSRF-Token": token})[0] == 200
    # What a cross-site form could send without Origin (old browsers): form types need it too.
    for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data"):
        assert ask(port, "POST", start, {**host(port), "Content-Type": content_type})[0] == 403
    assert ask(port, "POST", start, {**host(port), "Sec-Fetch-Site": "same-origin"})[0] == 403
    # curl -X POST: no Origin, no Content-Type: the documented API stays as it was.
    status, _, body = ask(port, "POST", start, {**host(port), "User-Agent": "curl/7.88.1"})
    assert status == 200 and json.loads(body)["active"]
    assert ask(port, "DELETE", "/capture", host(port))[0] == 200
    # A CORS preflight is never answered with CORS headers.
    status, answer, _ = ask(
        port, "OPTIONS", "/capture", {**same, "Access-Control-Request-Method": "POST"}
    )
    assert status in (403, 404, 405) and not [k for k in answer if k.startswith("access-control")]


def test_the_event_stream_answers_and_ends_with_the_client(admin_program):
    port = admin_program
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /live/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        data = b""
        while b"event: overview" not in data:
            data += s.recv(65536)
    assert data.startswith(b"HTTP/1.0 200")
    assert b"text/event-stream" in data and b"event: reset" in data
    assert b"Content-Security-Policy" in data


def test_the_long_poll_waits_for_a_flow_and_returns_without_one(admin_program):
    port = admin_program
    first = json.loads(ask(port, "GET", "/live/flows?wait=1", host(port))[2])
    assert first["reset"]  # no `since`: the backlog at once
    started = time.monotonic()
    status, _, body = ask(port, "GET", f"/live/flows?since={first['last']}&wait=1", host(port))
    assert status == 200 and json.loads(body)["flows"] == [] and not json.loads(body)["reset"]
    assert 0.9 <= time.monotonic() - started < 5


def test_a_flow_sent_to_the_socket_is_served(admin_program, tmp_path_factory):
    port = admin_program
    # the program's state dir: find its socket through the control file it writes
    ask(port, "GET", "/live/flows", host(port))  # asks the workers to stream
    state = next(Path(tmp_path_factory.getbasetemp()).glob("admin*/state"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.sendto(
        datagram(99, [1], tenant="acme", repository="acme/<b>app</b>", request_headers=[]),
        str(state / flowfeed.SOCKET_NAME),
    )

    def served() -> list[dict]:
        return json.loads(ask(port, "GET", "/live/flows", host(port))[2])["flows"]

    wait_for(lambda: any(f.get("tenant") == "acme" for f in served()), 5)
    [flow] = [f for f in served() if f.get("tenant") == "acme"]
    assert "request_headers" not in flow  # the list carries no headers
    status, _, body = ask(port, "GET", f"/live/flow/{flow['id']}", host(port))
    assert status == 200 and json.loads(body)["repository"] == "acme/<b>app</b>"
    status, answer, data = ask(port, "GET", "/live/flows.mitm?tenant=acme", host(port))
    assert status == 200 and "attachment" in answer["content-disposition"]
    assert len(list(mitmio.FlowReader(io.BytesIO(data)).stream())) == 1


def test_parse_head_refuses_what_it_cannot_read():
    for head in (
        b"GET / HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n Host: folded\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: \u00e9\r\n\r\n".encode(),
    ):
        with pytest.raises(adminhttp.BadRequest):
            adminhttp.parse_head(head)


def test_the_viewer_loop_ends_when_the_program_stops(tmp_path):
    """close() ends open event streams: supervisord's stop is not held up by a browser tab."""

    async def scenario() -> None:
        live = live_view(tmp_path)
        reader, writer = await asyncio.open_connection(*await serve(live))
        writer.write(b"GET /live/events HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"event: overview"), 5)
        live.close()
        await asyncio.wait_for(reader.read(), 5)  # EOF
        writer.close()

    async def serve(live: LiveView) -> tuple[str, int]:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            head = await r.readuntil(b"\r\n\r\n")
            await live.stream(adminhttp.parse_head(head), r, w)

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        return server.sockets[0].getsockname()[:2]

    asyncio.run(scenario())


# --- bodies ---------------------------------------------------------------------------------


def manifest_flow(method: bytes, body: bytes, status: int = 201) -> http.HTTPFlow:
    from addons.gateway.record import record

    request = tutils.treq(
        method=method,
        path=b"/v2/acme/app/manifests/v1",
        headers=http.Headers([(b"host", b"registry.example:5000")]),
        content=body if method == b"PUT" else b"",
    )
    response = tutils.tresp(
        status_code=status,
        headers=http.Headers([(b"content-type", b"application/vnd.oci.image.manifest.v1+json")]),
        content=body if method == b"GET" else b"",
    )
    flow = tflow.tflow(req=request, resp=response)
    rec = record(flow)
    rec.kind, rec.route = "registry", "manifest"
    AccessLog(out=io.StringIO()).response(flow)
    return flow


def test_a_pushed_manifest_is_kept_redacted_and_cut():
    body = b'{"note": "' + JWT.encode() + b'", "pad": "' + b"x" * 20_000 + b'"}'
    feed = FlowFeed()
    feed.response(manifest_flow(b"PUT", body))
    kept = feed.kept_bodies(feed.seq)
    assert kept is not None and kept["body_cut"] is True
    assert kept["request_body"].startswith('{"note": "REDACTED"')
    assert len(kept["request_body"]) <= flowfeed.BODY_LIMIT and "response_body" not in kept


def test_no_body_of_a_blob_a_token_answer_or_a_streamed_message():
    feed = FlowFeed()
    flow = finished_flow("/v2/acme/app/blobs/sha256:00", status=200)  # a 200 JSON: not kept
    feed.response(flow)
    assert feed.kept_bodies(feed.seq) is None
    streamed = manifest_flow(b"GET", b'{"a": 1}', status=200)
    streamed.response.stream = True  # no copy of its head was made (access.py): nothing
    feed.response(streamed)
    assert feed.kept_bodies(feed.seq) is None
    denied = finished_flow(status=403)
    denied.response.content = b'{"errors": [{"code": "DENIED"}]}'
    feed.response(denied)
    assert feed.kept_bodies(feed.seq) == {"response_body": '{"errors": [{"code": "DENIED"}]}'}


def test_a_pulled_manifest_streams_and_its_head_is_copied():
    from addons.gateway.record import HEAD_KEPT, record

    flow = manifest_flow(b"GET", b"", status=200)
    flow.response.stream = True
    rec = record(flow)
    rec.head_out = bytearray()
    for chunk in (b"a" * 10_000, b"b" * 10_000, b"c" * 10):
        assert rec.count_keep_out(chunk) == chunk  # passed on as it is
    assert len(rec.head_out) == HEAD_KEPT and rec.bytes_out == 20_010
    feed = FlowFeed()
    feed.response(flow)
    kept = feed.kept_bodies(feed.seq)
    assert kept == {"response_body": "a" * 10_000 + "b" * (HEAD_KEPT - 10_000), "body_cut": True}


def test_bodies_kept_by_a_worker_stay_within_their_budget(monkeypatch):
    monkeypatch.setattr(flowfeed, "BODY_BUDGET", 50_000)
    feed = FlowFeed()
    for _ in range(10):
        feed.response(manifest_flow(b"PUT", b"x" * 16_000))
    assert feed.body_bytes <= 50_000 and len(feed.bodies) == 3
    assert feed.kept_bodies(feed.seq) is not None and feed.kept_bodies(1) is None


def test_the_admin_ring_lets_the_oldest_bodies_go_first():
    ring = FlowRing(capacity=100, body_budget=250)
    for i in range(5):
        ring.add({"seq": i}, None, None, json.dumps({"request_body": "x" * 80}))
    assert ring.body_bytes <= 250
    assert ring.get(1).full()["body_dropped"] is True  # type: ignore[union-attr]
    assert ring.get(5).full()["request_body"] == "x" * 80  # type: ignore[union-attr]


def test_rows_drawn_into_the_page_are_text():
    from addons.admin.rows import rows_html

    flow = {"id": 7, "method": "GET", "status": 403, "decision": "deny:policy",
            "repository": "<b>x</b>", "user_agent": '<img src=x onerror="1">'}  # fmt: skip
    html_rows = rows_html([flow])
    assert "<b>" not in html_rows and "<img" not in html_rows
    assert '&lt;img src=x onerror="1"&gt;' in html_rows and 'data-id="7"' in html_rows
