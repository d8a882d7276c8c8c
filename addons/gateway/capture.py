"""Debug capture: mitmproxy flow files of live traffic, bounded in time and size, redacted.

Started from the admin endpoint (`POST /capture?seconds=60&max_mb=64`), written by each
gateway worker to `<registry_capture_dir>/capture-<id>.w<n>.flows` and joined into
`capture-<id>.flows`, readable with `mitmproxy -r` / `mitmdump -nr`.
What is written is a copy of each flow with no bodies at all and every credential replaced:
Authorization/Cookie headers, and anything shaped like a JWT in headers or the URL (the rules
are addons/decisions/redact.py's, shared with the live view).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import IO

from mitmproxy import ctx, http, io
from mitmproxy.addonmanager import Loader

from addons.decisions import redact

logger = logging.getLogger(__name__)


def redacted(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of the flow with no bodies and every credential replaced (decisions/redact.py)."""
    copy = flow.copy()
    for message in (copy.request, copy.response):
        if message is None:
            continue
        message.headers.fields = redact.fields(message.headers.fields)
        message.content = None  # no bodies: tokens, JWT forms and layers stay out
    copy.request.path = redact.text(copy.request.path)
    copy.metadata.clear()
    return copy


class Capture:
    """This worker's part of a debug capture, while the admin endpoint asks for one.

    The admin endpoint (addons/admin/capture.py) writes the request into the state
    directory; every worker follows it (`follow`, called by the publisher once a second) and
    writes `capture-<id>.w<worker>.flows`; the admin endpoint joins the parts when it ends."""

    def __init__(self) -> None:
        self.file: IO[bytes] | None = None
        self.writer: io.FlowWriter | None = None
        self.path: Path | None = None
        self.capture_id: str | None = None
        self.last_id: str | None = None  # the capture `flows` counts: kept after it ends
        self.until = 0.0  # epoch seconds
        self.max_bytes = 0
        self.flows = 0

    def load(self, loader: Loader) -> None:
        loader.add_option("registry_capture_dir", str, "", "Where debug captures are written.")

    def follow(self, request: dict[str, object] | None, worker: int) -> None:
        """Start, keep or stop writing to match the capture requested (None: none)."""
        wanted = None
        if request and isinstance(request.get("id"), str) and request.get("until", 0) > time.time():  # type: ignore[operator]
            wanted = str(request["id"])
        if wanted == self.capture_id:
            return
        self.stop()
        if wanted is not None and request is not None:
            self.start(wanted, float(request["until"]), int(request["max_bytes"]), worker)  # type: ignore[arg-type]

    def start(self, capture_id: str, until: float, max_bytes: int, worker: int) -> None:
        self.stop()
        directory = Path(ctx.options.registry_capture_dir or ".")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / f"capture-{capture_id}.w{worker}.flows"
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by stop()
        self.writer = io.FlowWriter(self.file)
        self.capture_id, self.until, self.max_bytes, self.flows = capture_id, until, max_bytes, 0
        self.last_id = capture_id

    def stop(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.writer = None
        self.capture_id = None

    def status(self) -> dict[str, object]:
        """`id`: the capture being written (None when none); `flows`: written to the part of
        capture `last`, which stays after it ends (the admin endpoint counts finished
        captures too)."""
        return {"id": self.capture_id, "last": self.last_id, "flows": self.flows}

    def _write(self, flow: http.HTTPFlow) -> None:
        if self.writer is None or self.file is None:
            return
        if time.time() > self.until or self.file.tell() > self.max_bytes:
            self.stop()
            return
        self.writer.add(redacted(flow))
        self.flows += 1

    def response(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._write(flow)

    def done(self) -> None:
        self.stop()
