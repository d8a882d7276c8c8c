"""The operator's loopback endpoint (contract §6): /healthz, /metrics, /capture and the live
view of traffic (`GET /`, addons/admin/liveview.py). This module routes the requests and runs
the program; each answer is made by the module of its job: health.py (/healthz /livez
/readyz), metrics.py (/metrics), capture.py (/capture), liveview.py (the view), all from what
the workers publish (workers.py).

A program of its own under supervisord (`python -m addons.admin.program …`), beside the
gateway workers and never on the mesh: it answers whatever load the gateway carries, and one
view covers every worker. The workers publish their counters and states once a second
(addons/gateway/publish.py); this program sums them, probes the backend itself, and reads the mesh
follower's and the log relay's status files. REGISTRY_ADMIN_ADDR is refused at start-up
unless it is loopback (settings.py), and every request must name this endpoint in `Host`
and, from a browser, come from its own page (http.py: DNS rebinding, cross-site use).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from addons.admin import http as adminhttp
from addons.admin import metrics
from addons.admin.capture import Capture, positive
from addons.admin.health import Health
from addons.admin.liveview import LiveView
from addons.admin.workers import Workers
from addons.clients import backend_credential

logger = logging.getLogger("admin")


class Admin:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workers = Workers(Path(args.state_dir))
        credential = getattr(args, "backend_credential", "")  # the run's (cli/programs.py)
        self.backend_authorization = (
            backend_credential.authorization(backend_credential.read(Path(credential)))
            if credential
            else None
        )
        # Made per run of this program, never written anywhere: the page carries it, and
        # only the page (same origin) can read it.
        csrf_token = secrets.token_urlsafe(32)
        self.guard = adminhttp.Guard(args.listen, csrf_token)
        self.live = LiveView(Path(args.state_dir), csrf_token, self.workers.streaming)
        self.health = Health(
            backend=args.backend,
            authorization=self.backend_authorization,
            workers=self.workers,
            mesh_interface=args.mesh_interface,
            mesh_status=args.mesh_status,
            auth_url=args.auth_url,
        )
        self.capture = Capture(Path(args.state_dir), Path(args.capture_dir), self.workers)

    async def route(self, method: str, target: str) -> tuple[int, str, bytes]:
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/healthz" and method == "GET":
            status, payload = await self.health.health()
            return status, "application/json", json.dumps(payload).encode()
        if parts.path == "/livez" and method == "GET":
            status, payload = self.health.live()
            return status, "application/json", json.dumps(payload).encode()
        if parts.path == "/readyz" and method == "GET":
            status, payload = await self.health.ready()
            return status, "application/json", json.dumps(payload).encode()
        if parts.path == "/metrics" and method == "GET":
            text = metrics.text(self.workers, self.args.log_dir)
            return 200, "text/plain; version=0.0.4", text.encode()
        if parts.path == "/capture":
            if method == "POST":
                seconds = positive(query.get("seconds", "60"))
                max_mb = positive(query.get("max_mb", "64"))
                if seconds is None or max_mb is None:
                    return 400, "text/plain", b"seconds and max_mb must be positive numbers\n"
                await self.capture.start(seconds, max_mb)
            elif method == "DELETE":
                await self.capture.stop()
            elif method != "GET":
                return 405, "text/plain", b"method not allowed\n"
            return 200, "application/json", json.dumps(self.capture.status()).encode()
        return 404, "text/plain", b"not found\n"

    async def handle(self, request: adminhttp.Request) -> tuple[int, str, bytes, dict[str, str]]:
        refusal = self.guard.refusal(request) or self.guard.state_change_refusal(request)
        if refusal:
            return 403, "text/plain", f"forbidden: {refusal}\n".encode(), {}
        if request.method == "GET" and request.path == "/live/flows":
            return await self.live.poll(request)
        if request.method == "GET" and request.path == "/":
            return await self.live.page()
        if request.method == "GET" and request.path == "/live/flows.mitm":
            return await self.live.download(request)
        answer = self.live.route(request)
        if answer is not None:
            return answer
        status, content_type, body = await self.route(request.method, request.target)
        return status, content_type, body, {}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        extra: dict[str, str] = {}
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request = adminhttp.parse_head(head)
            if (
                request.method == "GET"
                and request.path == "/live/events"
                and self.guard.refusal(request) is None
            ):
                return await self.live.stream(request, reader, writer)  # closes the writer
            status, content_type, body, extra = await self.handle(request)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
        except Exception:
            logger.exception("admin endpoint error")
            status, content_type, body = 500, "text/plain", b"internal error\n"
        writer.write(adminhttp.head(status, content_type, len(body), extra) + body)
        try:
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="addons.admin.program")
    parser.add_argument("--listen", required=True, help="host:port, loopback")
    parser.add_argument("--backend", required=True, help="backend base URL")
    parser.add_argument("--backend-credential", default="", help="user:password file")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--capture-dir", required=True)
    parser.add_argument("--log-dir", default="")
    parser.add_argument("--mesh-interface", default="")
    parser.add_argument("--mesh-status", default="")
    parser.add_argument("--auth-url", default="", help="REGISTRY_AUTH_URL (reported only)")
    return parser.parse_args(argv)


async def main(argv: list[str]) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s"
    )
    os.makedirs(args.state_dir, exist_ok=True)
    admin = Admin(args)
    await admin.live.start()
    watcher = asyncio.create_task(admin.health.watch_auth())
    host, _, port = args.listen.rpartition(":")
    server = await asyncio.start_server(admin.serve, host.strip("[]"), int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        admin.live.close()  # the workers stop streaming; open event streams end
        server.close()
        with contextlib.suppress(TimeoutError):  # a long poll may still wait: not for long
            await asyncio.wait_for(server.wait_closed(), 5)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
