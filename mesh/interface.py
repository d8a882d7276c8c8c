"""The WireGuard interface: created (kernel, else wireguard-go over /dev/net/tun), configured
with `wg syncconf` (peer changes applied in place, live sessions kept), addressed and routed.

Only validated values reach here (mesh/validate.py). Endpoint host names are resolved here,
within a bound, and written to the config as addresses: `wg` would otherwise resolve them itself,
retrying for a long time, and refuse the *whole* config when one name does not resolve.
"""

from __future__ import annotations

import concurrent.futures
import io
import ipaddress
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from wgconfig import WGConfig

from addons.runstate import write_atomic
from mesh import validate
from mesh.model import NodeState
from mesh.state import MeshError

logger = logging.getLogger(__name__)
MTU = 1420  # WireGuard's usual MTU: 1500 minus the IPv6 + UDP + WireGuard overhead
RESOLVE_TIMEOUT = 3.0


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


def render(
    private_key: str, state: NodeState, endpoint_of: Callable[[str], str | None] | None = None
) -> str:
    """The `wg` (not wg-quick) config for this node, written with wgconfig. `endpoint_of` maps
    a peer's endpoint to what goes in the file (resolved; None = leave it out)."""
    wc = WGConfig()
    wc.add_attr(None, "PrivateKey", private_key)
    wc.add_attr(None, "ListenPort", state.listen_port)
    for peer in state.peers:
        wc.add_peer(peer.public_key)
        if peer.allowed_ips:
            wc.add_attr(peer.public_key, "AllowedIPs", ", ".join(peer.allowed_ips))
        endpoint = peer.endpoint
        if endpoint and endpoint_of is not None:
            endpoint = endpoint_of(endpoint)
        if endpoint:
            wc.add_attr(peer.public_key, "Endpoint", endpoint)
        if peer.persistent_keepalive:
            wc.add_attr(peer.public_key, "PersistentKeepalive", peer.persistent_keepalive)
    out = io.StringIO()
    wc.write_to_fileobj(out)
    return out.getvalue()


def resolve_endpoint(endpoint: str, prefix: str, timeout: float = RESOLVE_TIMEOUT) -> str | None:
    """An address-literal endpoint as it is; a host name resolved within `timeout` and checked
    again (it must not point into the mesh); None when it does not resolve in time. A peer
    without an endpoint is still configured: it can reach us, and its handshake tells
    WireGuard where it is."""
    if endpoint.startswith("["):
        return endpoint
    host, _, port = endpoint.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        return endpoint
    except ValueError:
        pass
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        lookup = pool.submit(socket.getaddrinfo, host, int(port), type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = lookup.result(timeout)[0]
        ip = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
        address = f"{ip}:{port}"
        return validate.endpoint(address, ipaddress.IPv6Network(prefix))
    except (OSError, IndexError, concurrent.futures.TimeoutError, validate.Invalid) as e:
        print(
            f"mesh: peer endpoint {endpoint} left out ({type(e).__name__}): the peer can still "
            "reach this node",
            file=sys.stderr,
            flush=True,
        )
        return None
    finally:
        pool.shutdown(wait=False)  # a resolver stuck past the timeout finishes on its own


def sync(name: str, conf: Path, private_key: str, state: NodeState) -> None:
    """Apply the key, port and peer set; unchanged peers keep their sessions (syncconf)."""
    text = render(private_key, state, lambda e: resolve_endpoint(e, state.prefix))
    write_atomic(conf, text.encode(), mode=0o600)
    _run("wg", "syncconf", name, str(conf))


def add_address(name: str, ula: str) -> None:
    # nodad: the address is usable at once (no tentative phase), so the gateway can bind it.
    _run("ip", "-6", "addr", "replace", f"{ula}/128", "dev", name, "nodad")


def remove_address(name: str, ula: str) -> None:
    _run("ip", "-6", "addr", "del", f"{ula}/128", "dev", name, check=False)


def addresses(name: str) -> set[str]:
    """The global IPv6 addresses on the interface now."""
    out = _run("ip", "-j", "-6", "addr", "show", "dev", name, "scope", "global").stdout
    try:
        links = json.loads(out or "[]")
        return {
            str(ipaddress.IPv6Address(a["local"]))
            for link in links
            for a in link.get("addr_info", [])
            if a.get("family") == "inet6"
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        raise MeshError(f"cannot read the addresses of {name}") from None


def route(name: str, prefix: str, old_prefix: str | None = None) -> None:
    _run("ip", "-6", "route", "replace", prefix, "dev", name)
    if old_prefix and old_prefix != prefix:
        _run("ip", "-6", "route", "del", old_prefix, "dev", name, check=False)


def address(name: str, state: NodeState) -> None:
    """The ULA (and any being retired), up, routed; other mesh addresses left by an earlier
    run (a ULA since moved away from) are removed."""
    keep = {state.ula, *(r.ula for r in state.retiring)}
    for ula in keep:
        add_address(name, ula)
    _run("ip", "link", "set", "dev", name, "mtu", str(MTU), "up")
    route(name, state.prefix)
    prefix = ipaddress.IPv6Network(state.prefix)
    for stale in addresses(name) - keep:
        if ipaddress.IPv6Address(stale) in prefix:
            remove_address(name, stale)


# --- connections on an address (for retiring a ULA) ---------------------------------------

_TCP_IGNORED = {"0A", "06", "07"}  # LISTEN, TIME_WAIT, CLOSE: not a transfer in progress


def _proc_ipv6(word_hex: str) -> str:
    """/proc/net/tcp6 prints an address as four 32-bit words in host byte order."""
    raw = bytes.fromhex(word_hex)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(raw))


def tcp6_sockets(text: str) -> Iterator[tuple[str, int, str]]:
    """(local address, local port, state) of each line of /proc/net/tcp6."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or ":" not in fields[1]:
            continue
        addr, _, port = fields[1].partition(":")
        try:
            yield _proc_ipv6(addr), int(port, 16), fields[3]
        except ValueError:
            continue


def count_connections(text: str, ula: str) -> int:
    """TCP connections with `ula` as their local address that are still open."""
    want = str(ipaddress.IPv6Address(ula))
    return sum(1 for a, _, st in tcp6_sockets(text) if a == want and st not in _TCP_IGNORED)


def connections_on(ula: str) -> int:
    try:
        text = Path("/proc/net/tcp6").read_text()
    except OSError:
        return 0
    return count_connections(text, ula)


def up(name: str, conf: Path, private_key: str, state: NodeState) -> None:
    """Create (or reuse) the interface and bring it to `state`."""
    how = create(name)
    logger.info("interface %s (%s)", name, how)
    sync(name, conf, private_key, state)
    address(name, state)
