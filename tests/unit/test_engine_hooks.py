"""Hooks of plain functions run inline, with mitmproxy's order and semantics
(addons/engine/dispatch.py: server_event, one of the engine patches in engine/hardening.py).

The gateway's real engine in-process (tests/inproc.py, anonymous mode) in front of a small
backend that answers every request, with a probe addon added to its chain. mitmproxy starts
every hook as an asyncio task and feeds the reply back on a later turn of the loop; a hook
whose every callable is a plain function now runs in the connection's own task, at once.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.inproc import InProcessGateway
from tests.support.rawhttp import Conn
from tests.support.stack import wait_for

GET = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n%s\r\n"


class Backend(http.server.ThreadingHTTPServer):
    """Answers every GET with 200 and a small JSON body, keep-alive."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class Probe:
    """Records, for every hook of a flow, the task that ran it and the turn of the event loop
    (a callback scheduled at every hook counts the turns). A request header asks it to
    intercept the flow, raise or return an awaitable from its plain `responseheaders`."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, int]] = []
        self.turns = 0

    def _tick(self) -> None:
        self.turns += 1

    def _note(self, hook: str) -> None:
        self.seen.append((hook, asyncio.current_task(), self.turns))
        asyncio.get_running_loop().call_soon(self._tick)

    def requestheaders(self, flow: Any) -> None:
        self._note("requestheaders")

    async def request(self, flow: Any) -> None:
        self._note("request")

    def responseheaders(self, flow: Any) -> Any:
        self._note("responseheaders")
        what = flow.request.headers.get("x-probe", "")
        if what == "intercept":
            flow.intercept()
            asyncio.get_running_loop().call_later(0.5, flow.resume)
        elif what == "raise":
            raise RuntimeError("probe hook failed")
        elif what == "awaitable":

            async def later() -> None:
                await asyncio.sleep(0.2)
                self._note("responseheaders-awaited")

            return later()
        return None

    def response(self, flow: Any) -> None:
        self._note("response")


@pytest.fixture(scope="module")
def gw() -> Iterator[tuple[InProcessGateway, Probe]]:
    backend = Backend()
    probe = Probe()
    with InProcessGateway(backend.url, anonymous=True) as gateway:
        assert gateway.loop is not None

        async def add() -> None:
            gateway.master.addons.add(probe)

        asyncio.run_coroutine_threadsafe(add(), gateway.loop).result(5)
        yield gateway, probe
    backend.shutdown()


def ask(gw: tuple[InProcessGateway, Probe], *probes: str) -> list[Any]:
    """One keep-alive connection, one GET per entry (its x-probe header, if any); returns once
    every flow's `response` hook has run (the answer is streamed before it)."""
    gateway, probe = gw
    probe.seen.clear()
    conn = Conn(gateway.port, timeout=5.0)
    answers = []
    try:
        for what in probes:
            header = b"x-probe: " + what.encode() + b"\r\n" if what else b""
            conn.send(GET % header)
            answers.append(conn.read_answer())
    finally:
        conn.close()
    wait_for(lambda: sum(hook == "response" for hook, _, _ in probe.seen) == len(probes), 3)
    return answers


def test_a_hook_of_plain_functions_runs_inline_and_the_order_is_unchanged(gw):
    _, probe = gw
    answers = ask(gw, "", "")
    assert [a.status if a else None for a in answers] == [200, 200]
    hooks = [hook for hook, _, _ in probe.seen]
    assert hooks == ["requestheaders", "request", "responseheaders", "response"] * 2
    tasks = {hook: task.get_name() for hook, task, _ in probe.seen}
    # `request` has coroutine functions in the chain: still a task of its own.
    assert tasks["request"].startswith("handle_hook(request)"), tasks
    # `responseheaders` is all plain functions: run by the connection, no task of its own.
    assert not tasks["responseheaders"].startswith("handle_hook"), tasks
    # A hook done at once has its reply fed back in the same step: the next hook it brings
    # runs in the same turn of the loop (mitmproxy's task fed it on a later turn).
    turns = [turn for _, _, turn in probe.seen]
    assert turns[0] == turns[1] and turns[4] == turns[5], probe.seen


def test_an_intercepted_flow_waits_for_its_resume(gw):
    started = time.monotonic()
    (answer,) = ask(gw, "intercept")
    assert answer is not None and answer.status == 200 and answer.body == b"{}"
    assert time.monotonic() - started >= 0.45


def test_a_plain_hook_that_raises_is_logged_and_the_flow_goes_on(gw, caplog):
    with caplog.at_level(logging.ERROR):
        answers = ask(gw, "raise", "")
    assert [a.status if a else None for a in answers] == [200, 200]
    assert any("Addon error: probe hook failed" in r.getMessage() for r in caplog.records)


def test_an_awaitable_from_a_plain_hook_is_awaited_before_the_next_hook(gw):
    _, probe = gw
    answers = ask(gw, "awaitable", "")
    assert [a.status if a else None for a in answers] == [200, 200]
    hooks = [hook for hook, _, _ in probe.seen]
    assert hooks[:5] == [
        "requestheaders",
        "request",
        "responseheaders",
        "responseheaders-awaited",
        "response",
    ]
    assert hooks[5:] == ["requestheaders", "request", "responseheaders", "response"]
