"""A loopback TCP listener for test servers that speak raw bytes (a scripted backend, a
relay that cuts): every connection is handed to the server's own function, in a thread of
its own, until the listener is closed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


def serve_each(handle: Callable[[socket.socket], None]) -> socket.socket:
    """Listen on a free loopback port; `handle(conn)` runs for each connection in a daemon
    thread. Returns the listening socket: closing it stops the accepting."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener
