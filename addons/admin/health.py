"""/healthz, /livez and /readyz: the probes (the backend, auth's host, the mesh interface) and
the verdicts drawn from them and from the workers' published states.

The verdicts are pure functions of what was probed (`health_verdict`, `live_verdict`,
`ready_verdict`, `ledger_health`); `Health` gathers the inputs and keeps the last probe of
auth's host, which runs in the background (`watch_auth`) so that an auth host that does not
answer never makes a health answer slow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from addons.admin.workers import Workers
from addons.clients import backend
from mesh import status as mesh_status

PROBE_TIMEOUT = 2.0
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


def interface_up(name: str) -> bool:
    """IFF_UP on the mesh interface (WireGuard links report operstate "unknown")."""
    try:
        return bool(int(Path(f"/sys/class/net/{name}/flags").read_text(), 16) & 0x1)
    except (OSError, ValueError):
        return False


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


def health_verdict(
    backend_up: bool,
    gateway_up: bool,
    mesh: str,
    mesh_reason: str | None,
    ledgers: Iterable[object],
    auth: str,
) -> tuple[int, dict[str, Any]]:
    """/healthz: 503 when something is down (backend, gateway workers, mesh interface,
    ledger). A degraded mesh (the node serves its current peers but cannot follow the
    coordinator) is 200, status "degraded", with `mesh_reason`."""
    backend_word = "ok" if backend_up else "down"
    gateway = "ok" if gateway_up else "down"
    payload: dict[str, Any] = {"backend": backend_word, "gateway": gateway, "mesh": mesh}
    if mesh_reason:
        payload["mesh_reason"] = mesh_reason
    payload.update(ledger_health(ledgers))
    ledger_bad = payload["ledger"] not in ("ok", "absent")
    # Reported, never a reason to be down or unready: issued registry tokens keep working
    # without auth (only new logins wait), and every node shares the one auth service, so
    # draining or restarting nodes for its blip would take the whole registry away instead
    # of only its logins.
    payload["auth"] = auth
    if "down" in (backend_word, gateway) or ledger_bad or mesh == mesh_status.DOWN:
        status = "down"
    else:
        status = "degraded" if mesh == mesh_status.DEGRADED else "ok"
    return (503 if status == "down" else 200), {"status": status, **payload}


def live_verdict(live_workers: int) -> tuple[int, dict[str, Any]]:
    """/livez: the gateway serves (a worker published within STALE seconds: its event loop
    runs), whatever the backend does. What a liveness probe may restart for."""
    payload = {"status": "ok" if live_workers else "down", "gateway_workers": live_workers}
    return (200 if live_workers else 503), payload


def ready_verdict(health: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """/readyz from /healthz's payload: the gateway, the backend, the ledger and (where
    configured) the mesh are ready; else 503 with `not_ready` naming them. A degraded mesh
    (current peers served, coordinator unreachable) is ready; auth is reported and never
    makes it unready."""
    not_ready = [
        part
        for part in ("gateway", "backend", "ledger", "mesh")
        if health[part] in ("down", "rebuilding")
    ]
    payload = {**health, "status": "not ready" if not_ready else "ready"}
    if not_ready:
        payload["not_ready"] = not_ready
    return (503 if not_ready else 200), payload


@dataclass
class Health:
    """The probes' inputs, and the last probe of auth's host."""

    backend: str  # the backend's base URL
    authorization: str | None  # the run's credential for it
    workers: Workers
    mesh_interface: str = ""
    mesh_status: str = ""  # the mesh follower's status file
    auth_url: str = ""  # REGISTRY_AUTH_URL: reported only
    auth: str = field(init=False)  # watch_auth keeps it current

    def __post_init__(self) -> None:
        self.auth = "unknown" if self.auth_url else "absent"

    async def watch_auth(self) -> None:
        """Whether auth's host accepts a connection, every AUTH_EVERY seconds."""
        while self.auth_url:
            self.auth = "ok" if await reachable(self.auth_url) else "unreachable"
            await asyncio.sleep(AUTH_EVERY)

    async def health(self) -> tuple[int, dict[str, Any]]:
        """/healthz (health_verdict). Auth is read from the last probe: a probe of an auth
        host that does not answer must not make the health answer slow enough to fail an
        orchestrator's probe."""
        ok = await backend_ok(self.backend, self.authorization)
        self.workers.refresh()
        live = self.workers.live(time.time())
        name, path = self.mesh_interface, self.mesh_status
        follower = mesh_status.read(Path(path)) if path else None
        up = bool(name) and interface_up(name)
        mesh, reason = mesh_status.health(name, up, follower, time.time(), followed=bool(path))
        ledgers = (s.get("ledger") for s in live)
        return health_verdict(ok, bool(live), mesh, reason, ledgers, self.auth)

    def live(self) -> tuple[int, dict[str, Any]]:
        """/livez (live_verdict)."""
        self.workers.refresh()
        return live_verdict(len(self.workers.live(time.time())))

    async def ready(self) -> tuple[int, dict[str, Any]]:
        """/readyz (ready_verdict)."""
        _, health = await self.health()
        return ready_verdict(health)
