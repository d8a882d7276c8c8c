"""The WireGuard interface: created (kernel, else wireguard-go over /dev/net/tun), configured
with `wg syncconf` (peer changes applied in place, live sessions kept), addressed and routed.
"""

from __future__ import annotations

import io
import logging
import subprocess
from pathlib import Path

from wgconfig import WGConfig

from mesh.state import MeshError, NodeState, write_atomic

logger = logging.getLogger(__name__)
MTU = 1420  # WireGuard's usual MTU: 1500 minus the IPv6 + UDP + WireGuard overhead


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise MeshError(f"{cmd[0]} is not installed (wireguard-tools, iproute2)") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise MeshError(f"{' '.join(cmd[:4])}: {detail[-1] if detail else result.returncode}")
    return result


def exists(name: str) -> bool:
    return _run("ip", "link", "show", "dev", name, check=False).returncode == 0


def create(name: str) -> str:
    """Kernel WireGuard where the module exists, else wireguard-go. Returns which one."""
    if exists(name):
        return "existing"
    if _run("ip", "link", "add", "dev", name, "type", "wireguard", check=False).returncode == 0:
        return "kernel"
    if not Path("/dev/net/tun").exists():
        raise MeshError(
            f"MESH_INTERFACE={name}: no WireGuard kernel module and no /dev/net/tun "
            "(run the container with --device /dev/net/tun --cap-add NET_ADMIN)"
        )
    # wireguard-go daemonizes and keeps the interface alive after we exit.
    result = _run("wireguard-go", name, check=False)
    if result.returncode != 0 or not exists(name):
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit {result.returncode}"
        raise MeshError(
            f"MESH_INTERFACE={name}: wireguard-go could not create the interface ({reason}); "
            "it needs /dev/net/tun and CAP_NET_ADMIN"
        )
    return "wireguard-go"


def render(private_key: str, state: NodeState) -> str:
    """The `wg` (not wg-quick) config for this node, written with wgconfig."""
    wc = WGConfig()
    wc.add_attr(None, "PrivateKey", private_key)
    wc.add_attr(None, "ListenPort", state.listen_port)
    for peer in state.peers:
        wc.add_peer(peer.public_key)
        if peer.allowed_ips:
            wc.add_attr(peer.public_key, "AllowedIPs", ", ".join(peer.allowed_ips))
        if peer.endpoint:
            wc.add_attr(peer.public_key, "Endpoint", peer.endpoint)
        if peer.persistent_keepalive:
            wc.add_attr(peer.public_key, "PersistentKeepalive", peer.persistent_keepalive)
    out = io.StringIO()
    wc.write_to_fileobj(out)
    return out.getvalue()


def sync(name: str, conf: Path, private_key: str, state: NodeState) -> None:
    """Apply the key, port and peer set; unchanged peers keep their sessions (syncconf)."""
    write_atomic(conf, render(private_key, state).encode(), mode=0o600)
    _run("wg", "syncconf", name, str(conf))


def address(name: str, state: NodeState) -> None:
    # nodad: the address is usable at once (no tentative phase), so mitmdump can bind it.
    _run("ip", "-6", "addr", "replace", f"{state.ula}/128", "dev", name, "nodad")
    _run("ip", "link", "set", "dev", name, "mtu", str(MTU), "up")
    _run("ip", "-6", "route", "replace", state.prefix, "dev", name)


def up(name: str, conf: Path, private_key: str, state: NodeState) -> None:
    how = create(name)
    logger.info("interface %s (%s)", name, how)
    sync(name, conf, private_key, state)
    address(name, state)
