"""Everything the coordinator says is untrusted input: the rules it must pass, as pure functions.

Whatever passes ends up in `wg` and `ip` arguments, in the WireGuard config and in routes, so
each field is checked against its grammar *and* against what it would do to this node (an
allowed IP covering our own address or the default route would steal our traffic).

One rule per function; each raises `Invalid(reason)`. Peers are judged one by one (`peer_set`):
a bad entry is skipped with its reason and every good one is kept, so one malformed record can
never take the node off the mesh. Only an answer that is unusable as a whole (wrong shape, or a
non-empty peer list in which nothing is valid) is refused; the caller then keeps what it has.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from mesh.model import NodeState, Peer, Retiring

ULA_SPACE = ipaddress.IPv6Network("fc00::/7")
MAX_PEERS = 4096  # far beyond a mesh's registries and clients; bounds the work per answer
MAX_ALLOWED_IPS = 256  # per peer
MAX_KEEPALIVE = 65535  # WireGuard's own limit (seconds; 0 = off)
_NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class Invalid(ValueError):
    """Why a value from the coordinator is refused (one line, safe to log)."""


@dataclass(frozen=True)
class Context:
    """What a peer is judged against: this node's own key, the mesh prefix and every address
    the node answers on (its ULA and any ULA it is moving away from)."""

    own_key: str
    prefix: ipaddress.IPv6Network
    own_addresses: tuple[ipaddress.IPv6Address, ...]


@dataclass(frozen=True)
class Skipped:
    label: str  # which entry: its index and the start of its key, never the whole value
    reason: str

    def __str__(self) -> str:
        return f"{self.label}: {self.reason}"


@dataclass(frozen=True)
class PeerSet:
    peers: tuple[Peer, ...]
    skipped: tuple[Skipped, ...] = ()


def shown(value: Any, limit: int = 40) -> str:
    """A coordinator value as it may appear in a log line: repr (no raw control characters or
    newlines), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- one rule per field ----------------------------------------------------------------------


def wg_key(value: Any) -> str:
    """A canonical WireGuard public key: standard base64 of exactly 32 bytes (44 characters,
    one `=`), which re-encodes to itself; not the all-zero key."""
    if not isinstance(value, str):
        raise Invalid("public_key is not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("public_key is not base64") from None
    if len(raw) != 32:
        raise Invalid(f"public_key decodes to {len(raw)} bytes, not 32")
    if base64.b64encode(raw).decode() != value:
        raise Invalid("public_key is not canonical base64")
    if raw == bytes(32):
        raise Invalid("public_key is the all-zero key")
    return value


def node_id(value: Any) -> str:
    """Goes into a URL path: a short token of safe characters, never `.`/`..` alone."""
    if not isinstance(value, str) or not _NODE_ID.fullmatch(value) or value in (".", ".."):
        raise Invalid(f"node_id {shown(value)} is not a node id")
    return value


def port(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise Invalid(f"{what} {shown(value)} is not a port (1-65535)")
    return value


def mesh_prefix(value: Any) -> ipaddress.IPv6Network:
    """An IPv6 network inside the ULA space fc00::/7, no host bits, with room for nodes."""
    try:
        net = ipaddress.IPv6Network(value) if isinstance(value, str) else None
    except ValueError:
        net = None
    if net is None:
        raise Invalid(f"prefix {shown(value)} is not an IPv6 network")
    if not net.subnet_of(ULA_SPACE) or net.prefixlen > 120:
        raise Invalid(f"prefix {net} is not a ULA prefix (inside fc00::/7, at most /120)")
    return net


def node_ula(value: Any, prefix: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """This node's address: one IPv6 address inside the mesh prefix, not its network address."""
    try:
        addr = ipaddress.IPv6Address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None or addr.scope_id is not None:
        raise Invalid(f"ula {shown(value)} is not an IPv6 address")
    if addr not in prefix or addr == prefix.network_address:
        raise Invalid(f"ula {addr} is not a node address inside the mesh prefix {prefix}")
    return addr


def endpoint(value: Any, prefix: ipaddress.IPv6Network) -> str | None:
    """`host:port` (IPv4 literal, `[IPv6]` literal or DNS name), normalised; None = no endpoint.

    An endpoint inside the mesh prefix is refused: reaching it would route the tunnel's own
    packets into the tunnel.
    """
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 261:
        raise Invalid(f"endpoint {shown(value)} is not host:port")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
    else:
        host, sep, port_text = value.rpartition(":")
    if not sep or not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise Invalid(f"endpoint {shown(value)} is not host:port (port 1-65535)")
    if value.startswith("["):
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f"endpoint {shown(value)} has no valid IPv6 address") from None
        if ip.scope_id is not None:
            raise Invalid(f"endpoint {shown(value)} names an interface scope")
    else:
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            labels = host.split(".")
            if (
                not host
                or len(host) > 253
                or not all(_LABEL.fullmatch(label) for label in labels)
                or labels[-1].isdigit()  # a mistyped IPv4 address, not a name
            ):
                raise Invalid(f"endpoint {shown(value)} has no valid host") from None
            return f"{host}:{int(port_text)}"
    if ip.is_unspecified or ip.is_multicast:
        raise Invalid(f"endpoint {shown(value)} is not a unicast address")
    if ip in prefix:
        raise Invalid(f"endpoint {ip} is inside the mesh prefix {prefix}")
    host_text = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{host_text}:{int(port_text)}"


def allowed_ips(value: Any, ctx: Context) -> tuple[str, ...]:
    """Networks the peer may send from and is routed to: each inside the mesh prefix, never the
    default route, never covering one of this node's own addresses. Host bits are masked, as
    WireGuard would; repeats collapse."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise Invalid("allowed_ips is not a list")
    if len(value) > MAX_ALLOWED_IPS:
        raise Invalid(f"allowed_ips has {len(value)} entries (at most {MAX_ALLOWED_IPS})")
    nets: list[str] = []
    for item in value:
        try:
            net = ipaddress.ip_network(item, strict=False) if isinstance(item, str) else None
        except ValueError:
            net = None
        if net is None or "%" in str(item):
            raise Invalid(f"allowed IP {shown(item)} is not a network")
        if net.prefixlen == 0:
            raise Invalid(f"allowed IP {net} covers the default route")
        if net.version != 6 or not net.subnet_of(ctx.prefix):
            raise Invalid(f"allowed IP {net} is outside the mesh prefix {ctx.prefix}")
        covered = [a for a in ctx.own_addresses if a in net]
        if covered:
            raise Invalid(f"allowed IP {net} covers this node's own address {covered[0]}")
        if str(net) not in nets:
            nets.append(str(net))
    return tuple(nets)


def keepalive(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_KEEPALIVE:
        raise Invalid(f"persistent_keepalive {shown(value)} is not 0-{MAX_KEEPALIVE} seconds")
    return value


def not_own_key(key: str, ctx: Context) -> str:
    if key == ctx.own_key:
        raise Invalid("public_key is this node's own key")
    return key


# --- one peer, then the set ------------------------------------------------------------------


def peer(item: Any, ctx: Context) -> Peer:
    """One peer entry, every field by its rule."""
    if not isinstance(item, dict):
        raise Invalid("peer is not a JSON object")
    key = not_own_key(wg_key(item.get("public_key")), ctx)
    return Peer(
        key,
        endpoint(item.get("endpoint"), ctx.prefix),
        allowed_ips(item.get("allowed_ips"), ctx),
        keepalive(item.get("persistent_keepalive")),
    )


def label(index: int, item: Any) -> str:
    key = item.get("public_key") if isinstance(item, dict) else None
    if isinstance(key, str) and key:
        return f"peer #{index} (key {shown(key[:8] + '…' if len(key) > 8 else key)})"
    return f"peer #{index}"


class _Claims:
    """Allowed-IP ranges already given to accepted peers, as disjoint integer intervals: an
    overlap lookup is one bisect (WireGuard would silently move a shared range to the last
    peer that names it; we keep it with the first)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.spans: list[tuple[int, int, str]] = []

    def owner(self, net: ipaddress.IPv6Network) -> str | None:
        first, last = int(net.network_address), int(net.broadcast_address)
        i = bisect.bisect_right(self.starts, last) - 1
        if i >= 0 and self.spans[i][1] >= first:
            return self.spans[i][2]
        return None

    def add(self, net: ipaddress.IPv6Network, who: str) -> None:
        first, last = int(net.network_address), int(net.broadcast_address)
        i = bisect.bisect_right(self.starts, first)
        self.starts.insert(i, first)
        self.spans.insert(i, (first, last, who))


def peer_set(items: Any, ctx: Context) -> PeerSet:
    """Every valid peer, and each skipped one with its reason.

    A key listed twice, or an allowed IP already given to an earlier peer, is skipped in the
    later entry: the first one wins, deterministically.
    """
    if not isinstance(items, list):
        raise Invalid("peers is not a list")
    if len(items) > MAX_PEERS:
        raise Invalid(f"peers has {len(items)} entries (at most {MAX_PEERS})")
    accepted: list[Peer] = []
    skipped: list[Skipped] = []
    keys: dict[str, str] = {}
    claims = _Claims()
    for index, item in enumerate(items):
        name = label(index, item)
        try:
            p = peer(item, ctx)
            if p.public_key in keys:
                raise Invalid(f"public_key repeats {keys[p.public_key]}")
            nets = [ipaddress.IPv6Network(n) for n in p.allowed_ips]
            for net in nets:
                if (owner := claims.owner(net)) is not None:
                    raise Invalid(f"allowed IP {net} overlaps those of {owner}")
        except Invalid as e:
            skipped.append(Skipped(name, str(e)))
            continue
        keys[p.public_key] = f"peer #{index}"
        for net in nets:
            claims.add(net, f"peer #{index}")
        accepted.append(p)
    return PeerSet(tuple(accepted), tuple(skipped))


def usable_peer_set(items: Any, ctx: Context) -> PeerSet:
    """`peer_set`, refusing the answer as a whole when it lists peers and none is valid: that
    is a broken coordinator, not a mesh without members, and applying it would cut the node
    off from every peer."""
    result = peer_set(items, ctx)
    if items and not result.peers:
        first = f"; first: {result.skipped[0]}" if result.skipped else ""
        raise Invalid(f"none of the {len(items)} peers is valid{first}")
    return result


# --- whole answers ---------------------------------------------------------------------------


def peers_answer(data: Any, ctx: Context) -> PeerSet:
    """`GET /v1/nodes/{id}/peers` → `{"peers": [...]}`."""
    if not isinstance(data, dict):
        raise Invalid(f"peers answer is {type(data).__name__}, not a JSON object")
    if "peers" not in data:
        raise Invalid("peers answer has no peers")
    return usable_peer_set(data["peers"], ctx)


def join_answer(
    data: Any, own_key: str, also_own: tuple[str, ...] = ()
) -> tuple[NodeState, tuple[Skipped, ...]]:
    """`POST /v1/nodes` → the node's identity and first peer set. `also_own`: addresses this
    node still answers on (the ULA it may be moving away from), which no peer may cover."""
    if not isinstance(data, dict):
        raise Invalid(f"join answer is {type(data).__name__}, not a JSON object")
    ident = node_id(data.get("node_id"))
    prefix = mesh_prefix(data.get("prefix"))
    ula = node_ula(data.get("ula"), prefix)
    listen = port(data.get("listen_port"), "listen_port")
    own = (ula, *(ipaddress.IPv6Address(a) for a in also_own))
    peers = usable_peer_set(data.get("peers", []), Context(own_key, prefix, own))
    state = NodeState(ident, str(ula), str(prefix), listen, peers.peers)
    return state, peers.skipped


def persisted_state(data: Any, own_key: str) -> tuple[NodeState, tuple[Skipped, ...]]:
    """state.json, checked again on load. A broken identity is an error (Invalid); peers and
    retiring addresses that fail their rules are dropped and reported."""
    if not isinstance(data, dict):
        raise Invalid("not a JSON object")
    ident = node_id(data.get("node_id"))
    prefix = mesh_prefix(data.get("prefix"))
    ula = node_ula(data.get("ula"), prefix)
    listen = port(data.get("listen_port"), "listen_port")
    retiring: list[Retiring] = []
    skipped: list[Skipped] = []
    for index, item in enumerate(data.get("retiring") or []):
        try:
            if not isinstance(item, dict):
                raise Invalid("not a JSON object")
            old = node_ula(item.get("ula"), prefix)
            since, until = item.get("since"), item.get("until")
            for value in (since, until):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise Invalid(f"{shown(value)} is not a time")
            if old != ula:
                retiring.append(Retiring(str(old), float(since), float(until)))
        except Invalid as e:
            skipped.append(Skipped(f"retiring #{index}", str(e)))
    own = (ula, *(ipaddress.IPv6Address(r.ula) for r in retiring))
    peers = peer_set(data.get("peers") or [], Context(own_key, prefix, own))
    state = NodeState(ident, str(ula), str(prefix), listen, peers.peers, tuple(retiring))
    return state, (*peers.skipped, *skipped)


def context(state: NodeState, own_key: str) -> Context:
    own = (state.ula, *(r.ula for r in state.retiring))
    return Context(
        own_key, ipaddress.IPv6Network(state.prefix), tuple(ipaddress.IPv6Address(a) for a in own)
    )
