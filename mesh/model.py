"""What the node's mesh state is: its identity on the mesh, its peers, the addresses it is
leaving. Plain data: the coordinator's answers are checked into it (validate.py), persisted
and loaded by state.py, applied to the interface by interface.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Peer:
    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    persistent_keepalive: int | None = None


@dataclass(frozen=True)
class Retiring:
    """A ULA the coordinator moved this node away from (at `since`, epoch seconds): kept on
    the interface until no connection uses it any more, or until `until` at the latest."""

    ula: str
    since: float
    until: float


@dataclass(frozen=True)
class NodeState:
    node_id: str
    ula: str
    prefix: str
    listen_port: int
    peers: tuple[Peer, ...] = field(default_factory=tuple)
    retiring: tuple[Retiring, ...] = field(default_factory=tuple)
