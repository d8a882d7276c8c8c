"""The container's two log streams, relayed by `run` so that no log consumer can stall the
registry.

Every program writes into a FIFO under `$REGISTRY_DATA_DIR/run/logs/` (supervisord is told to
use them as the programs' log files; the gateway workers write their access log straight into
`access.fifo`, one line per write). `run` reads all of them at all times into bounded queues
and writes them out from its own threads:

- stdout: the access log, one JSON object per line, exactly as the gateway wrote it;
- stderr: the operator log, one JSON object per line: `{"time", "source", "message"}` where
  `source` names the program (`backend`, `mitmdump-0`, `mesh`, `supervisord`, …).

When a consumer stops reading (a pipe nobody drains, a stuck log shipper), the queues fill
and whole lines are dropped and counted instead of blocking anything upstream; one warning
says how many were dropped, and the counts are in `dropped.json` for `/metrics`. Nothing
upstream ever waits for the consumer: programs write into FIFOs that are always drained.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import selectors
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

MAX_QUEUED = 20_000  # lines per stream: a few MiB at most
MAX_LINE = 64 * 1024  # a longer line is cut (the access log's are < 4 KiB)
STATUS_EVERY = 1.0


def operator_line(source: str, message: str) -> bytes:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    entry = {"time": now.replace("+00:00", "Z"), "source": source, "message": message}
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


class Stream:
    """One output (stdout or stderr): a bounded queue of lines and a writer thread.
    `warn` receives one line about dropped lines once the consumer reads again."""

    def __init__(self, name: str, out: IO[bytes], warn: Callable[[bytes], None] | None = None):
        self.name = name
        self.out = out
        self.warn = warn or self.put
        self.queue: deque[bytes] = deque()
        self.dropped = 0
        self._reported = 0
        self._ready = threading.Condition()
        threading.Thread(target=self._write, name=f"log-{name}", daemon=True).start()

    def put(self, line: bytes) -> None:
        with self._ready:
            if len(self.queue) >= MAX_QUEUED:
                self.dropped += 1
                return
            self.queue.append(line)
            self._ready.notify()

    def _write(self) -> None:
        while True:
            with self._ready:
                while not self.queue:
                    self._ready.wait()
                batch = b"".join(self.queue)
                self.queue.clear()
                dropped = self.dropped - self._reported
                self._reported = self.dropped
            try:
                self.out.write(batch)
                self.out.flush()
            except OSError:
                time.sleep(0.1)  # a closed or broken output: drop, keep draining
                continue
            if dropped:  # said once the consumer reads again, not once per dropped line
                message = f"{dropped} {self.name} lines dropped while nobody was reading"
                self.warn(operator_line("run", message))


class LogRelay:
    """Reads the FIFOs of a log directory and the sources given, forever, in one thread."""

    def __init__(self, directory: Path, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.directory = directory
        operator = Stream("stderr", stderr)
        self.streams = {"stdout": Stream("stdout", stdout, operator.put), "stderr": operator}
        self._selector = selectors.DefaultSelector()
        self._partial: dict[int, bytes] = {}
        self._drop: dict[int, Callable[[bytes], bool]] = {}
        self._keep_open: list[int] = []

    def fifo(self, name: str, drop: Callable[[bytes], bool] | None = None) -> Path:
        """Create (if needed) and start reading `<directory>/<name>`; returns its path.
        `drop`: lines of this source that are not relayed at all."""
        path = self.directory / name
        if path.exists() and not stat.S_ISFIFO(path.stat().st_mode):
            path.unlink()
        if not path.exists():
            os.mkfifo(path, 0o600)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # Hold a writer too: with none, a FIFO reads as EOF (and polls readable) forever
        # between one program's exit and its restart.
        self._keep_open.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        stream = "stdout" if name == "access.fifo" else "stderr"
        self._selector.register(fd, selectors.EVENT_READ, (name.rsplit(".", 1)[0], stream))
        if drop is not None:
            self._drop[fd] = drop
        return path

    def source(self, fd: int, name: str, stream: str) -> None:
        """Also relay an already open pipe (supervisord's own output)."""
        os.set_blocking(fd, False)
        self._selector.register(fd, selectors.EVENT_READ, (name, stream))

    def start(self) -> None:
        threading.Thread(target=self._read, name="log-relay", daemon=True).start()
        threading.Thread(target=self._status, name="log-status", daemon=True).start()

    def _read(self) -> None:
        while True:
            for key, _ in self._selector.select():
                source, stream = key.data
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:  # a closed pipe (supervisord's, at exit)
                    self._selector.unregister(key.fd)
                    continue
                self._lines(key.fd, source, stream, data)

    def _lines(self, fd: int, source: str, stream: str, data: bytes) -> None:
        *lines, rest = (self._partial.pop(fd, b"") + data).split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = b""
        if rest:
            self._partial[fd] = rest
        out, drop = self.streams[stream], self._drop.get(fd)
        for line in lines:
            line = line[:MAX_LINE].rstrip(b"\r")
            if not line.strip() or (drop is not None and drop(line)):
                continue
            if stream == "stdout":
                out.put(line + b"\n")
            else:
                out.put(operator_line(source, line.decode("utf-8", "replace")))

    def drain(self, timeout: float = 2.0) -> None:
        """At exit: give the writers a bounded moment to write what is queued."""
        deadline = time.monotonic() + timeout
        while any(s.queue for s in self.streams.values()) and time.monotonic() < deadline:
            time.sleep(0.02)

    def dropped(self) -> dict[str, int]:
        return {name: s.dropped for name, s in self.streams.items()}

    def _status(self) -> None:
        """`dropped.json` for the admin endpoint's /metrics (written when it changes)."""
        last: dict[str, int] = {}
        while True:
            time.sleep(STATUS_EVERY)
            now = self.dropped()
            if now != last:
                tmp = self.directory / ".dropped.json"
                with contextlib.suppress(OSError):
                    tmp.write_text(json.dumps(now))
                    tmp.replace(self.directory / "dropped.json")
                last = now
