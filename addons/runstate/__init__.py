"""The run-state files the registry's processes pass each other, and the one way to write
and to follow them.

`$REGISTRY_DATA_DIR/run/` (Settings.runtime_dir), written by `tabbify-registry run`:

    settings.json           the environment `run` was started with (deployment.py)
    backend-credential      the run's backend `user:password`, 0600 (clients/backend_credential.py)
    backend-htpasswd        its bcrypt hash, read by the backend

`$REGISTRY_DATA_DIR/run/workers/` (Settings.state_dir, the workers' `registry_state_dir`):

    worker-<n>.json         what gateway worker n publishes once a second (gateway/publish.py)
    capture.json            the debug capture the admin endpoint asks of the workers
    liveview.json           the live view's request to stream flows (addons/gateway/flowfeed.py)
    liveview.sock           where the workers stream them to the admin endpoint
    freeze.json             gc's write freeze, a lease (addons/gateway/freeze.py, addons/cli/gc.py)
    signatures.generation   rewritten to drop every worker's cached signature verdicts
                            (gateway/require_signature.py)
    claims/                 pushes of immutable tags in progress (addons/runstate/tag_claims.py)

and in its `logs/` directory (Settings.log_dir):

    dropped.json            lines the log relay dropped, per program (its /metrics counts)

Every such file is written whole by `write` (temp file, rename: a reader sees the old file or
the new one) and followed by `Watch` (a stat per look: (st_dev, st_ino, st_size,
st_mtime_ns) changes with every rename and every rewrite).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SETTINGS = "settings.json"
WORKERS = "workers"
CAPTURE = "capture.json"
LIVEVIEW = "liveview.json"
LIVEVIEW_SOCKET = "liveview.sock"
FREEZE = "freeze.json"
SIGNATURES_GENERATION = "signatures.generation"
CLAIMS = "claims"
LOG_DROPPED = "dropped.json"
WORKER_GLOB = "worker-*.json"
MODE = 0o600  # a new file: the registry's user alone (every process runs as it)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """`path` holds `data` (mode `mode`, whatever the umask), or still what it held: a reader
    sees the old file or the new one, never part of one. `durable`: on disk before this
    returns (fsync of the file and its directory); run-state files rewritten every second
    that a restart starts afresh anyway go without. The registry's only writer of this kind:
    the mesh's state, the run-state files, the backend's configuration all go through it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def worker_state(worker: int) -> str:
    return f"worker-{worker}.json"


def write(path: Path, data: bytes, mode: int | None = None, durable: bool = False) -> None:
    """`path` holds `data`, atomically. Its mode: `mode`, else the file's own (an operator's
    chmod is kept), else MODE. `durable`: fsync before returning (files a restart needs)."""
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = MODE
    write_atomic(path, data, mode=mode, durable=durable)


def write_json(path: Path, data: Any, mode: int | None = None, durable: bool = False) -> None:
    write(path, json.dumps(data).encode(), mode, durable)


Stamp = tuple[int, int, int, int]
UNREADABLE: Stamp = (-1, -1, -1, -1)


MAX_CONTROL = 4096


def read_request(path: Path) -> dict[str, Any] | None:
    """A control file the admin program writes for the workers (a capture, the live view's
    stream), or None: at most MAX_CONTROL bytes of JSON object."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_CONTROL))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stamp(path: Path) -> Stamp | None:
    """What any rewrite of `path` changes; None when there is no such file, UNREADABLE when
    it cannot be looked at (a directory without access: the reader will say what is wrong)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        return UNREADABLE
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Watch:
    """Whether a file changed since the last look (a stat per look; no reading)."""

    def __init__(self, path: Path | None, seen: Stamp | None = None) -> None:
        self.path, self.seen = path, seen

    def changed(self) -> bool:
        """True once per change (a file that appears or goes counts); False without a path."""
        if self.path is None:
            return False
        now = stamp(self.path)
        if now == self.seen:
            return False
        self.seen = now
        return True


class Followed[T]:
    """A file's content as `read` makes it, read again only when the file changed (None
    while there is no such file)."""

    def __init__(self, read: Callable[[Path], T | None]) -> None:
        self.read, self.watch = read, Watch(None)
        self.value: T | None = None

    def current(self, path: Path | None) -> T | None:
        self.watch.path = path
        if self.watch.changed():
            self.value = None if self.watch.seen is None or path is None else self.read(path)
        return self.value if path is not None else None
