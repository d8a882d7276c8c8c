"""The operator's loopback endpoint (CONTRACTS §6): /healthz, /metrics and /capture.

A tiny HTTP/1.0 server on mitmproxy's event loop, so it sees the gateway's live counters.
REGISTRY_ADMIN_ADDR is refused at start-up unless it is loopback (settings.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader

from addons import connections
from addons.capture import Capture
from addons.ledger import Ledger
from addons.metrics import Metrics
from mesh import status as mesh_status

logger = logging.getLogger(__name__)
PROBE_TIMEOUT = 2.0


async def backend_ok(url: str) -> bool:
    """The backend answers `GET /v2/` with anything but a 5xx."""
    parts = urlsplit(url)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port), PROBE_TIMEOUT
        )
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"GET /v2/ HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        status_line = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT)
        fields = status_line.split()
        return len(fields) >= 2 and fields[1].isdigit() and int(fields[1]) < 500
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def log_metrics(access_log: Any, log_dir: str) -> list[str]:
    """Lines dropped instead of blocking: by this gateway (access log queue full) and by
    `run`'s relay (a consumer not reading stdout/stderr; its dropped.json)."""
    dropped = access_log.dropped if access_log is not None else 0
    lines = [
        "# HELP tabbify_log_lines_dropped_total Log lines dropped instead of blocking.",
        "# TYPE tabbify_log_lines_dropped_total counter",
        f'tabbify_log_lines_dropped_total{{where="gateway"}} {dropped}',
    ]
    try:
        relayed = json.loads((Path(log_dir) / "dropped.json").read_text()) if log_dir else {}
    except (OSError, ValueError):
        relayed = {}
    for stream in ("stdout", "stderr"):
        count = relayed.get(stream, 0) if isinstance(relayed, dict) else 0
        lines.append(f'tabbify_log_lines_dropped_total{{where="{stream}"}} {int(count)}')
    return lines


def positive(value: str) -> float | None:
    """A finite number > 0, else None (`nan`, `inf`, `-1`, `1e999` are refused)."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def interface_up(name: str) -> bool:
    """IFF_UP on the mesh interface (WireGuard links report operstate "unknown")."""
    try:
        return bool(int(Path(f"/sys/class/net/{name}/flags").read_text(), 16) & 0x1)
    except (OSError, ValueError):
        return False


class Admin:
    def __init__(self, metrics: Metrics, capture: Capture) -> None:
        self.metrics = metrics
        self.capture = capture
        self.server: asyncio.Server | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_admin", str, "", "Admin listen host:port (loopback); empty = off."
        )
        loader.add_option("registry_mesh_interface", str, "", "Mesh interface for /healthz.")
        loader.add_option("registry_log_dir", str, "", "Where run's log relay keeps its status.")
        loader.add_option(
            "registry_mesh_status", str, "", "The mesh follower's status.json for /healthz."
        )

    async def running(self) -> None:
        addr = ctx.options.registry_admin
        if not addr:
            return
        host, _, port = addr.rpartition(":")
        try:
            self.server = await asyncio.start_server(self._serve, host.strip("[]"), int(port))
        except OSError as e:
            logger.error("admin endpoint cannot listen on %s: %s", addr, e)

    async def done(self) -> None:
        if self.server:
            self.server.close()

    @staticmethod
    def ledger() -> Ledger | None:
        isolation = ctx.master.addons.get("tenantisolation")
        return isolation.ledger if isolation is not None else None

    async def health(self) -> tuple[int, dict[str, str]]:
        """503 when something is down (backend, mesh interface, ledger). A degraded mesh (the node
        serves its current peers but cannot follow the coordinator) is 200, status "degraded",
        with `mesh_reason`."""
        backend = "ok" if await backend_ok(ctx.options.registry_backend) else "down"
        name = ctx.options.registry_mesh_interface
        path = ctx.options.registry_mesh_status
        follower = mesh_status.read(Path(path)) if path else None
        up = bool(name) and interface_up(name)
        mesh, reason = mesh_status.health(name, up, follower, time.time(), followed=bool(path))
        payload = {"backend": backend, "mesh": mesh}
        if reason:
            payload["mesh_reason"] = reason
        ledger = self.ledger()
        payload["ledger"] = "absent" if ledger is None else str(ledger.state)
        if ledger is not None and ledger.reason:
            payload["ledger_reason"] = ledger.reason
        if backend == "down" or mesh == mesh_status.DOWN or payload["ledger"] == "down":
            status = "down"
        else:
            status = "degraded" if mesh == mesh_status.DEGRADED else "ok"
        return (503 if status == "down" else 200), {"status": status, **payload}

    def metrics_text(self) -> str:
        lines = [self.metrics.render().rstrip("\n"), *connections.metrics_lines()]
        lines += log_metrics(ctx.master.addons.get("accesslog"), ctx.options.registry_log_dir)
        ledger = self.ledger()
        if ledger is not None:
            lines += [
                "# HELP tabbify_ledger_up 1 while the isolation ledger can record pushes.",
                "# TYPE tabbify_ledger_up gauge",
                f"tabbify_ledger_up {int(ledger.state == 'ok')}",
                "# HELP tabbify_ledger_errors_total Ledger failures (each answered 503).",
                "# TYPE tabbify_ledger_errors_total counter",
                f"tabbify_ledger_errors_total {ledger.errors}",
                "# HELP tabbify_ledger_recreated_total Times the ledger file was found deleted or"
                " replaced and reopened.",
                "# TYPE tabbify_ledger_recreated_total counter",
                f"tabbify_ledger_recreated_total {ledger.recovered}",
            ]
        return "\n".join(lines) + "\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, target = head.split(b" ", 2)[:2]
            status, content_type, body = await self.route(method.decode(), target.decode())
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        writer.write(
            f"HTTP/1.0 {status} X\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        try:
            await writer.drain()
        finally:
            writer.close()

    async def route(self, method: str, target: str) -> tuple[int, str, bytes]:
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/healthz" and method == "GET":
            status, payload = await self.health()
            return status, "application/json", json.dumps(payload).encode()
        if parts.path == "/metrics" and method == "GET":
            return 200, "text/plain; version=0.0.4", self.metrics_text().encode()
        if parts.path == "/capture":
            if method == "POST":
                seconds, max_mb = (
                    positive(query.get("seconds", "60")),
                    positive(query.get("max_mb", "64")),
                )
                if seconds is None or max_mb is None:
                    return 400, "text/plain", b"seconds and max_mb must be positive numbers\n"
                self.capture.start(seconds, max_mb)
            elif method == "DELETE":
                self.capture.stop()
            elif method != "GET":
                return 405, "text/plain", b"method not allowed\n"
            return 200, "application/json", json.dumps(self.capture.status()).encode()
        return 404, "text/plain", b"not found\n"
