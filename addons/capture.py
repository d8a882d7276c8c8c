"""Debug capture: mitmproxy flow files of live traffic, bounded in time and size, redacted.

Started from the admin endpoint (`POST /capture?seconds=60&max_mb=64`), written to
`<registry_capture_dir>/capture-<time>.flows`, readable with `mitmproxy -r` / `mitmdump -nr`.
What is written is a copy of each flow with no bodies at all and every credential replaced:
Authorization/Cookie headers, and anything shaped like a JWT in headers or the URL.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import IO

from mitmproxy import ctx, http, io
from mitmproxy.addonmanager import Loader

logger = logging.getLogger(__name__)
REDACTED = "REDACTED"
_SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "set-cookie")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*")
MAX_SECONDS, MAX_MB = 3600.0, 1024.0


def redacted(flow: http.HTTPFlow) -> http.HTTPFlow:
    copy = flow.copy()
    for message in (copy.request, copy.response):
        if message is None:
            continue
        for name in list(message.headers.keys()):
            if name.lower() in _SECRET_HEADERS:
                message.headers[name] = REDACTED
            else:
                message.headers[name] = _JWT.sub(REDACTED, message.headers[name])
        message.content = None  # no bodies: tokens, JWT forms and layers stay out
    copy.request.path = _JWT.sub(REDACTED, copy.request.path)
    copy.metadata.clear()
    return copy


class Capture:
    def __init__(self) -> None:
        self.file: IO[bytes] | None = None
        self.writer: io.FlowWriter | None = None
        self.path: Path | None = None
        self.until = 0.0
        self.max_bytes = 0
        self.flows = 0

    def load(self, loader: Loader) -> None:
        loader.add_option("registry_capture_dir", str, "", "Where debug captures are written.")

    def start(self, seconds: float, max_mb: float) -> None:
        self.stop()
        directory = Path(ctx.options.registry_capture_dir or ".")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = directory / time.strftime("capture-%Y%m%dT%H%M%SZ.flows", time.gmtime())
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by stop()
        self.writer = io.FlowWriter(self.file)
        self.until = time.monotonic() + min(max(seconds, 1.0), MAX_SECONDS)
        self.max_bytes = int(min(max(max_mb, 0.1), MAX_MB) * 1024 * 1024)
        self.flows = 0
        logger.warning("debug capture started: %s", self.path)

    def stop(self) -> None:
        if self.file is not None:
            self.file.close()
            logger.warning("debug capture stopped: %s (%d flows)", self.path, self.flows)
        self.file = self.writer = None

    def status(self) -> dict[str, object]:
        return {
            "active": self.file is not None,
            "file": str(self.path) if self.path else None,
            "flows": self.flows,
        }

    def _write(self, flow: http.HTTPFlow) -> None:
        if self.writer is None or self.file is None:
            return
        if time.monotonic() > self.until or self.file.tell() > self.max_bytes:
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
