"""The operator's loopback endpoint (contract §6): /healthz, /metrics, /capture and the live
view of traffic (`GET /`, addons/admin/liveview.py).

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
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from addons import runstate
from addons.admin import http as adminhttp
from addons.admin.liveview import LiveView
from addons.clients import backend, backend_credential
from addons.decisions import quota
from addons.decisions.metrics import Metrics
from addons.engine import connections
from addons.runstate import write_json
from mesh import status as mesh_status

logger = logging.getLogger("admin")
PROBE_TIMEOUT = 2.0
STALE = 5.0  # seconds: a worker that has not published for this long is not counted live
MAX_SECONDS, MAX_MB = 3600.0, 1024.0
MAX_STATE = 1 << 20
AUTH_EVERY = 2.0  # seconds between two probes of auth's host


async def backend_ok(url: str, authorization: str | None = None) -> bool:
    """The backend answers `GET /v2/`, with the run's credential, with anything but a 5xx or
    a 401 (a backend that refuses the gateway's credential serves nobody)."""
    client = backend.AsyncClient(
        url, authorization=authorization, timeout=PROBE_TIMEOUT, deadline=2 * PROBE_TIMEOUT
    )
    try:
        status = (await client.request("GET", "/v2/")).status
    except backend.Unavailable:
        return False
    finally:
        await client.close()
    return status < 500 and status != 401


async def reachable(url: str) -> bool:
    """Auth's host accepts a TCP connection (no request: a probe must not show up as a
    validation in auth's logs, nor cost it a token check)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port), PROBE_TIMEOUT
        )
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    return True


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


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_STATE))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ledger_health(states: Iterable[object]) -> dict[str, str]:
    """The ledger's part of /healthz from the live workers' states: `ledger` is "absent"
    (no worker has one), "ok", "rebuilding" (it lost records: answered 503 until rebuilt
    from the backend) or "down" (it cannot be read or written: a read-only, missing or
    unreachable store); `ledger_reason` says why, as the worker that saw it says it. Down
    wins over rebuilding: it is what the operator must fix first."""
    ledgers = [state for state in states if isinstance(state, dict)]
    if not ledgers:
        return {"ledger": "absent"}
    for word in ("down", "rebuilding"):
        bad = [ledger for ledger in ledgers if ledger.get("state") == word]
        if bad:
            out = {"ledger": word}
            if bad[0].get("reason"):
                out["ledger_reason"] = str(bad[0]["reason"])
            return out
    if any(ledger.get("state") != "ok" for ledger in ledgers):
        return {"ledger": "down", "ledger_reason": "a worker reports an unknown ledger state"}
    return {"ledger": "ok"}


@dataclass
class Workers:
    """The workers' published states. Counters stay monotonic across a worker's restart: the
    last state of a pid that is gone is kept in `retired` and added to the sum."""

    directory: Path
    current: dict[str, dict[str, Any]] = field(default_factory=dict)
    retired: Metrics = field(default_factory=Metrics)
    retired_connections: list[dict[str, Any]] = field(default_factory=list)

    def refresh(self) -> None:
        for path in sorted(self.directory.glob(runstate.WORKER_GLOB)):
            state = read_json(path)
            if state is None:
                continue
            name, before = path.stem, self.current.get(path.stem)
            if before is not None and before.get("pid") != state.get("pid"):
                self.retired.add(before.get("metrics") or {})
                gone = dict(before.get("connections") or {}, open=0)
                self.retired_connections.append(gone)
            self.current[name] = state

    def live(self, now: float) -> list[dict[str, Any]]:
        return [s for s in self.current.values() if now - float(s.get("time", 0)) < STALE]

    def metrics(self) -> Metrics:
        total = Metrics()
        total.add(self.retired.state())
        for state in self.current.values():
            total.add(state.get("metrics") or {})
        return total


def cache_lines(live: list[dict[str, Any]]) -> list[str]:
    """The content caches of the live workers (addons/gateway/contentcache.py), summed; and each
    worker's resident memory."""
    caches = [w["cache"] for w in live if isinstance(w.get("cache"), dict)]
    lines: list[str] = []
    if caches:

        def total(key: str) -> int:
            return sum(int(c.get(key, 0)) for c in caches)

        hits, misses = total("hits"), total("misses")
        lines += [
            "# HELP tabbify_cache_lookups_total Manifest and blob-HEAD lookups by digest in the"
            " workers' content caches.",
            "# TYPE tabbify_cache_lookups_total counter",
            f'tabbify_cache_lookups_total{{result="hit"}} {hits}',
            f'tabbify_cache_lookups_total{{result="miss"}} {misses}',
            "# HELP tabbify_cache_hit_ratio Hits over lookups since the workers started.",
            "# TYPE tabbify_cache_hit_ratio gauge",
            f"tabbify_cache_hit_ratio {hits / (hits + misses) if hits + misses else 0:.4f}",
            "# HELP tabbify_cache_entries Answers held in the workers' content caches.",
            "# TYPE tabbify_cache_entries gauge",
            f"tabbify_cache_entries {total('entries')}",
            "# HELP tabbify_cache_bytes Bytes the workers' content caches hold (bound: "
            "tabbify_cache_max_bytes).",
            "# TYPE tabbify_cache_bytes gauge",
            f"tabbify_cache_bytes {total('bytes')}",
            "# TYPE tabbify_cache_max_bytes gauge",
            f"tabbify_cache_max_bytes {total('max_bytes')}",
            "# HELP tabbify_cache_evictions_total Entries dropped to stay within the bound.",
            "# TYPE tabbify_cache_evictions_total counter",
            f"tabbify_cache_evictions_total {total('evictions')}",
            "# HELP tabbify_cache_clears_total Caches emptied by a delete or GC.",
            "# TYPE tabbify_cache_clears_total counter",
            f"tabbify_cache_clears_total {total('clears')}",
        ]
    rss = [(w.get("worker"), w.get("rss")) for w in live if isinstance(w.get("rss"), int)]
    if rss:
        lines += [
            "# HELP tabbify_gateway_worker_rss_bytes Resident memory of each gateway worker.",
            "# TYPE tabbify_gateway_worker_rss_bytes gauge",
            *(f'tabbify_gateway_worker_rss_bytes{{worker="{n}"}} {v}' for n, v in rss),
        ]
    return lines


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
        self.live = LiveView(Path(args.state_dir), csrf_token, self.workers_streaming)
        self.auth = "unknown" if args.auth_url else "absent"  # watch_auth keeps it current

    async def watch_auth(self) -> None:
        """Whether auth's host accepts a connection, every AUTH_EVERY seconds."""
        while self.args.auth_url:
            self.auth = "ok" if await reachable(self.args.auth_url) else "unreachable"
            await asyncio.sleep(AUTH_EVERY)

    def workers_streaming(self) -> int:
        """Live workers that say they stream to the live view (addons/gateway/flowfeed.py)."""
        self.workers.refresh()
        live = self.workers.live(time.time())
        return sum(1 for s in live if (s.get("liveview") or {}).get("streaming"))

    # --- health -----------------------------------------------------------------------------

    async def health(self) -> tuple[int, dict[str, Any]]:
        """503 when something is down (backend, gateway workers, mesh interface, ledger). A
        degraded mesh (the node serves its current peers but cannot follow the coordinator) is
        200, status "degraded", with `mesh_reason`."""
        ok = await backend_ok(self.args.backend, self.backend_authorization)
        backend = "ok" if ok else "down"
        self.workers.refresh()
        live = self.workers.live(time.time())
        gateway = "ok" if live else "down"
        name, path = self.args.mesh_interface, self.args.mesh_status
        follower = mesh_status.read(Path(path)) if path else None
        up = bool(name) and interface_up(name)
        mesh, reason = mesh_status.health(name, up, follower, time.time(), followed=bool(path))
        payload: dict[str, Any] = {"backend": backend, "gateway": gateway, "mesh": mesh}
        if reason:
            payload["mesh_reason"] = reason
        payload.update(ledger_health(s.get("ledger") for s in live))
        ledger_bad = payload["ledger"] not in ("ok", "absent")
        # Reported, never a reason to be down or unready: issued registry tokens keep working
        # without auth (only new logins wait), and every node shares the one auth service, so
        # draining or restarting nodes for its blip would take the whole registry away instead
        # of only its logins. Read from the last probe: a probe of an auth host that does not
        # answer must not make the health answer slow enough to fail an orchestrator's probe.
        payload["auth"] = self.auth
        if "down" in (backend, gateway) or ledger_bad or mesh == mesh_status.DOWN:
            status = "down"
        else:
            status = "degraded" if mesh == mesh_status.DEGRADED else "ok"
        return (503 if status == "down" else 200), {"status": status, **payload}

    def live_status(self) -> tuple[int, dict[str, Any]]:
        """/livez: the gateway serves (a worker published within STALE seconds: its event
        loop runs), whatever the backend does. What a liveness probe may restart for."""
        self.workers.refresh()
        live = len(self.workers.live(time.time()))
        payload = {"status": "ok" if live else "down", "gateway_workers": live}
        return (200 if live else 503), payload

    async def ready_status(self) -> tuple[int, dict[str, Any]]:
        """/readyz: the gateway, the backend, the ledger and (where configured) the mesh are
        ready; else 503 with `not_ready` naming them. A degraded mesh (current peers served,
        coordinator unreachable) is ready; auth is reported and never makes it unready."""
        _, health = await self.health()
        not_ready = [
            part
            for part in ("gateway", "backend", "ledger", "mesh")
            if health[part] in ("down", "rebuilding")
        ]
        payload = {**health, "status": "not ready" if not_ready else "ready"}
        if not_ready:
            payload["not_ready"] = not_ready
        return (503 if not_ready else 200), payload

    # --- metrics ----------------------------------------------------------------------------

    def metrics_text(self) -> str:
        self.workers.refresh()
        live = self.workers.live(time.time())
        lines = [self.workers.metrics().render().rstrip("\n")]
        now, states = time.time(), []
        for worker in self.workers.current.values():
            state = dict(worker.get("connections") or {})
            if now - float(worker.get("time", 0)) >= STALE:
                state["open"] = 0  # gone: its connections are closed
            states.append(state)
        lines += connections.metrics_lines(states + self.workers.retired_connections)
        lines += self.log_metrics()
        lines += [
            "# HELP tabbify_gateway_workers Gateway worker processes publishing their state.",
            "# TYPE tabbify_gateway_workers gauge",
            f"tabbify_gateway_workers {len(live)}",
        ]
        lines += self.usage_lines()
        lines += cache_lines(live)
        ledgers = [s["ledger"] for s in live if isinstance(s.get("ledger"), dict)]
        if ledgers:
            up = all(ledger.get("state") != "down" for ledger in ledgers)
            whole = all(ledger.get("state") != "rebuilding" for ledger in ledgers)
            errors = sum(int(ledger.get("errors", 0)) for ledger in ledgers)
            recreated = sum(int(ledger.get("recreated", 0)) for ledger in ledgers)
            lines += [
                "# HELP tabbify_ledger_up 1 while the isolation ledger can record pushes.",
                "# TYPE tabbify_ledger_up gauge",
                f"tabbify_ledger_up {int(up)}",
                "# HELP tabbify_ledger_whole 0 while the ledger lost records and is rebuilt from"
                " the backend (what it does not hold is answered 503).",
                "# TYPE tabbify_ledger_whole gauge",
                f"tabbify_ledger_whole {int(whole)}",
                "# HELP tabbify_ledger_errors_total Ledger failures (each answered 503).",
                "# TYPE tabbify_ledger_errors_total counter",
                f"tabbify_ledger_errors_total {errors}",
                "# HELP tabbify_ledger_recreated_total Times the ledger file was found deleted or"
                " replaced and reopened.",
                "# TYPE tabbify_ledger_recreated_total counter",
                f"tabbify_ledger_recreated_total {recreated}",
                "# HELP tabbify_ledger_lookups_total Tenant-digest checks: answered from memory"
                " (hit) or by asking the ledger's store (miss: SQLite, or one S3 HEAD).",
                "# TYPE tabbify_ledger_lookups_total counter",
            ]
            for result, key in (("hit", "hits"), ("miss", "misses")):
                total = sum(int(ledger.get(key, 0)) for ledger in ledgers)
                lines.append(f'tabbify_ledger_lookups_total{{result="{result}"}} {total}')
        return "\n".join(lines) + "\n"

    def usage_lines(self) -> list[str]:
        """Storage per tenant (contract §8 asks for it: the one place with a tenant label),
        as the newest worker state that carries it says (worker 0 computes it)."""
        found = [
            s["tenant_usage"]
            for s in self.workers.current.values()
            if isinstance(s.get("tenant_usage"), dict)
        ]
        if not found:
            return []
        newest = max(found, key=lambda u: float(u.get("time", 0)))
        usage, quotas = newest.get("usage"), newest.get("quotas")
        if not isinstance(usage, dict) or not isinstance(quotas, dict):
            return []
        uploading = newest.get("uploading")
        uploading = uploading if isinstance(uploading, dict) else None
        return quota.metrics(usage, quotas, uploading).rstrip("\n").splitlines()

    def log_metrics(self) -> list[str]:
        """Lines dropped instead of blocking: by the gateway workers (access log queue full)
        and by `run`'s relay (a consumer not reading stdout/stderr; its dropped.json)."""
        by_workers = sum(int(s.get("access_log_dropped", 0)) for s in self.workers.current.values())
        relayed = (
            read_json(Path(self.args.log_dir) / runstate.LOG_DROPPED) if self.args.log_dir else None
        )
        lines = [
            "# HELP tabbify_log_lines_dropped_total Log lines dropped instead of blocking.",
            "# TYPE tabbify_log_lines_dropped_total counter",
            f'tabbify_log_lines_dropped_total{{where="gateway"}} {by_workers}',
        ]
        for stream in ("stdout", "stderr"):
            count = int((relayed or {}).get(stream, 0))
            lines.append(f'tabbify_log_lines_dropped_total{{where="{stream}"}} {count}')
        return lines

    # --- capture ----------------------------------------------------------------------------

    def capture_request(self) -> Path:
        return Path(self.args.state_dir) / runstate.CAPTURE

    async def capture_start(self, seconds: float, max_mb: float) -> None:
        await self.capture_stop()
        capture_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.workers.refresh()
        workers = max(1, len(self.workers.live(time.time())))
        total = int(min(max(max_mb, 0.1), MAX_MB) * 1024 * 1024)
        request = {
            "id": capture_id,
            "until": time.time() + min(max(seconds, 1.0), MAX_SECONDS),
            "max_bytes": total // workers,  # each worker writes its share of the bound
        }
        write_json(self.capture_request(), request)
        logger.warning("debug capture %s requested", capture_id)
        # Answer once every live worker writes its part: what follows is captured.
        deadline = time.monotonic() + 3
        while not self.all_capturing(capture_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def capture_stop(self) -> None:
        """End the capture, wait (bounded) for every worker to close its part, join them."""
        request = runstate.read_request(self.capture_request()) or {}
        if not request.get("id"):
            return
        write_json(self.capture_request(), {**request, "until": 0})
        deadline = time.monotonic() + 3
        while self.capturing(request["id"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.join_capture()

    def all_capturing(self, capture_id: str) -> bool:
        self.workers.refresh()
        live = self.workers.live(time.time())
        return bool(live) and all((s.get("capture") or {}).get("id") == capture_id for s in live)

    def capturing(self, capture_id: str) -> bool:
        """Does a live worker still write a part of this capture?"""
        self.workers.refresh()
        live = self.workers.live(time.time())
        return any((s.get("capture") or {}).get("id") == capture_id for s in live)

    def capture_status(self) -> dict[str, Any]:
        request = runstate.read_request(self.capture_request()) or {}
        capture_id = request.get("id")
        active = bool(capture_id) and float(request.get("until", 0)) > time.time()
        self.workers.refresh()
        if not active and capture_id and not self.capturing(capture_id):
            self.join_capture()
            request = runstate.read_request(self.capture_request()) or request
        joined = request.get("flows")
        flows = joined if isinstance(joined, int) else self.captured_flows(capture_id)
        path = Path(self.args.capture_dir) / f"capture-{capture_id}.flows" if capture_id else None
        return {
            "active": active,
            "id": capture_id,
            "flows": flows,
            "file": str(path) if path else None,
        }

    def captured_flows(self, capture_id: object) -> int:
        """Flows the workers wrote for this capture: each worker's count of its part, while
        it writes and after it stopped (a worker's `id` is None once its part ends: `last`
        names the capture its count is of)."""
        total = 0
        for state in self.workers.current.values():
            part = state.get("capture") or {}
            if capture_id in (part.get("id"), part.get("last")):
                flows = part.get("flows", 0)
                total += flows if isinstance(flows, int) else 0
        return total

    def join_capture(self) -> None:
        """Join the workers' parts of a finished capture into one flow file (mitmproxy flow
        files are a sequence of flows: the parts concatenate), and keep its flow count in the
        request (`flows`): a worker restarted later no longer has its count."""
        request = runstate.read_request(self.capture_request()) or {}
        capture_id = request.get("id")
        if not capture_id:
            return
        directory = Path(self.args.capture_dir)
        parts = sorted(directory.glob(f"capture-{capture_id}.w*.flows"))
        if not parts:
            return
        self.workers.refresh()
        before = request.get("flows")  # joined once already: a late part was left over
        flows = max(self.captured_flows(capture_id), before if isinstance(before, int) else 0)
        with open(directory / f"capture-{capture_id}.flows", "ab") as joined:
            for part in parts:
                joined.write(part.read_bytes())
                part.unlink()
        write_json(self.capture_request(), {**request, "flows": flows})

    # --- the HTTP server ----------------------------------------------------------------------

    async def route(self, method: str, target: str) -> tuple[int, str, bytes]:
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/healthz" and method == "GET":
            status, payload = await self.health()
            return status, "application/json", json.dumps(payload).encode()
        if parts.path == "/livez" and method == "GET":
            status, payload = self.live_status()
            return status, "application/json", json.dumps(payload).encode()
        if parts.path == "/readyz" and method == "GET":
            status, payload = await self.ready_status()
            return status, "application/json", json.dumps(payload).encode()
        if parts.path == "/metrics" and method == "GET":
            return 200, "text/plain; version=0.0.4", self.metrics_text().encode()
        if parts.path == "/capture":
            if method == "POST":
                seconds = positive(query.get("seconds", "60"))
                max_mb = positive(query.get("max_mb", "64"))
                if seconds is None or max_mb is None:
                    return 400, "text/plain", b"seconds and max_mb must be positive numbers\n"
                await self.capture_start(seconds, max_mb)
            elif method == "DELETE":
                await self.capture_stop()
            elif method != "GET":
                return 405, "text/plain", b"method not allowed\n"
            return 200, "application/json", json.dumps(self.capture_status()).encode()
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
    watcher = asyncio.create_task(admin.watch_auth())
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
