"""A TCP relay that loses one answer: what a network cut at the worst moment does to a client.

Between a client and a server (here the ledger and PostgreSQL). Once `arm`ed with a marker,
the client's next bytes holding it are forwarded, the server's answer to them is read and
thrown away, and both sides are closed: the server did the work (a COMMIT: committed), the
client never hears of it (its connection is lost, the outcome unknown to it).
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.listener import serve_each


class Cutter:
    def __init__(self, port: int) -> None:
        self.port = port  # the server's, on loopback
        self.marker: bytes | None = None
        self.cut = threading.Event()  # an answer was thrown away
        self.listener = serve_each(self._relay)
        self.listen_port = self.listener.getsockname()[1]

    def arm(self, marker: bytes) -> None:
        self.cut.clear()
        self.marker = marker

    def _relay(self, client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", self.port))
        cutting = threading.Event()
        threading.Thread(target=self._down, args=(server, client, cutting), daemon=True).start()
        self._up(client, server, cutting)

    def _up(self, client: socket.socket, server: socket.socket, cutting: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    cutting.set()  # before forwarding: the answer is not yet on its way
                server.sendall(data)
        _close(client, server)

    def _down(self, server: socket.socket, client: socket.socket, cutting: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if cutting.is_set():
                    self.cut.set()
                    break  # the answer is dropped, the connection cut
                client.sendall(data)
        _close(client, server)

    def close(self) -> None:
        self.listener.close()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
