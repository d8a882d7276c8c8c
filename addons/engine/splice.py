"""Response bodies moved in the kernel: splice(2) from the backend's socket to the client's.

A large body that the gateway passes on unchanged (a blob pull) costs the gateway, on mitmproxy's
own path, a receive into a new `bytes`, a copy into and out of asyncio's StreamReader buffer,
one trip through the layers and our hooks per read, and a send: about a second of CPU per GB on
this machine, more than the backend spends serving it. Once such a body is under way, the
engine instead moves the rest of it through a pipe with splice(2): the bytes never enter
Python, and the gateway's CPU per GB falls to a small fraction (docs/benchmarks.md).

Only what cannot differ from mitmproxy's path is spliced. The layer that reads the backend's
answer (Http1Client) offers its connection once, per read, when all of this holds (`ready`):

- the request is a GET and the answer has a Content-Length, no Transfer-Encoding, and at
  least MIN_BYTES still to come, with nothing of it buffered;
- the response's stream is a `PassThrough`: every addon left the body as it is (an addon that
  reads or changes it sets another stream, and nothing is spliced);
- every byte read so far has gone through that stream, to the client (so the head and the
  body's beginning are out, in order, and nothing is held in a paused layer);
- plain TCP both ways (no TLS layer: the sockets carry the very bytes the layers see), and
  mitmproxy is not asked to keep streamed bodies.

The connection's reading task (`handle_connection`, a copy of mitmproxy 12.3.1's with a step
added before each read: this one, and readgate.py's for clients) takes the offer before its
next read: it stops the transport's reads, feeds what
asyncio already buffered through the layers as usual, waits for the client's write buffer to
empty, checks `ready` again, and then splices the remaining bytes through a pipe on duplicated
descriptors (a descriptor mitmproxy closes meanwhile is never reused under the splice). The
stream hears of every byte (`PassThrough.moved`), so counts and logs are unchanged. When the
body is complete the layers get its end as if the last byte had just been read. If either side
fails or closes, or the connection is closed by the layers, the backend connection is aborted
and the layers see the backend close before the body's end, as they would without the splice:
the flow ends with an error and the client's connection is closed.

Where a splice cannot be had, mitmproxy's path carries the body, as before: descriptors short,
MAX_ACTIVE splices already running in this worker (their descriptors are reserved within the
connection caps), or splice(2) refused by the kernel or a sandbox (then for good, logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable
from typing import Any

from h11._readers import ContentLengthReader
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import _http1

from addons.engine import readgate

logger = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # below this, the pipe's setup costs more than the copies it saves
PIPE_SIZE = 256 * 1024  # asked for; Linux may give less (fs.pipe-max-size, user limits)
YIELD_BYTES = 2 << 20  # a turn for the other connections after this much without a wait (~2 ms)
WAKE_S = 1.0  # while waiting on a socket, look this often at whether either side was closed
READ_TAIL = 64 * 1024  # what is read at once of bytes beyond the body
CHECK_ROUNDS = 32  # while moving, look whether the layers closed a side every so many rounds
# Splices at once per worker; each holds FDS_EACH descriptors (two duplicates, a pipe), which
# the connection caps leave room for (engine/connections.py: fd_cap). Beyond: the engine's path.
MAX_ACTIVE = 64
FDS_EACH = 4
_MOVE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
CAN_READ, CAN_WRITE = ConnectionState.CAN_READ, ConnectionState.CAN_WRITE


class PassThrough:
    """A response stream for a body that reaches the client unchanged: it only counts
    (`count`, with each chunk's length). The engine may splice such a body."""

    __slots__ = ("count", "passed", "spliced")

    def __init__(self, count: Callable[[int], None]) -> None:
        self.count = count
        self.passed = 0  # bytes of the body handed on, through the layers or spliced
        self.spliced = 0  # of which moved in the kernel

    def __call__(self, chunk: bytes) -> bytes:
        self.passed += len(chunk)
        self.count(len(chunk))
        return chunk

    def moved(self, n: int) -> None:
        """`n` bytes spliced to the client."""
        self.passed += n
        self.spliced += n
        self.count(n)


class Offer(commands.ConnectionCommand):
    """From an Http1Client: the rest of its answer's body may be spliced (see `ready`)."""

    def __init__(self, connection: Any, layer: Any) -> None:
        super().__init__(connection)
        self.layer = layer


def _plain_tcp(conn: Any) -> bool:
    return not conn.tls and conn.transport_protocol == "tcp" and conn.alpn in (None, b"http/1.1")


def ready(layer: Any) -> int:
    """The bytes left of `layer`'s answer body when they may be spliced now, else 0."""
    if not available or not isinstance(layer, _http1.Http1Client):
        return 0
    if layer.state != layer.read_body:
        return 0
    reader = layer.body_reader
    if not isinstance(reader, ContentLengthReader) or layer.buf:
        return 0
    left = reader._remaining
    request, response = layer.request, layer.response
    if left < MIN_BYTES or request is None or response is None:
        return 0
    stream = response.stream
    if not isinstance(stream, PassThrough) or not stream.passed:
        return 0
    headers = response.headers
    if (
        request.method != "GET"
        or "transfer-encoding" in headers
        or headers.get("content-length") != str(stream.passed + left)
        or layer.context.options.store_streamed_bodies
        or not _plain_tcp(layer.conn)
        or not _plain_tcp(layer.context.client)
    ):
        return 0
    return left


def offer(layer: Any) -> Offer | None:
    """The command to yield after a body chunk, when the rest may be spliced."""
    return Offer(layer.conn, layer) if ready(layer) else None


def _offers(handler: Any) -> dict[Any, Any]:
    """The offers a connection handler keeps for its connections' readers, by connection."""
    return handler.__dict__.setdefault("_tbf_offers", {})


def take_offer(handler: Any, command: Offer) -> None:
    """Called where the handler carries out commands: keep it for the connection's reader."""
    _offers(handler)[command.connection] = command.layer


class _Stop(Exception):
    """The splice cannot go on; the backend connection is aborted."""


class _Unsupported(Exception):
    """splice(2) refused these sockets before taking a byte (a sandbox's kernel, a seccomp
    profile): mitmproxy's path carries this body, and every later one."""


# What a kernel or sandbox without splice(2) for sockets answers.
UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM})
available = True  # until splice(2) is refused once in this process
active = 0  # splices running in this process


def _check_open(server: Any, client: Any) -> None:
    """_Stop once the layers closed either connection (they may, while a splice runs)."""
    if not (server.state & CAN_READ and client.state & CAN_WRITE):
        raise _Stop("closed by the layers")


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    timer = loop.call_later(WAKE_S, wake)
    try:
        await done
    finally:
        timer.cancel()
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _empty(writer: asyncio.StreamWriter) -> None:
    """Until everything written to `writer` before is out of asyncio's buffer."""
    transport = writer.transport
    if transport.get_write_buffer_size() == 0:
        return
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        await writer.drain()
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)


def _open(server_io: Any, client_io: Any) -> list[int] | None:
    """Duplicates of the backend's and the client's sockets, and a pipe; None if any cannot
    be had (descriptors short: then mitmproxy's path carries the body)."""
    fds: list[int] = []
    try:
        for io in (server_io, client_io):
            fds.append(os.dup(io.writer.transport.get_extra_info("socket").fileno()))
        fds += os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, AttributeError):
        for fd in fds:
            os.close(fd)
        return None
    with contextlib.suppress(OSError):
        fcntl.fcntl(fds[3], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return fds


async def _move(handler: Any, layer: Any, fds: list[int], left: int) -> bytes:
    """Splice `left` bytes from the backend's socket to the client's, then return what the
    backend sent beyond them that is already there (normally nothing). _Stop on any failure;
    the stream is told of every byte that reached the client's socket."""
    loop = asyncio.get_running_loop()
    src, dst, pipe_r, pipe_w = fds
    stream, server, client = layer.response.stream, layer.conn, layer.context.client
    watchdog = handler.timeout_watchdog
    in_pipe = moved = rounds = short = 0
    started = False
    try:
        while left or in_pipe:
            rounds += 1
            if rounds % CHECK_ROUNDS == 0:
                _check_open(server, client)
            filled = drained = 0
            if left:
                try:
                    filled = os.splice(src, pipe_w, left, flags=_MOVE)
                except BlockingIOError:
                    pass  # no data yet, or the pipe is full
                except OSError as e:
                    if e.errno in UNSUPPORTED and not started:
                        raise _Unsupported(str(e)) from e  # nothing taken: mitmproxy's path
                    raise
                else:
                    started = True
                    if filled == 0:  # the backend closed early: pass on what it sent, then stop
                        short, left = left, 0
                        continue
                    left -= filled
                    in_pipe += filled
            if in_pipe:
                try:
                    drained = os.splice(pipe_r, dst, in_pipe, flags=_MOVE)
                except BlockingIOError:
                    pass  # the client's socket buffer is full
                else:
                    in_pipe -= drained
                    moved += drained
                    stream.moved(drained)
            if filled or drained:
                watchdog.register_activity()  # progress only: a stalled side still times out
                if moved >= YIELD_BYTES:
                    moved = 0
                    await asyncio.sleep(0)
                    _check_open(server, client)
                continue
            await _wait(loop, dst, write=True) if in_pipe else await _wait(loop, src, write=False)
            _check_open(server, client)
        if short:
            raise _Stop(f"the backend closed {short} bytes before the body's end")
        # Bytes that came with the body's end go to the layers with it, as on mitmproxy's
        # path (where a response that runs on is refused), never left to be read as the
        # answer to the client's next request.
        try:
            tail = os.read(src, READ_TAIL)
        except BlockingIOError:
            tail = b""
    except OSError as e:
        raise _Stop(str(e)) from e
    layer.body_reader._remaining = 0
    return tail


async def run(handler: Any, connection: Any, layer: Any) -> None:
    """Take up an offer on `connection` (the backend's): see the module docstring."""
    global active, available
    server_io = handler.transports.get(connection)
    client_io = handler.transports.get(layer.context.client)
    if server_io is None or client_io is None or client_io.writer is None:
        return
    reader, transport = server_io.reader, server_io.writer.transport
    transport.pause_reading()
    reader._paused = False  # only this function resumes it now
    spliced, tail = False, b""
    try:
        if reader._buffer:  # already received: through the layers, as any read
            data = bytes(reader._buffer)
            reader._buffer.clear()
            await handler.server_event(events.DataReceived(connection, data))
            _offers(handler).pop(connection, None)
        if reader._eof or reader.exception() is not None or not ready(layer):
            return
        try:
            await _empty(client_io.writer)
        except OSError:
            transport.abort()
            return
        left = ready(layer)
        if not left or transport.is_closing() or client_io.writer.is_closing():
            return
        fds = _open(server_io, client_io) if active < MAX_ACTIVE else None
        if fds is None:
            return
        active += 1
        try:
            tail = await _move(handler, layer, fds, left)
        except _Unsupported as e:
            available = False
            logger.warning("splice(2) refused (%s): large bodies go through the engine", e)
            return
        except _Stop as e:
            logger.debug("splice stopped: %s", e)
            transport.abort()  # the layers see the backend close before the body's end
            return
        finally:
            active -= 1
            for fd in fds:
                os.close(fd)
        spliced = True
    finally:
        if not transport.is_closing():
            transport.resume_reading()
    if spliced:  # the body is complete: its end, as if its last bytes had just been read
        await handler.server_event(events.DataReceived(connection, tail))
        await handler.drain_writers()


async def _run_closed_on_error(handler: Any, connection: Any, layer: Any) -> None:
    """`run`, where an unforeseen error aborts the backend connection (the layers then see
    it close before the body's end) instead of ending this reading task with no one told."""
    try:
        await run(handler, connection, layer)
    except (OSError, asyncio.CancelledError):
        raise
    except Exception:
        logger.exception("splice failed; closing the backend connection")
        io = handler.transports.get(connection)
        if io is not None and io.writer is not None:
            io.writer.transport.abort()


async def handle_connection(self: Any, connection: Any) -> None:
    """mitmproxy's ConnectionHandler.handle_connection, with two steps before each read: an
    offer (`take_offer`) for this connection is taken up (`run`), and a client waits while
    a blocking hook of its connection runs (readgate.py)."""
    cancelled = None
    reader = self.transports[connection].reader
    assert reader
    offers = _offers(self)
    while True:
        try:
            layer = offers.pop(connection, None)
            if layer is not None:
                await _run_closed_on_error(self, connection, layer)
                continue
            await readgate.wait(self, connection)
            data = await reader.read(65535)
            if not data:
                raise OSError("Connection closed by peer.")
        except OSError:
            break
        except asyncio.CancelledError as e:
            cancelled = e
            break

        await self.server_event(events.DataReceived(connection, data))

        try:
            await self.drain_writers()
        except asyncio.CancelledError as e:
            cancelled = e
            break

    if cancelled is None and connection.transport_protocol == "tcp":
        # TCP connections can be half-closed.
        connection.state &= ~ConnectionState.CAN_READ
    else:
        connection.state = ConnectionState.CLOSED

    await self.server_event(events.ConnectionClosed(connection))

    if connection.state is ConnectionState.CAN_WRITE:
        # we may still use this connection to *send* stuff,
        # even though the remote has closed their side of the connection.
        # to make this work we keep this task running and wait for cancellation.
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as e:
            cancelled = e

    try:
        writer = self.transports[connection].writer
        assert writer
        writer.close()
    except OSError:
        pass
    self.transports.pop(connection)

    if cancelled:
        raise cancelled
