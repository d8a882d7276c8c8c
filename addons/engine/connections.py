"""Client connection lifetimes: caps, a deadline for request heads, idle keep-alive timeout.

Slow or idle clients must not hold the gateway's connections (and file descriptors) forever:

- A request head must complete within `registry_header_timeout` (60 s, like nginx's
  client_header_timeout) of its first byte, or of the connection's accept for the first
  request: a client dripping one byte a minute is answered 408 and closed.
- A keep-alive connection with no request in progress is closed after `registry_idle_timeout`.
- New connections are admitted under three caps, so that one client cannot starve the
  others: in total (DEFAULT_MAX_CONNECTIONS per worker unless set), per source (an IPv4
  address or an IPv6 /64, `source_of`), and per source again, a lower cap, for connections
  whose first request head has been in progress for over SLOW_HEAD seconds: slow or silent
  heads from one source can hold only that many places however many it opens (the sweeper
  closes the rest), while a burst of new connections, whose heads arrive at once, is not
  held back. Beyond a cap the client gets a short 503 and a close. The total cap is also
  bounded by the process's file-descriptor limit (each client connection uses two: the
  client's and the backend's; the soft limit is raised to the hard one first), so the admin
  endpoint always has some left.

The HTTP/1 server layers report their state here (hardening.py patches them); the addon's
sweeper (addons/gateway/connections.py) checks them once a second. Stalled bodies and backend
waits are left to mitmproxy's inactivity timeout (`tcp_timeout`): a multi-GB layer over a slow
link is not a slow client.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import resource
import time
import weakref
from collections import Counter
from typing import Any

from addons.engine import oci, splice

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 1.0
FD_RESERVE = 64  # descriptors kept for the admin endpoint, the ledger, logs, the sink
# Client connections per worker unless set: as a front door sizes its own (nginx: 512-1024
# worker_connections per worker, several workers; HAProxy: maxconn in the thousands), and
# never more than the descriptors allow.
DEFAULT_MAX_CONNECTIONS = 4096
SLOW_HEAD = 2.0  # seconds after which a connection's first request head in progress is slow
ACCEPT_LOG_EVERY = 10.0  # seconds between two log lines about failing accepts

# Live Http1Server layers by client connection id. A connection that has sent nothing has
# none yet (mitmproxy picks the layer from the first bytes): its accept time counts then.
servers: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


# --- what the HTTP/1 server layers report (called from hardening.py) ---------------------------


def track(server: Any) -> None:
    server.tbf_waiting_since = time.monotonic()  # waiting for a request head since
    server.tbf_head_since = None  # first byte of the head in progress
    server.tbf_first = True  # no request completed on this connection yet
    servers[server.context.client.id] = server


def head_bytes(server: Any) -> None:
    if server.tbf_head_since is None and server.buf:
        server.tbf_head_since = time.monotonic()


def head_done(server: Any) -> None:
    server.tbf_head_since = server.tbf_waiting_since = None
    if server.tbf_first:
        server.tbf_first = False
        peer = server.context.client.peername
        if peer:
            limits.head_done((str(peer[0]), int(peer[1])))


def waiting(server: Any) -> None:
    now = time.monotonic()
    server.tbf_waiting_since = now
    server.tbf_head_since = now if server.buf else None


def expired(server: Any, now: float, header_timeout: float, idle_timeout: float) -> int | None:
    """None if the connection may live on; else the status to answer before closing it
    (0 = close without an answer). Pure on the reported state."""
    if server.state != server.read_headers:
        return None  # a request or response is in flight
    if server.tbf_head_since is not None:
        return 408 if now - server.tbf_head_since > header_timeout else None
    since = server.tbf_waiting_since
    limit = header_timeout if server.tbf_first else idle_timeout
    return 0 if since is not None and now - since > limit else None


# --- flows that ended without a hook saying so -------------------------------------------------

CLOSED_GRACE = 10.0  # seconds a flow may still act after its client left (the backend finishes)
MAX_FLOW_AGE = 3600.0  # seconds after which no per-flow hold outlives a flow, whatever it does


def flow_over(flow: Any, now: float) -> bool:
    """Whether a flow can no longer be doing anything, whatever hooks were (not) called: it is
    done (not live), its client connection closed over CLOSED_GRACE ago, or it is older than
    MAX_FLOW_AGE. For per-flow state that must not depend on every engine path ending in an
    `error` or `response` hook (the freeze's writes in flight, tag claims). Pure."""
    if not flow.live:
        return True
    closed = flow.client_conn.timestamp_end
    if closed is not None and now - closed > CLOSED_GRACE:
        return True
    return now - flow.timestamp_created > MAX_FLOW_AGE


# --- admission ---------------------------------------------------------------------------------


def source_of(host: str) -> str:
    """The client a connection counts against: its IPv4 address, or its IPv6 /64 (one host,
    one site, gets a /64 and can pick any address in it). IPv4-mapped IPv6 is the IPv4
    address. Every loopback address is its own source (tests connect from 127.0.0.x)."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


Peer = tuple[str, int]


class Limits:
    """Open client connections: in total, per source, and per source those whose first request
    head has been in progress for over SLOW_HEAD seconds (`slow`): slow heads from one source
    cannot take the places other clients need. A burst of new connections is not slow (its
    heads arrive within a round trip); slow ones beyond the cap refuse the source's new
    connections, and the sweeper closes them (`excess`), so a burst that turns slow does not
    keep its places either."""

    def __init__(self, total: int, per_client: int, per_client_pending: int = 1 << 30) -> None:
        self.total, self.per_client = total, per_client
        self.per_client_pending = per_client_pending
        self.open: Counter[str] = Counter()
        # source → peer → accept time (monotonic), in accept order: no head completed yet
        self.pending: dict[str, dict[Peer, float]] = {}
        self.count = 0
        self.refused = 0

    def slow(self, source: str, now: float) -> list[Peer]:
        """The source's connections whose first head has taken over SLOW_HEAD, oldest first."""
        out = []
        for peer, since in self.pending.get(source, {}).items():
            if now - since <= SLOW_HEAD:
                break  # accept order: the rest are younger
            out.append(peer)
        return out

    def admit(self, peer: Peer, now: float) -> bool:
        source = source_of(peer[0])
        if (
            self.count >= self.total
            or self.open[source] >= self.per_client
            or len(self.slow(source, now)) >= self.per_client_pending
        ):
            self.refused += 1
            return False
        self.open[source] += 1
        self.pending.setdefault(source, {})[peer] = now
        self.count += 1
        return True

    def excess(self, now: float) -> list[Peer]:
        """Slow connections beyond each source's cap: its first ones keep their places."""
        out: list[Peer] = []
        for source, peers in self.pending.items():
            if len(peers) > self.per_client_pending:
                out += self.slow(source, now)[self.per_client_pending :]
        return out

    def head_done(self, peer: Peer) -> None:
        """The connection completed a request head: no longer pending."""
        source = source_of(peer[0])
        peers = self.pending.get(source)
        if peers is not None and peers.pop(peer, None) is not None and not peers:
            del self.pending[source]

    def release(self, peer: Peer) -> None:
        self.head_done(peer)
        self.count -= 1
        _decrement(self.open, source_of(peer[0]))


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def raise_fd_limit() -> None:
    """Soft descriptor limit up to the hard one (`run` does it too; a gateway started on its
    own may inherit a low soft limit, e.g. 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def fd_cap() -> int:
    """Client connections the descriptors allow: two each (the client's, the backend's),
    after the reserve and the room the splices may hold at once (engine/splice.py)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - FD_RESERVE - splice.FDS_EACH * splice.MAX_ACTIVE) // 2)


BUSY_ANSWER = oci.wire_error(
    503, "TOOMANYREQUESTS", "too many connections; retry", **{"Retry-After": "1"}
)
SLOW_ANSWER = oci.wire_error(
    503,
    "TOOMANYREQUESTS",
    "too many connections from this address with a request head in progress; retry",
    **{"Retry-After": "1"},
)
limits = Limits(min(fd_cap(), DEFAULT_MAX_CONNECTIONS), 256, 32)
timed_out: Counter[str] = Counter()  # closed by the sweeper: "head" (408), "idle", "slow"


def _peer(writer: Any) -> Peer:
    peer = writer.get_extra_info("peername") if writer is not None else None
    return (str(peer[0]), int(peer[1])) if peer else ("?", 0)


def admit(writer: Any) -> bool:
    if limits.admit(_peer(writer), time.monotonic()):
        return True
    try:
        writer.write(BUSY_ANSWER)
        writer.close()
    except OSError:
        pass
    return False


def release(writer: Any) -> None:
    limits.release(_peer(writer))


def state() -> dict[str, object]:
    return {"open": limits.count, "refused": limits.refused, "timed_out": dict(timed_out)}


def metrics_lines(states: list[dict[str, object]]) -> list[str]:
    """Prometheus lines for the connection states of every worker, summed."""
    timeouts: Counter[str] = Counter()
    for s in states:
        timeouts.update({str(k): int(v) for k, v in (s.get("timed_out") or {}).items()})  # type: ignore[attr-defined]
    return [
        "# HELP tabbify_client_connections Open client connections.",
        "# TYPE tabbify_client_connections gauge",
        f"tabbify_client_connections {sum(int(s.get('open', 0)) for s in states)}",  # type: ignore[arg-type]
        "# HELP tabbify_connections_refused_total Connections refused over a cap.",
        "# TYPE tabbify_connections_refused_total counter",
        f"tabbify_connections_refused_total {sum(int(s.get('refused', 0)) for s in states)}",  # type: ignore[arg-type]
        "# HELP tabbify_connections_timed_out_total Connections closed by a timeout.",
        "# TYPE tabbify_connections_timed_out_total counter",
        *(
            f'tabbify_connections_timed_out_total{{reason="{r}"}} {n}'
            for r, n in sorted(timeouts.items())
        ),
    ]


# --- the addon ---------------------------------------------------------------------------------
