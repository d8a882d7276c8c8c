"""The connection guard: the options of client connection lifetimes and caps, and the sweeper
that closes what outlived them, once a second (the bookkeeping: addons/engine/connections.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from addons.engine import oci
from addons.engine.connections import (
    ACCEPT_LOG_EVERY,
    DEFAULT_MAX_CONNECTIONS,
    SLOW_ANSWER,
    SWEEP_SECONDS,
    expired,
    fd_cap,
    limits,
    raise_fd_limit,
    servers,
    timed_out,
)

logger = logging.getLogger(__name__)


class ConnectionGuard:
    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._accept_errors = 0
        self._accept_logged = 0.0

    def load(self, loader: Loader) -> None:
        loader.add_option("registry_header_timeout", int, 60, "Seconds a request head may take.")
        loader.add_option(
            "registry_idle_timeout", int, 75, "Seconds an idle keep-alive connection lives."
        )
        loader.add_option(
            "registry_max_connections",
            int,
            0,
            f"Open client connections at most (0 = {DEFAULT_MAX_CONNECTIONS}, or fewer if the"
            " file descriptors do not allow as many).",
        )
        loader.add_option(
            "registry_max_client_connections", int, 256, "Open connections per client address."
        )
        loader.add_option(
            "registry_max_client_pending",
            int,
            32,
            "Open connections per client address that have not completed a request head.",
        )

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if not 0 < o.registry_header_timeout <= 3600 or not 0 < o.registry_idle_timeout <= 3600:
            raise exceptions.OptionsError("connection timeouts must be in (0, 3600] seconds")
        if (
            o.registry_max_connections < 0
            or o.registry_max_client_connections < 1
            or o.registry_max_client_pending < 1
        ):
            raise exceptions.OptionsError("connection caps must be positive")
        raise_fd_limit()
        total = min(fd_cap(), o.registry_max_connections or DEFAULT_MAX_CONNECTIONS)
        limits.total, limits.per_client = total, o.registry_max_client_connections
        limits.per_client_pending = min(
            o.registry_max_client_pending, o.registry_max_client_connections
        )

    async def running(self) -> None:
        loop = asyncio.get_running_loop()
        default = loop.get_exception_handler()
        loop.set_exception_handler(
            lambda lp, context: self._exception(lp, context, default)  # type: ignore[arg-type]
        )
        self._task = asyncio.create_task(self._sweep())

    async def done(self) -> None:
        if self._task:
            self._task.cancel()

    def _exception(self, loop: Any, context: dict[str, Any], default: Any) -> None:
        """asyncio logs a traceback for every failed accept (EMFILE: thousands a second):
        one line per ACCEPT_LOG_EVERY seconds instead, with the count."""
        if "accept" not in str(context.get("message", "")):
            if default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self._accept_errors += 1
        now = time.monotonic()
        if now - self._accept_logged >= ACCEPT_LOG_EVERY:
            logger.warning(
                "accepting connections fails (%s); %d failures since the last message",
                context.get("exception"),
                self._accept_errors,
            )
            self._accept_logged, self._accept_errors = now, 0

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.sweep(time.monotonic())
            except Exception:  # the sweeper must outlive any one connection's oddity
                logger.exception("connection sweep failed")

    def sweep(self, now: float) -> None:
        o = ctx.options
        header_timeout, idle_timeout = o.registry_header_timeout, o.registry_idle_timeout
        silent_since = time.time() - header_timeout  # accept times are wall-clock
        for client_id, handler in list(ctx.master.addons.get("proxyserver").connections.items()):
            server = servers.get(client_id)
            if server is not None:
                status = expired(server, now, header_timeout, idle_timeout)
            elif handler.client.timestamp_start < silent_since:
                status = 0  # connected, and not a byte of a request since
            else:
                status = None
            if status is None:
                continue
            io = handler.transports.get(handler.client)
            if io is None or io.handler is None or io.handler.done() or io.handler.cancelling():
                continue
            timed_out["head" if status else "idle"] += 1
            if status and io.writer is not None and not io.writer.is_closing():
                io.writer.write(oci.wire_error(status, "UNSUPPORTED", "request head timed out"))
            io.handler.cancel("timeout")
        self.cut_slow(now)

    def cut_slow(self, now: float) -> None:
        """Close the slow heads a source holds beyond its cap, with the cap's 503."""
        excess = set(limits.excess(now))
        if not excess:
            return
        for handler in list(ctx.master.addons.get("proxyserver").connections.values()):
            peer = handler.client.peername
            if not peer or (str(peer[0]), int(peer[1])) not in excess:
                continue
            io = handler.transports.get(handler.client)
            if io is None or io.handler is None or io.handler.done() or io.handler.cancelling():
                continue
            timed_out["slow"] += 1
            if io.writer is not None and not io.writer.is_closing():
                io.writer.write(SLOW_ANSWER)
            io.handler.cancel("slow head")
