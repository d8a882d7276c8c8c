"""Patches to the HTTP/1 engine of the pinned mitmproxy and h11, for the gateway process only.

They replace private functions and classes, process-wide, so they are applied only where a
gateway runs: `python -m addons.gateway.chain` (chain.py: run) and the tests that run one
in-process (tests/inproc.py: InProcessGateway, which reverts them when it stops). Importing
this module patches nothing. `apply()` first refuses any mitmproxy or h11 other than the
versions pinned in pyproject.toml (`check_versions`): a patch of another version's internals
could apply half-way and silently be wrong.

Each patch, and a test that fails without it (tests/unit/test_engine_pins.py checks that every test
named here exists):

1. Error pages: mitmproxy answers malformed requests and an unreachable backend with HTML that
   no hook can restyle, quoting its own internals. We answer OCI JSON (`oci.protocol_error`).
   tests/e2e/test_lifecycle.py::test_backend_down_and_malformed_requests_get_oci_errors_not_html
2. Bounded heads: mitmproxy buffers a request head, and h11 a chunk-size line, without limit
   (mitmproxy's own "FIXME: protect against header size DoS"): 1 MiB head, 64 KiB chunk line.
   tests/e2e/test_hostile.py::test_an_endless_line_is_cut_off
3. A leading empty line before the request line is ignored (RFC 9112 §2.2) instead of leaving
   the client waiting: h11 drops one such line per call and mitmproxy then waits for more data.
   tests/e2e/test_hostile.py::test_a_leading_empty_line_is_ignored
4. Reads of up to 256 KiB instead of 64 KiB (`asyncio.StreamReader.read`, asked for 65535
   bytes): every read is one trip through mitmproxy's layers and our hooks, and pulls were
   bound by that per-read work. Measured (1 GiB, same session, ratio to direct): 64 KiB push
   1.03-1.10x / pull 0.41-0.49x; 1 MiB push 0.79x / pull 0.48-0.62x; 256 KiB push
   0.85-0.88x / pull 0.53-0.66x. Memory stays bounded. Speed only: no test fails without it
   (tests/bench/throughput.py measures it).
5. Header fields as the backend reads them (`framing.head_problem`): at most MAX_HEADERS (431
   above; mitmproxy has no limit and some of its lookups are quadratic in the count), names
   that are RFC 9110 tokens, values without control characters. mitmproxy keeps an obs-fold
   continuation inside the value ("a\r\n b") where Go joins it with a space: a folded or
   CR-bearing value is 400. tests/e2e/test_hostile.py::test_hostile_request (its `200-headers`,
   `obs-fold`, `nul-in-header-value` and `bare-cr-in-value` cases)
6. Error answers to HEAD requests carry no body (mitmproxy's would desynchronise the client's
   keep-alive connection when the backend is down), and always a complete OCI answer.
   tests/e2e/test_connections.py::test_a_down_backend_gives_complete_answers_even_to_head
7. Connection lifetimes (gateway/connections.py): every Http1Server layer is tracked so that a
   head that does not complete in time (408) and an idle keep-alive connection are closed,
   and `handle_stream` admits a new connection only under the connection caps.
   tests/e2e/test_connections.py::test_a_head_dripped_byte_by_byte_is_cut_off_with_408,
   tests/e2e/test_connections.py::test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout,
   tests/e2e/test_connections.py::test_the_total_cap_answers_503_and_recovers
8. Several worker processes on one port: the listening socket is bound with SO_REUSEPORT
   (the kernel spreads new connections over the workers) and a deeper accept backlog.
   `run` checks the port is free before it starts them, so another program's socket is never
   shared by accident. Without it the second worker cannot bind and the stack does not start:
   tests/e2e/test_lifecycle.py::test_a_killed_gateway_worker_is_restarted_while_the_others_serve
9. Body bytes of a message with a Content-Length pass straight through: h11's buffer would
   copy each chunk three times (append, a slice only to test emptiness, extract) and
   mitmproxy once more. A chunk that arrives with nothing buffered before it is handed on as
   it is; anything else (a buffered remainder, the message's end, a pipelined next message)
   takes mitmproxy's own path. Speed only (see docs/benchmarks.md): no test fails without
   it; tests/e2e/test_hostile.py::test_pipelined_requests_get_two_answers and
   tests/e2e/test_hostile.py::test_a_smuggled_second_request_in_a_body_is_not_a_request hold
   with it.
10. Request bodies the engine cannot read are answered, and the flow always ends. A chunked
   body is read strictly (RFC 9112 §7.1, `framing.chunk_framing_problem`): 1-16 hex digits,
   extensions as the grammar says, CRLF line ends, CRLF after the data; anything else (an
   LF-only line, `0x10`, `+5`, ` 5`, `5 `, a bare CR, a huge size) is 400 with an OCI body
   and a close, as soon as the bad byte is there (h11 alone waited for a CRLF that never
   came, or closed without an answer). A trailer section is parsed and dropped, as nginx
   does (RFC 9110 §6.5.1 lets a recipient discard trailers): mitmproxy raised
   NotImplementedError on one, leaving the flow open with no hook ever told, and the backend
   never sees a field the gateway did not read. Any other exception in an HTTP/1 layer ends
   its connection (400 if no answer has begun) and its flow through mitmproxy's error hook,
   so every addon releases what it holds.
   tests/e2e/test_hostile.py::test_malformed_chunked_framing_is_answered_400_at_once,
   tests/e2e/test_hostile.py::test_a_chunked_patch_with_a_trailer_is_answered_and_holds_no_gc,
   test_engine_faults.py::test_an_exception_in_the_engine_answers_400_and_ends_the_flow
11. Hook dispatch without mitmproxy's per-call overhead (addons/engine/dispatch.py). Speed only
   (docs/benchmarks.md): the order and arguments of every hook are unchanged, so no test
   fails without it.
12. A hook's reply in the same step (addons/engine/dispatch.py: server_event): a hook whose every
   callable is a plain function runs without a task of its own, and the reply of any hook
   done at once (plain, or a task whose eager first step finished it) goes back to the layers
   under the same lock, instead of a later turn of the loop and a second server_event.
   Intercepted flows, awaitables and hooks that really wait keep mitmproxy's task path.
   tests/unit/test_engine_hooks.py::test_a_hook_of_plain_functions_runs_inline_and_the_order_is_unchanged

13. Large response bodies in the kernel (addons/engine/splice.py): once a body that every addon
   left unchanged (`splice.PassThrough`) is under way with at least 1 MiB to come, the
   backend connection's reading task (`handle_connection`, a copy of mitmproxy's with one step
   added) moves the rest with splice(2), through a pipe, on duplicated descriptors; the layers
   get the body's end as if read. A backend that closes early, a client that leaves, the layers
   closing either side: the backend connection is aborted and the flow ends as without it.
   tests/unit/test_engine_splice.py::test_a_large_body_is_spliced_and_arrives_whole,
   tests/e2e/test_gateway.py::test_a_large_layer_is_pulled_byte_identical_through_the_kernel
14. Bytes a client sends while its answer is still going out (pipelined) are bounded: mitmproxy
   keeps them in the server layer's buffer without limit; beyond MAX_HEAD the connection is
   closed and the flow ends as "client disconnected".
   tests/unit/test_engine_faults.py::test_a_client_flooding_during_its_answer_is_closed_with_the_buffer_bounded
15. The end of a streamed request body may wait (addons/engine/bodyend.py): a stream callable
   that cannot decide yet on the bytes it holds (a quota's last grant still being asked
   for) gets the `streamed_request_end` hook before mitmproxy hands it the end.
   tests/e2e/test_quota.py::test_a_streamed_body_ending_while_others_hold_room_waits_for_it
16. A client is not read while a blocking hook of its connection runs (addons/engine/readgate.py;
   dispatch.py counts the hooks, splice.py's handle_connection waits before a client read):
   mitmproxy queued everything sent meanwhile, without limit (1.2 GB in 3.5 s from one
   connection during a slow hook). What the client sends waits in the kernel's buffers.
   tests/unit/test_engine_faults.py::test_a_body_sent_during_a_slow_hook_waits_in_the_kernel_not_in_memory

What uses a public mitmproxy hook is an addon, not a patch: plain HTTP only
(addons/engine/plain_http.py, `next_layer`), the connection caps and deadlines
(addons/gateway/connections.py: ConnectionGuard).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import tomllib
from collections.abc import Generator
from pathlib import Path
from typing import Any

import h11
from h11._readers import ChunkedReader, ContentLengthReader
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, mode_servers, server
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    RequestHeaders,
    RequestProtocolError,
    ResponseProtocolError,
)

from addons.engine import bodyend, connections, dispatch, oci, splice
from addons.engine.framing import (
    MAX_CHUNK_LINE,
    MAX_HEAD,
    chunk_framing_problem,
    head_problem,
)

logger = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
MITMPROXY_READ = 65535  # what mitmproxy's ConnectionHandler asks for

_handle_event = _http1.Http1Connection._handle_event
_read_headers = _http1.Http1Server.read_headers
_server_init = _http1.Http1Server.__init__
_server_send = _http1.Http1Server.send
_mark_done = _http1.Http1Connection.mark_done
_make_body_reader = _http1.make_body_reader
_read_body = _http1.Http1Connection.read_body
_stream_read = asyncio.StreamReader.read
_handle_stream = mode_servers.ServerInstance.handle_stream
_listen = mode_servers.AsyncioServerInstance.listen
BACKLOG = 1024


def _refuse_head(self: Any, status: int, message: str) -> Generator[Any, Any, None]:
    self.buf = type(self.buf)()  # drop it now (and keep mitmproxy's close-time log small)
    code = "SIZE_INVALID" if status == 431 else "UNSUPPORTED"
    yield commands.SendData(self.conn, oci.wire_error(status, code, message))
    yield commands.CloseConnection(self.conn)
    self.state = self.done


def _checked_read_headers(self: Any, event: events.Event) -> Generator[Any, Any, bool]:
    """mitmproxy's head parser, stopped at a head that fails `head_problem`. True = refused."""
    for command in _read_headers(self, event):
        if isinstance(command, ReceiveHttp) and isinstance(command.event, RequestHeaders):
            problem = head_problem(command.event.request)
            if problem is not None:
                yield from _refuse_head(self, *problem)
                return True
            connections.head_done(self)
            self.tbf_stream = command.event.stream_id  # mitmproxy's HTTP layer has its stream
            # The Host the client sent, before reverse mode rewrites it for the backend (the
            # live view shows it: addons/gateway/flowfeed.py).
            request = command.event.request
            request.tbf_host = request.headers.get("host")
        yield command
    return False


def read_headers(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    if isinstance(event, events.DataReceived):
        connections.head_bytes(self)
    if (yield from _checked_read_headers(self, event)):
        return
    for _ in range(4):  # parse what is buffered after leading empty lines
        if not (
            self.state == self.read_headers and self.buf and isinstance(event, events.DataReceived)
        ):
            break
        before = len(self.buf)
        if (yield from _checked_read_headers(self, events.DataReceived(self.conn, b""))):
            return
        if len(self.buf) == before:
            break
    if self.state == self.read_headers and len(self.buf) > MAX_HEAD:
        yield from _refuse_head(self, 431, "request head too large")


def _stream_open(self: Any) -> bool:
    """Whether this server layer's current request has reached mitmproxy's HTTP layer (which
    then has a stream to end) and has not finished both ways."""
    return (
        self.request is not None
        and getattr(self, "tbf_stream", None) == self.stream_id
        and not (self.request_done and self.response_done)
    )


def _answer_400(self: Any, message: str) -> Generator[Any, Any, None]:
    """A 400 before the close, when no answer has begun on this connection."""
    if self.response is None and self.conn.state & ConnectionState.CAN_WRITE:
        method = self.request.method if self.request is not None else "GET"
        yield commands.SendData(
            self.conn, oci.wire_error(400, "UNSUPPORTED", message, method=method)
        )


def server_read_body(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    """mitmproxy's body reader, with a 400 before the close of a body it cannot read (it
    closes without an answer). Its only close of the connection with the request not done is
    that one; the close after a finished exchange comes from `mark_done`."""
    for command in _read_body(self, event):
        if (
            isinstance(command, commands.CloseConnection)
            and command.connection is self.conn
            and not self.request_done
            and not isinstance(event, events.ConnectionClosed)
        ):
            yield from _answer_400(self, "malformed request body (framing)")
        yield command


def _engine_failed(self: Any, error: Exception) -> Generator[Any, Any, None]:
    """An exception in an HTTP/1 layer: close its connection and end its flow with an error,
    so that the error hooks release what the addons hold for it."""
    logger.error("HTTP/1 engine error (%s): %r; closing the connection", type(self).__name__, error)
    server = isinstance(self, _http1.Http1Server)
    open_stream = _stream_open(self) if server else self.stream_id is not None
    if server:
        yield from _answer_400(self, "the request could not be processed")
    self.state = self.done
    yield commands.CloseConnection(self.conn)
    if open_stream:
        message = f"HTTP/1 engine error: {type(error).__name__}"
        yield ReceiveHttp(
            RequestProtocolError(self.stream_id, message, ErrorCode.GENERIC_CLIENT_ERROR)
            if server
            else ResponseProtocolError(self.stream_id, message, ErrorCode.GENERIC_SERVER_ERROR)
        )


def handle_event(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    """Every event of an HTTP/1 layer: an exception ends the connection and its flow instead
    of leaving both open with no hook told (mitmproxy logs "crashed" and goes on)."""
    try:
        if _overflows(self, event):
            logger.info("a client pipelined over %d bytes during an answer: closing", MAX_HEAD)
            self.buf = type(self.buf)()
            yield commands.CloseConnection(self.conn)  # the flow ends as "client disconnected"
            return
        yield from _handle_event_fast(self, event)
    except Exception as e:
        yield from _engine_failed(self, e)


def _overflows(self: Any, event: events.Event) -> bool:
    """Bytes a client sends while its answer is still going out wait in the server layer's
    buffer, with no limit in mitmproxy: beyond one request head's worth, the client is
    flooding, not pipelining."""
    return (
        isinstance(event, events.DataReceived)
        and isinstance(self, _http1.Http1Server)
        and self.state == self.wait
        and len(self.buf) + len(event.data) > MAX_HEAD
    )


def _handle_event_fast(self: Any, event: events.Event) -> Generator[Any, Any, None]:
    """Content-Length body bytes straight through, when nothing is buffered before them."""
    reader = getattr(self, "body_reader", None)
    if (
        isinstance(event, events.DataReceived)
        and isinstance(reader, ContentLengthReader)
        and event.data
        and not self.buf
        and reader._remaining > 0
        and self.state == self.read_body
    ):
        data = event.data
        take = min(len(data), reader._remaining)
        reader._remaining -= take
        chunk = data[:take] if take < len(data) else data
        yield ReceiveHttp(self.ReceiveData(self.stream_id, chunk))
        if reader._remaining == 0:  # the message's end (and whatever follows): mitmproxy's path
            yield from _handle_event(self, events.DataReceived(self.conn, data[take:]))
        elif (command := splice.offer(self)) is not None:
            yield command
        return
    yield from _handle_event(self, event)


def server_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _server_init(self, *args, **kwargs)
    connections.track(self)


def mark_done(self: Any, **kwargs: bool) -> Generator[Any, Any, None]:
    yield from _mark_done(self, **kwargs)
    if isinstance(self, _http1.Http1Server) and self.state == self.read_headers:
        connections.waiting(self)


def server_send(self: Any, event: Any) -> Generator[Any, Any, None]:
    """mitmproxy's own error answers (backend unreachable, …) as complete OCI answers, with
    no body for HEAD."""
    if (
        isinstance(event, ResponseProtocolError)
        and not self.response
        and self.conn.state & ConnectionState.CAN_WRITE
        and (status := event.code.http_status_code()) is not None
    ):
        method = self.request.method if self.request else "GET"
        yield commands.SendData(
            self.conn, oci.protocol_error_response(status, event.message, method=method)
        )
        yield commands.CloseConnection(self.conn)
        return
    yield from _server_send(self, event)


async def listen(self: Any, host: str, port: int) -> list[Any]:
    """TCP: bound with SO_REUSEPORT, so that every gateway worker listens on the same port."""
    if self.mode.transport_protocol != "tcp" or port == 0:
        return await _listen(self, host, port)
    server = await asyncio.start_server(
        self.handle_stream, host, port, reuse_port=True, backlog=BACKLOG
    )
    return [server]


async def handle_stream(self: Any, reader: Any, writer: Any = None) -> None:
    """Admit a client connection only under the caps; beyond them, a short 503 and close."""
    if not connections.admit(writer):
        return
    try:
        await _handle_stream(self, reader, writer)
    except asyncio.CancelledError:
        pass  # shutdown: nothing awaits this task (and Python 3.12.1 would log it as an error)
    finally:
        connections.release(writer)


class BoundedChunkedReader(ChunkedReader):
    """h11's chunked reader, strict (chunk_framing_problem: h11 accepts `5 `, 20 hex digits and
    any bytes after `;`, and waits forever for the CRLF of an LF-only line), bounded
    (MAX_CHUNK_LINE), and dropping the trailer section (mitmproxy raises on one)."""

    _clean = 0  # bytes of the line (or trailer section) in progress already found clean

    def __call__(self, buf: Any) -> Any:
        if self._bytes_to_discard:  # the CRLF after chunk data: here, so every line is checked
            data = buf.maybe_extract_at_most(len(self._bytes_to_discard))
            if data is None:
                return None
            if data != self._bytes_to_discard[: len(data)]:
                raise h11.RemoteProtocolError("no CRLF after chunk data")
            self._bytes_to_discard = self._bytes_to_discard[len(data) :]
            if self._bytes_to_discard:
                return None
        reading_line = self._bytes_in_chunk == 0 or self._reading_trailer
        clean, self._clean = self._clean, 0  # 0 for the next line (h11 may recurse into it)
        if reading_line:
            # h11 is pinned with mitmproxy: its buffer itself, not a copy per chunk
            problem = chunk_framing_problem(buf._data, self._reading_trailer, clean)
            if problem is not None:
                raise h11.RemoteProtocolError(problem)
        trailer = self._reading_trailer
        event = super().__call__(buf)
        if event is None and reading_line and trailer == self._reading_trailer:
            if len(buf) > MAX_CHUNK_LINE:  # still waiting for the end of a line
                raise h11.RemoteProtocolError("chunk line too long")
            self._clean = len(buf)  # nothing taken from the buffer yet: all of it checked
        if isinstance(event, h11.EndOfMessage) and event.headers:
            return h11.EndOfMessage()  # the trailer section, read and dropped
        return event


def make_body_reader(expected_size: int | None) -> Any:
    return BoundedChunkedReader() if expected_size is None else _make_body_reader(expected_size)


async def read_larger(self: asyncio.StreamReader, n: int = -1) -> bytes:
    if n == MITMPROXY_READ:
        self._limit = max(self._limit, READ_SIZE)  # type: ignore[attr-defined]
        n = READ_SIZE
    return await _stream_read(self, n)


PINNED = ("mitmproxy", "h11")  # the packages whose internals the patches replace
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
_PIN = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;,]+)")


class EngineVersionError(RuntimeError):
    """An installed mitmproxy or h11 other than the pinned one."""


def pins() -> dict[str, str]:
    """The `name==version` pins of the project's dependencies: from pyproject.toml in a
    checkout, else from the installed package's metadata (built from that same file)."""
    if PYPROJECT.is_file():
        requirements = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    else:
        try:
            requirements = importlib.metadata.requires("tabbify-registry") or []
        except importlib.metadata.PackageNotFoundError:
            requirements = []
    found = {}
    for requirement in requirements:
        if (m := _PIN.match(requirement)) is not None:
            found[m[1].lower()] = m[2]
    return found


def installed_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PINNED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def version_problem(installed: dict[str, str | None], pinned: dict[str, str]) -> str | None:
    """Why the engine patches must not be applied to these versions (one line), or None."""
    for name in PINNED:
        want = pinned.get(name)
        if want is None:
            return f"no {name}==<version> pin in pyproject.toml: the engine patches need one"
        have = installed.get(name)
        if have != want:
            return (
                f"{name} {have or '(not installed)'} is installed, but the engine patches "
                f"(addons/engine/hardening.py) are written for {name}=={want} only: "
                "install the pinned version"
            )
    return None


def check_versions() -> None:
    problem = version_problem(installed_versions(), pins())
    if problem is not None:
        raise EngineVersionError(problem)


def _patches() -> list[tuple[Any, str, Any]]:
    """(owner, attribute, replacement) for every patch."""
    return [
        *dispatch.patches(),  # hook dispatch without mitmproxy's per-call overhead
        (_http1, "make_error_response", oci.protocol_error_response),
        (_http1.Http1Server, "__init__", server_init),
        (_http1.Http1Connection, "_handle_event", handle_event),
        (_http1.Http1Server, "read_headers", read_headers),
        (_http1.Http1Server, "send", server_send),
        (_http1.Http1Connection, "mark_done", mark_done),
        (_http1.Http1Server, "read_body", server_read_body),
        (_http1, "make_body_reader", make_body_reader),
        (asyncio.StreamReader, "read", read_larger),
        (mode_servers.ServerInstance, "handle_stream", handle_stream),
        (mode_servers.AsyncioServerInstance, "listen", listen),
        (server.ConnectionHandler, "handle_connection", splice.handle_connection),
        *bodyend.patches(),
    ]


_MISSING = object()
_saved: list[tuple[Any, str, Any]] = []  # what apply() replaced, to put back
_depth = 0  # applies not yet reverted (in-process gateways may overlap)


def applied() -> bool:
    return _depth > 0


def apply() -> None:
    """Patch mitmproxy's engine (the gateway process; an in-process gateway in a test), after
    checking the versions: EngineVersionError, and nothing patched, on any other."""
    global _depth
    if _depth == 0:
        check_versions()
        for owner, name, replacement in _patches():
            _saved.append((owner, name, vars(owner).get(name, _MISSING)))
            setattr(owner, name, replacement)
    _depth += 1


def revert() -> None:
    """Undo the matching apply(); the last one puts mitmproxy's own functions back."""
    global _depth
    if _depth == 0:
        return
    _depth -= 1
    if _depth == 0:
        while _saved:
            owner, name, original = _saved.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
