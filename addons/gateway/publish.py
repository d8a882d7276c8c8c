"""What this gateway worker publishes for the admin endpoint, once a second.

Several worker processes serve the port; the operator's view (addons/admin/program.py) is
one. Each worker writes its counters and states into `<registry_state_dir>/worker-<n>.json`
(atomic rename: the admin endpoint never reads half a file) and follows the debug capture the
admin endpoint requests in `<registry_state_dir>/capture.json`, and the live view's in
`liveview.json` (addons/gateway/flowfeed.py). Nothing here is on a request's path: a timer on the
event loop, one small file write per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader

from addons import runstate
from addons.decisions.metrics import Metrics
from addons.engine import connections
from addons.gateway.capture import Capture
from addons.gateway.flowfeed import CONTROL_NAME, FlowFeed

logger = logging.getLogger(__name__)

EVERY = 1.0  # seconds


def extra_state() -> dict[str, Any]:
    """The write freeze this worker has seen and what its writes in flight can link (the GC
    protects it), and the usage per tenant (worker 0 computes it)."""
    out: dict[str, Any] = {}
    freeze = ctx.master.addons.get("writefreeze")
    if freeze is not None:
        out["freeze"] = freeze.state()
    cache = ctx.master.addons.get("contentcache")
    if cache is not None:
        out["cache"] = cache.state()
    accounting = ctx.master.addons.get("accounting")
    if accounting is not None and (usage := accounting.state()) is not None:
        out["tenant_usage"] = usage
    return out


def rss() -> int | None:
    """This process's resident memory in bytes (Linux), or None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Publisher:
    def __init__(self, metrics: Metrics, capture: Capture, feed: FlowFeed | None = None) -> None:
        self.metrics = metrics
        self.capture = capture
        self.feed = feed
        self._task: asyncio.Task[None] | None = None
        # The admin endpoint's requests, read again only when rewritten (a stat a second).
        self._capture_request = runstate.Followed(runstate.read_request)
        self._liveview_request = runstate.Followed(runstate.read_request)

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_state_dir", str, "", "Where workers publish state for the admin endpoint."
        )
        loader.add_option("registry_worker", int, 0, "This gateway worker's index (0, 1, …).")

    async def running(self) -> None:
        if ctx.options.registry_state_dir:
            self._task = asyncio.create_task(self._loop())

    async def done(self) -> None:
        if self._task:
            self._task.cancel()
        if ctx.options.registry_state_dir:  # Path("") would be the working directory
            with contextlib.suppress(Exception):
                self.publish()

    async def _loop(self) -> None:
        while True:
            try:
                self.publish()
            except Exception:  # a full disk must not stop the next attempt
                logger.exception("publishing the worker state failed")
            await asyncio.sleep(EVERY)

    def state(self) -> dict[str, Any]:
        isolation = ctx.master.addons.get("tenantisolation")
        ledger = isolation.ledger if isolation is not None else None
        access_log = ctx.master.addons.get("accesslog")
        return {
            "pid": os.getpid(),
            "worker": ctx.options.registry_worker,
            "rss": rss(),
            "time": time.time(),
            "metrics": self.metrics.state(),
            "connections": connections.state(),
            "ledger": None
            if ledger is None
            else {
                **ledger.status(),
                "errors": ledger.errors,
                "recreated": ledger.recovered,
                "hits": ledger.recorded.hits,
                "misses": ledger.recorded.misses,
            },
            "access_log_dropped": access_log.dropped if access_log is not None else 0,
            "capture": self.capture.status(),
            "liveview": self.feed.status() if self.feed is not None else None,
            **extra_state(),
        }

    def publish(self) -> None:
        directory = Path(ctx.options.registry_state_dir)
        worker = ctx.options.registry_worker
        self.capture.follow(self._capture_request.current(directory / runstate.CAPTURE), worker)
        if self.feed is not None:
            request = self._liveview_request.current(directory / CONTROL_NAME)
            self.feed.follow(request, directory, worker)
        runstate.write_json(directory / runstate.worker_state(worker), self.state())
