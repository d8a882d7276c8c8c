"""One bounded HTTP exchange with the coordinator: the answer arrives whole within a deadline
and a size cap, or not at all.

`requests` timeouts apply per socket read, so a server that drips one byte per second (in the
headers or the body) would hold a caller for as long as it likes; and `requests` reads a body
of any size. Here a watchdog shuts the socket down when the overall deadline passes (which
wakes any blocked read, in any phase: connect, headers, body), the body is read in chunks and
abandoned past `max_bytes`, and redirects are answers, never followed. http.client sends
`Accept-Encoding: identity`, so there is no compressed body to inflate either.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_BODY = 1 << 20  # 1 MiB: a peer list of thousands of nodes fits many times over
DEADLINE = 10.0  # seconds for the whole exchange
CONNECT_TIMEOUT = 5.0
_CHUNK = 64 * 1024


class FetchError(Exception):
    """No usable answer: unreachable, too slow, too big, or malformed HTTP. str() = why."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    location: str | None = None


class _Watchdog:
    """Shuts the connection's socket down at the deadline: a blocked recv() returns at once."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self.conn = conn
        self.fired = False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    max_bytes: int = MAX_BODY,
    deadline: float = DEADLINE,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> Answer:
    """One request; the status and the whole body, or FetchError."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise FetchError(f"invalid URL {url!r}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise FetchError(f"invalid URL {url!r}")
    timeout = min(connect_timeout, deadline)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    end = time.monotonic() + deadline
    try:
        with _Watchdog(conn, deadline) as watchdog:
            try:
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
                declared = response.getheader("Content-Length")
                if declared and declared.strip().isdigit() and int(declared) > max_bytes:
                    raise FetchError(f"answer of {int(declared)} bytes (limit {max_bytes})")
                chunks: list[bytes] = []
                size = 0
                while chunk := response.read1(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FetchError(f"answer larger than {max_bytes} bytes")
                    if time.monotonic() > end:
                        raise FetchError(f"no complete answer within {deadline:g}s")
                    chunks.append(chunk)
                if watchdog.fired:  # a close-delimited body cut short by the watchdog
                    raise FetchError(f"no complete answer within {deadline:g}s")
                return Answer(response.status, b"".join(chunks), response.getheader("Location"))
            except FetchError:
                raise
            except (OSError, http.client.HTTPException, ValueError) as e:
                if watchdog.fired or time.monotonic() > end:
                    raise FetchError(f"no complete answer within {deadline:g}s") from None
                raise FetchError(f"unreachable ({type(e).__name__})") from None
    finally:
        conn.close()
