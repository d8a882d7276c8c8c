"""The container's two log streams, relayed by `run` so that no log consumer can stall the
registry.

Every program writes into a FIFO under `$REGISTRY_DATA_DIR/run/logs/` (supervisord is told to
use them as the programs' log files; the gateway workers write their access log straight into
`access.fifo`, one line per write). `run` reads all of them at all times into bounded queues
and writes them out from its own threads:

- stdout: the access log, one JSON object per line, exactly as the gateway wrote it;
- stderr: the operator log, one JSON object per line: `{"time", "level", "source",
  "message"}` where `source` names the program (`backend`, `gateway-0`, `mesh`, `run`, …).
  Each program's own format is read for its level (`classify`) and its timestamp dropped;
  supervisord's chatter about its own mechanics becomes debug, what happened to a program is
  said in the operator's terms. Lines below REGISTRY_LOG_LEVEL are not relayed. On a
  terminal, the same lines in a readable form instead of JSON.

When a consumer stops reading (a pipe nobody drains, a stuck log shipper), the queues fill
and whole lines are dropped and counted instead of blocking anything upstream; one warning
says how many were dropped, and the counts are in `dropped.json` for `/metrics`. Nothing
upstream ever waits for the consumer: programs write into FIFOs that are always drained.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import selectors
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

from addons import runstate

MAX_QUEUED = 20_000  # lines per stream: a few MiB at most
MAX_LINE = 64 * 1024  # a longer line is cut (the access log's are < 4 KiB)
STATUS_EVERY = 1.0


LEVELS = ("debug", "info", "warning", "error")
_LEVEL_NAMES = {
    "debug": "debug", "debg": "debug", "trace": "debug", "trac": "debug", "blat": "debug",
    "info": "info", "warn": "warning", "warning": "warning",
    "error": "error", "erro": "error", "crit": "error", "critical": "error", "fatal": "error",
    "panic": "error",
}  # fmt: skip


def operator_line(source: str, message: str, level: str = "info", readable: bool = False) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    if readable:  # a terminal: for a person, not a log shipper
        clock = now.strftime("%H:%M:%S")
        return f"{clock} {level.upper():<7} {source}: {message}\n".encode()
    time_ = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    entry = {"time": time_, "level": level, "source": source, "message": message}
    return json.dumps(entry, ensure_ascii=False).encode() + b"\n"


_SUPERVISORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ([A-Z]{4}) (.*)")
_PYTHON = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)")
_LOGFMT_TIME = re.compile(r'time="[^"]*" ?')
_LOGFMT_LEVEL = re.compile(r"\blevel=(\w+)")
_TRACEBACK = re.compile(r'Traceback |\s+File "|\w+(Error|Exception)\b')

# What supervisord says about a program, as the operator would say it (None: its own words),
# and at which level: its mechanics of a normal start and stop are debug.
_SUPERVISORD_SAYS: list[tuple[re.Pattern[str], str, str | None]] = [
    (re.compile(r"exited: (\S+) \((.*); not expected\)"), "warning",
     "{0} exited unexpectedly ({1}); restarting it"),
    (re.compile(r"gave up: (\S+) entered FATAL state.*"), "error",
     "{0} could not start (it failed again at each retry)"),
    (re.compile(r"killing '(\S+)' \((\d+)\) with SIGKILL"), "warning",
     "{0} did not stop in time: killed"),
    (re.compile(r"exited: (\S+) \((.*); expected\)"), "info", "{0} exited ({1})"),
    (re.compile(r"spawnerr: (.*)"), "warning", "a program could not be started: {0}"),
    (re.compile(r"stopped: (\S+) \((.*)\)"), "debug", "{0} stopped ({1})"),
    (re.compile(r"(spawned|success|waiting for|received|Included|RPC interface|supervisord started"
                r").*"), "debug",
     None),
    (re.compile(r"Supervisor is running as root.*|Server 'unix_http_server' running without.*"),
     "debug", None),  # run as root by choice (the mesh); the socket is 0700 in the run dir
]  # fmt: skip


def program_name(name: str) -> str:
    """supervisord's process names in the operator's words."""
    if name.startswith("gateway-"):
        return f"gateway worker {name.removeprefix('gateway-')}"
    if name.startswith("mirror-"):
        return f"mirror instance {name.removeprefix('mirror-')}"
    return {"backend": "the backend", "admin": "the admin endpoint", "gc": "the periodic GC",
            "mesh": "the mesh follower"}.get(name, name)  # fmt: skip


def _level(name: str, default: str = "info") -> str:
    return _LEVEL_NAMES.get(name.lower(), default)


def classify(source: str, line: str) -> tuple[str, str]:
    """(level, message) of one line a program wrote: its level read from the program's own
    format, its own timestamp dropped (the operator line has one)."""
    if source == "supervisord":
        m = _SUPERVISORD.fullmatch(line)
        if m is None:
            return "info", line
        level, message = _level(m[1]), m[2]
        for pattern, said_level, said in _SUPERVISORD_SAYS:
            if found := pattern.fullmatch(message):
                if said is None:
                    return said_level, message
                return said_level, said.format(program_name(found[1]), *found.groups()[1:])
        return level, message
    if line.startswith("{"):  # Zot: one JSON object per line
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                level = _level(str(entry.pop("level", "info")))
                entry.pop("time", None)
                message = entry.pop("message", None) or entry.pop("msg", None)
                if source == "gc" and "gc" in entry:  # the periodic GC's summary
                    failed = str(entry["gc"]).startswith("failed")
                    return ("error" if failed else "info"), f"garbage collection: {entry['gc']}"
                rest = json.dumps(entry, ensure_ascii=False) if entry else ""
                return level, " ".join(str(p) for p in (message, rest) if p)
    if m := _PYTHON.fullmatch(line):  # our programs: "LEVEL message"
        return _level(m[1]), m[2]
    if source == "backend" and (m := _LOGFMT_LEVEL.search(line)):  # Distribution (logrus)
        return _level(m[1]), _LOGFMT_TIME.sub("", line, count=1)
    if line.startswith("tabbify-registry mesh: "):  # mesh.bootstrap.warn
        return "warning", line.removeprefix("tabbify-registry mesh: ")
    if line.startswith(("tabbify-registry gc: ", "gateway: ")):  # a refusal at start
        return "error", line
    if _TRACEBACK.match(line):
        return "error", line
    return "info", line


class OperatorText(io.TextIOBase):
    """A text stream whose lines become operator lines of `source`, written at once to `out`:
    for what `run` itself prints before the relay runs (the mesh bootstrap's warnings), as
    `contextlib.redirect_stderr(OperatorText(...))`."""

    def __init__(self, source: str, out: IO[bytes], level: str, readable: bool) -> None:
        self.source, self.out, self.readable = source, out, readable
        self.threshold = LEVELS.index(level)
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            if line.strip():
                level, message = classify(self.source, line)
                if LEVELS.index(level) >= self.threshold:
                    self.out.write(operator_line(self.source, message, level, self.readable))
        self.out.flush()
        return len(text)


class Stream:
    """One output (stdout or stderr): a bounded queue of lines and a writer thread.
    `warn` receives one line about dropped lines once the consumer reads again."""

    def __init__(
        self,
        name: str,
        out: IO[bytes],
        warn: Callable[[bytes], None] | None = None,
        readable: bool = False,
    ):
        self.name = name
        self.readable = readable
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
                self.warn(operator_line("run", message, "warning", self.readable))


class LogRelay:
    """Reads the FIFOs of a log directory and the sources given, forever, in one thread."""

    def __init__(
        self,
        directory: Path,
        stdout: IO[bytes],
        stderr: IO[bytes],
        level: str = "info",
        readable: bool = False,
    ) -> None:
        self.directory = directory
        self.threshold = LEVELS.index(level)
        self.readable = readable
        operator = Stream("stderr", stderr, readable=readable)
        stdout_stream = Stream("stdout", stdout, operator.put, readable=readable)
        self.streams = {"stdout": stdout_stream, "stderr": operator}
        self._selector = selectors.DefaultSelector()
        self._partial: dict[int, bytes] = {}
        self._drop: dict[int, Callable[[bytes], bool]] = {}
        self._last_level: dict[int, str] = {}
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
                continue
            text = line.decode("utf-8", "replace")
            if text[:1] in (" ", "\t") and fd in self._last_level:
                level = self._last_level[fd]  # a traceback's or a message's next line
            else:
                level, text = classify(source, text)
            self._last_level[fd] = level
            self.log(level, text, source=source)

    def log(self, level: str, message: str, source: str = "run") -> None:
        """One operator line (stderr), unless below REGISTRY_LOG_LEVEL."""
        if LEVELS.index(level) >= self.threshold:
            self.streams["stderr"].put(operator_line(source, message, level, self.readable))

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
                with contextlib.suppress(OSError):
                    runstate.write_json(self.directory / runstate.LOG_DROPPED, now)
                last = now
