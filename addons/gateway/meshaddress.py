"""Follow the node's mesh address: when the coordinator moves the node to another ULA, the
gateway listens there and names it in the token realm, without a restart.

The mesh follower (mesh/follow.py) adds the new address to the interface, then records it in
`$REGISTRY_DATA_DIR/mesh/state.json` (atomic rename). This addon checks that file every second
(one stat; it reads it only when it changed) and, when the ULA differs from the one the gateway
listens on, sets mitmproxy's `mode` to the same reverse mode on the new address and, when the
realm was derived from the mesh too, `registry_realm` to `http://[<new ULA>]:<port>/auth/token`.
mitmproxy re-binds on a `mode` change: the old listening socket closes (new connections to the
old address are refused), connections already accepted run to their end, and the follower keeps
the old address on the interface until they are gone. Each gateway process follows on its own,
so several workers sharing the port need nothing more; for up to CHECK_EVERY seconds after the
first worker moved, another may still accept on the old address (it still routes here).

Only configured by `run` when the listen address comes from the mesh (no REGISTRY_LISTEN), and
the realm only when REGISTRY_EXTERNAL_URL is not set either. A restarted gateway still carries
the ULA of `run`'s start on its command line: `configure` corrects `mode` before the servers
bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import mode_specs

from addons import runstate
from mesh import validate

logger = logging.getLogger(__name__)
CHECK_EVERY = 1.0  # seconds
MAX_STATE_BYTES = 1 << 20


def read_ula(path: Path) -> str | None:
    """The ULA recorded in state.json (checked against its prefix), or None."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_STATE_BYTES))
        prefix = validate.mesh_prefix(data.get("prefix"))
        return str(validate.node_ula(data.get("ula"), prefix))
    except (OSError, ValueError, RecursionError, AttributeError):  # Invalid is a ValueError
        return None


def listen_host(spec: str) -> str | None:
    mode = mode_specs.ProxyMode.parse(spec)
    return mode.custom_listen_host if isinstance(mode, mode_specs.ReverseMode) else None


def rebind(modes: Sequence[str], old: str, new: str) -> list[str]:
    """Each reverse mode listening on `old` listens on `new` instead (same upstream and port).
    An IPv6 listen host goes without brackets in mitmproxy's mode syntax."""
    out = []
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        host = mode.custom_listen_host if isinstance(mode, mode_specs.ReverseMode) else None
        if host and ipaddress.ip_address(host) == ipaddress.ip_address(old):
            listen = f"{new}:{mode.custom_listen_port}" if mode.custom_listen_port else new
            spec = f"reverse:{mode.data}@{listen}"
        out.append(spec)
    return out


def listen_port(modes: Sequence[str], host: str) -> int | None:
    for spec in modes:
        mode = mode_specs.ProxyMode.parse(spec)
        if mode.custom_listen_host and ipaddress.ip_address(
            mode.custom_listen_host
        ) == ipaddress.ip_address(host):
            return mode.custom_listen_port
    return None


def realm_for(ula: str, port: int) -> str:
    return f"http://[{ula}]:{port}/auth/token"


class MeshAddress:
    def __init__(self) -> None:
        self.path: Path | None = None
        self.ula: str | None = None  # the mesh address the gateway listens on now
        self._state_file = runstate.Watch(None)  # state.json, a stat per check
        self._task: asyncio.Task[None] | None = None
        self._last_warning: str | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "registry_mesh_state",
            str,
            "",
            "The mesh state.json whose ULA the listen address follows; empty = fixed address.",
        )
        loader.add_option(
            "registry_mesh_realm",
            bool,
            False,
            "Also point registry_realm at the followed ULA (the realm was derived from it).",
        )

    def configure(self, updated: set[str]) -> None:
        if "registry_mesh_state" not in updated:
            return
        value = ctx.options.registry_mesh_state
        self.path = Path(value) if value else None
        self._state_file = runstate.Watch(self.path)
        hosts = [h for h in map(listen_host, ctx.options.mode) if h]
        self.ula = str(ipaddress.ip_address(hosts[0])) if hosts else None
        if self.path is not None:
            self.check()  # before the servers bind: a restarted gateway starts on the current ULA

    def _warn(self, message: str) -> None:
        if message != self._last_warning:
            logger.warning(message)
            self._last_warning = message

    def check(self) -> bool:
        """Follow state.json once; True when the address moved."""
        if self.path is None or self.ula is None:
            return False
        self._state_file.path = self.path
        if not self._state_file.changed() or self._state_file.seen in (None, runstate.UNREADABLE):
            return False  # unchanged, or not there to read (yet)
        ula = read_ula(self.path)
        if ula is None:
            self._warn(f"mesh address: {self.path} names no valid ULA; staying on {self.ula}")
            return False
        if ula == self.ula:
            return False
        old = self.ula
        modes = rebind(ctx.options.mode, old, ula)
        updates: dict[str, object] = {"mode": modes}
        port = listen_port(modes, ula)
        if ctx.options.registry_mesh_realm and port:
            updates["registry_realm"] = realm_for(ula, port)
        logger.warning(
            "mesh address moved from %s to %s: listening there now; connections on the old "
            "address finish",
            old,
            ula,
        )
        ctx.options.update(**updates)
        self.ula = ula
        return True

    async def restart_failed(self) -> None:
        """A listener that could not bind (its address not there yet) is tried again."""
        proxyserver = ctx.master.addons.get("proxyserver")
        if proxyserver is None or proxyserver.servers.is_updating:
            return
        for instance in list(proxyserver.servers):
            if not instance.is_running:
                try:
                    await instance.start()
                except Exception as e:
                    self._warn(f"mesh address: listening failed, retrying: {e}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            try:
                self.check()
                await self.restart_failed()
            except Exception:  # a broken check must not end the watch
                logger.exception("mesh address check failed")

    async def running(self) -> None:
        if self.path is not None:
            self._task = asyncio.create_task(self._watch())

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
