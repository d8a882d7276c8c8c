"""A tiny HTTP/1.1 client over a raw socket: no HTTP library between a test and the gateway,
so that a test can send exactly the bytes it means (fragments, bad framing, pipelining)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

TIMEOUT = 10.0  # seconds, for every socket


@dataclass
class Answer:
    status: int
    head: bytes
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class Conn:
    """One client connection; `read_answer` parses exactly one response (None = closed)."""

    def __init__(self, port: int, timeout: float = TIMEOUT, source: str | None = None) -> None:
        """`source`: another loopback address to connect from (127.0.0.2, …): a second client."""
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> bool:
        """False when the gateway already closed or reset the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def shut_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def read_answer(self, method: str = "GET") -> Answer | None:
        """One response, or None if the gateway closed (or reset) without one. A gateway that
        neither answers nor closes within the timeout fails the test (socket.timeout)."""
        try:
            line = self.file.readline(64 * 1024)
        except ConnectionResetError:
            return None
        if not line:
            return None
        head = line
        parts = line.split(None, 2)
        assert len(parts) >= 2 and parts[0].startswith(b"HTTP/1."), line
        status = int(parts[1])
        headers: dict[str, list[str]] = {}
        while True:
            h = self.file.readline(64 * 1024)
            head += h
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        answer = Answer(status, head, headers)
        if 100 <= status < 200 or status in (204, 304) or method == "HEAD":
            return answer
        if (length := answer.header("content-length")) is not None:
            answer.body = self.file.read(int(length))
        elif "chunked" in (answer.header("transfer-encoding") or "").lower():
            while size := int(self.file.readline().split(b";")[0], 16):
                answer.body += self.file.read(size)
                self.file.readline()
            self.file.readline()
        else:
            answer.body = self.file.read()
        return answer

    def closed(self) -> bool:
        """True if the gateway closes the connection (EOF or reset) within the timeout."""
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def exchange(
    port: int, data: bytes, shut_write: bool = False, source: str | None = None
) -> Answer | None:
    conn = Conn(port, source=source)
    try:
        conn.send(data)
        if shut_write:
            conn.shut_write()
        return conn.read_answer()
    finally:
        conn.close()
