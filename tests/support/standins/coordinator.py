"""Stand-in for the mesh coordinator speaking contract §5.

- `POST /v1/nodes` (bearer = the configured auth key, else 401) registers or re-registers a
  node and answers `{"node_id", "ula", "prefix", "listen_port", "peers"}`.
- `GET /v1/nodes/{node_id}/peers` (bearer required) answers `{"peers": [...]}`: every *other*
  registered node as `{"public_key", "endpoint", "allowed_ips": ["<ula>/128"],
  "persistent_keepalive": 25}`.

Identity is sticky: a re-join with a known `node_id`, or with a known public key, gets the same
node id and ULA; a join presenting a persisted `ula` for an unknown node id keeps that ULA when
it is free. `force_ula[node_id] = "..."` makes the next joins of that node receive a different
ULA (the "coordinator changed my ULA" case). A node joining through the API gets the request's
source address and port 51820 as its endpoint unless the test pinned one with `set_endpoint`.

Fault switches: `set_down(True)` closes the listening socket (connection refused) and
`set_down(False)` rebinds the same host:port; `fail_status = 503` makes every API request
answer that status. `joins` and `polls` count authorized requests (those answered with
`fail_status` included; refused connections are not requests), `unauthorized` the 401s and
`requests` logs (method, path, status). `peers_for(node_id)` is the peer set of the registered
nodes (what test clients configure); the API hands out that set plus the bad entries below.

A coordinator that says something wrong:
- `bad_peers = ["bad-key", ...]` appends one malformed entry per named kind (BAD_PEER_KINDS)
  to every peer list the API hands out, join answers and polls, after the real peers;
- `answer_mode = "non-json"` (one of ANSWER_MODES) makes every authorized API answer
  misbehave that way: not JSON, the wrong JSON shape, a 50 MiB body, a slow drip, a redirect,
  a 5xx, a join answer with a ULA outside the prefix...; None = normal answers.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "fd5a:1f02::/32"
LISTEN_PORT = 51820
KEEPALIVE = 25
DEFAULT_AUTH_KEY = "tbf-mesh-standin-join-key"

_PEERS_PATH = re.compile(r"^/v1/nodes/([^/]+)/peers$")
_NETWORK = ipaddress.IPv6Network(PREFIX)

BAD_PEER_KINDS = (
    "bad-key",  # not base64 at all
    "noncanonical-key",  # base64 of 32 bytes, but not the canonical encoding
    "short-key",  # 31 bytes
    "long-key",  # 33 bytes
    "bad-endpoint",  # no port
    "outside-prefix",  # allowed IPs outside the mesh prefix
    "covers-own-ula",  # allowed IPs covering the asking node's ULA
    "default-route",  # ::/0
    "ipv4-default-route",  # 0.0.0.0/0
    "keepalive",  # out of range
    "duplicate-key",  # a real peer's key again, with other endpoint and allowed IPs
    "own-key",  # the asking node's own key
    "not-an-object",  # a string where a peer object belongs
)
ANSWER_MODES = (
    "non-json",  # an HTML error page with status 200
    "empty",  # 200 with no body
    "list",  # a JSON list instead of an object
    "peers-not-list",  # {"peers": "everyone"}
    "null",  # JSON null
    "all-peers-bad",  # a peer list in which no entry is valid
    "huge",  # 50 MiB, close-delimited (no Content-Length)
    "slow-drip",  # a valid answer, one byte every 0.25 s
    "redirect",  # 302 to the same path
    "5xx",  # 502
    "bad-join-ula",  # join answers give a ULA outside the prefix (polls are normal)
)
HUGE_BYTES = 50 << 20


@dataclass
class Node:
    node_id: str
    public_key: str
    ula: str
    endpoint: str | None
    tags: list[str]
    hostname: str | None
    pinned: bool = False  # endpoint set by the test: joins do not overwrite it


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _key(seed: str, size: int = 32) -> str:
    """A deterministic base64 key of `size` bytes (a valid WireGuard key when size is 32)."""
    raw = (seed.encode() * size)[:size]
    return base64.b64encode(raw).decode()


def bad_peer(kind: str, asking: Node | None, real: list[dict[str, Any]]) -> Any:
    """One malformed peer entry of `kind`; every other field of it is valid."""
    n = BAD_PEER_KINDS.index(kind) + 1
    entry: dict[str, Any] = {
        "public_key": _key(f"bad-peer-{kind}"),
        "endpoint": f"10.99.0.{n}:51820",
        "allowed_ips": [f"fd5a:1f02:ffff::{n:x}/128"],
        "persistent_keepalive": KEEPALIVE,
    }
    own_ula = asking.ula if asking else "fd5a:1f02::1"
    if kind == "bad-key":
        entry["public_key"] = "this is not a wireguard key"
    elif kind == "noncanonical-key":
        key = entry["public_key"]
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        entry["public_key"] = key[:42] + alphabet[alphabet.index(key[42]) | 1] + "="
    elif kind == "short-key":
        entry["public_key"] = _key("short", 31)
    elif kind == "long-key":
        entry["public_key"] = _key("long", 33)
    elif kind == "bad-endpoint":
        entry["endpoint"] = "10.99.0.1"
    elif kind == "outside-prefix":
        entry["allowed_ips"] = ["2001:db8::/64"]
    elif kind == "covers-own-ula":
        entry["allowed_ips"] = [f"{own_ula}/64"]
    elif kind == "default-route":
        entry["allowed_ips"] = ["::/0"]
    elif kind == "ipv4-default-route":
        entry["allowed_ips"] = ["0.0.0.0/0"]
    elif kind == "keepalive":
        entry["persistent_keepalive"] = 70000
    elif kind == "duplicate-key":
        entry["public_key"] = real[0]["public_key"] if real else entry["public_key"]
    elif kind == "own-key":
        entry["public_key"] = asking.public_key if asking else entry["public_key"]
    elif kind == "not-an-object":
        return "peer"
    else:
        raise ValueError(f"unknown bad peer kind {kind!r}")
    return entry


def _valid_ula(value: Any) -> str | None:
    """`value` normalised when it is a single address inside the mesh prefix, else None."""
    if not isinstance(value, str):
        return None
    try:
        addr = ipaddress.IPv6Address(value.split("/")[0])
    except ValueError:
        return None
    return str(addr) if addr in _NETWORK else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class CoordinatorStandin:
    """`CoordinatorStandin(host, port=0).start()`; `url` is known right after construction."""

    def __init__(self, host: str, port: int = 0, auth_key: str = DEFAULT_AUTH_KEY) -> None:
        self.host = host
        self.auth_key = auth_key
        self.force_ula: dict[str, str] = {}
        self.fail_status: int | None = None
        self.bad_peers: list[str] = []
        self.answer_mode: str | None = None
        self.joins = 0
        self.polls = 0
        self.unauthorized = 0
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self._nodes: dict[str, Node] = {}
        self._next = 1
        self._lock = threading.RLock()
        self._down = False
        self._server = self._bind(port)
        self.port = self._server.server_address[1]
        self.url = f"http://{_endpoint(host, self.port)}"
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> CoordinatorStandin:
        self._serve()
        return self

    def stop(self) -> None:
        with self._lock:
            self._close()
            self._down = True

    def __enter__(self) -> CoordinatorStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_down(self, down: bool) -> None:
        """Down: the listening socket is closed, so new connections are refused. Up: rebind."""
        with self._lock:
            if down and not self._down:
                self._close()
            elif not down and self._down:
                self._server = self._bind(self.port)
                self._serve()
            self._down = down

    @property
    def down(self) -> bool:
        return self._down

    # --- what tests manipulate ---------------------------------------------------------------

    def add_node(self, public_key: str, endpoint: str, ula: str | None = None) -> tuple[str, str]:
        """Register a client node the test built itself; returns (node_id, ula)."""
        with self._lock:
            node = self._register(None, public_key, ula, [], None)
            node.endpoint, node.pinned = endpoint, True
            return node.node_id, node.ula

    def remove_node(self, node_id: str) -> None:
        with self._lock:
            self._nodes.pop(node_id, None)

    def set_endpoint(self, node: str, endpoint: str) -> None:
        """`node` is a node id or a public key; the endpoint is pinned (joins keep it)."""
        with self._lock:
            found = self._find(node)
            if found is None:
                raise KeyError(node)
            found.endpoint, found.pinned = endpoint, True

    def node(self, node: str) -> Node | None:
        """A copy of the node known by that id or public key."""
        with self._lock:
            found = self._find(node)
            return None if found is None else Node(**vars(found))

    @property
    def nodes(self) -> dict[str, Node]:
        with self._lock:
            return {k: Node(**vars(v)) for k, v in self._nodes.items()}

    def peers_for(self, node_id: str) -> list[dict[str, Any]]:
        """The peer set of `node_id` as the API hands it out: every other node with an endpoint."""
        with self._lock:
            return [
                {
                    "public_key": n.public_key,
                    "endpoint": n.endpoint,
                    "allowed_ips": [f"{n.ula}/128"],
                    "persistent_keepalive": KEEPALIVE,
                }
                for n in self._nodes.values()
                if n.node_id != node_id and n.endpoint
            ]

    def api_peers(self, asking: Node) -> list[dict[str, Any]]:
        """The peer list the API hands `asking`: the real peers, then the bad entries."""
        with self._lock:
            real = self.peers_for(asking.node_id)
            return real + [bad_peer(kind, asking, real) for kind in self.bad_peers]

    # --- internals ---------------------------------------------------------------------------

    def _bind(self, port: int) -> _Server:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so "down" really means no more answers.
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_PUT(self) -> None:
                self._dispatch("PUT")

            def do_DELETE(self) -> None:
                self._dispatch("DELETE")

            def _dispatch(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = standin._handle(
                    method,
                    self.path,
                    self.headers.get("Authorization", ""),
                    body,
                    self.client_address[0],
                )
                with standin._lock:
                    standin.requests.append((method, self.path, status))
                    mode = standin.answer_mode
                if mode and status in (200, 201):
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self._misbehave(mode, method, payload)
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="mesh"')
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def _send(self, status: int, body: bytes, *headers: tuple[str, str]) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _misbehave(self, mode: str, method: str, payload: Any) -> None:
                json_type = ("Content-Type", "application/json")
                if mode == "non-json":
                    self._send(200, b"<html><body>502 Bad Gateway</body></html>")
                elif mode == "empty":
                    self._send(200, b"", json_type)
                elif mode == "list":
                    self._send(200, json.dumps(payload.get("peers", [])).encode(), json_type)
                elif mode == "peers-not-list":
                    self._send(200, json.dumps({**payload, "peers": "everyone"}).encode())
                elif mode == "null":
                    self._send(200, b"null", json_type)
                elif mode == "all-peers-bad":
                    bad = [bad_peer(k, None, []) for k in ("bad-key", "short-key")]
                    self._send(200, json.dumps({**payload, "peers": bad}).encode(), json_type)
                elif mode == "huge":
                    self.send_response(200)
                    self.send_header(*json_type)
                    self.end_headers()  # no Content-Length: the body ends when we close
                    self.wfile.write(b'{"peers": [')
                    chunk = b" " * 65536
                    for _ in range(HUGE_BYTES // len(chunk)):
                        self.wfile.write(chunk)
                elif mode == "slow-drip":
                    body = json.dumps(payload).encode()
                    self.send_response(200)
                    self.send_header(*json_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.flush()
                    for i in range(len(body)):
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(0.25)
                elif mode == "redirect":
                    self._send(302, b"", ("Location", self.path))
                elif mode == "5xx":
                    self._send(502, b'{"error": "bad gateway"}', json_type)
                elif mode == "bad-join-ula":
                    if method == "POST":
                        payload = {**payload, "ula": "2001:db8::1"}
                    self._send(200, json.dumps(payload).encode(), json_type)
                else:
                    raise ValueError(f"unknown answer mode {mode!r}")

        return _Server((self.host, port), Handler)

    def _serve(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def _find(self, node: str) -> Node | None:
        if node in self._nodes:
            return self._nodes[node]
        return next((n for n in self._nodes.values() if n.public_key == node), None)

    def _ula_free(self, ula: str, node_id: str | None) -> bool:
        return all(n.ula != ula or n.node_id == node_id for n in self._nodes.values())

    def _allocate(self) -> str:
        while True:
            ula = str(ipaddress.IPv6Address(f"fd5a:1f02:0:{self._next:x}::1"))
            self._next += 1
            if self._ula_free(ula, None):
                return ula

    def _register(
        self,
        node_id: str | None,
        public_key: str,
        ula: str | None,
        tags: list[str],
        hostname: str | None,
    ) -> Node:
        """Join semantics: sticky by node id, then by public key; new nodes keep a free `ula`."""
        node = self._nodes.get(node_id) if node_id else None
        if node is None:
            node = next((n for n in self._nodes.values() if n.public_key == public_key), None)
        if node is None:
            wanted = _valid_ula(ula)
            new_id = node_id or f"node-{secrets.token_hex(4)}"
            keep = wanted is not None and self._ula_free(wanted, new_id)
            node = Node(
                node_id=new_id,
                public_key=public_key,
                ula=wanted if keep and wanted else self._allocate(),
                endpoint=None,
                tags=tags,
                hostname=hostname,
            )
            self._nodes[new_id] = node
        else:
            node.public_key = public_key  # a known node may have rotated its key
            node.tags, node.hostname = tags or node.tags, hostname or node.hostname
        forced = self.force_ula.get(node.node_id)
        if forced:
            node.ula = str(ipaddress.IPv6Address(forced))
        return node

    def _handle(
        self, method: str, path: str, authorization: str, body: bytes, source: str
    ) -> tuple[int, Any]:
        path = path.split("?", 1)[0]
        join = method == "POST" and path == "/v1/nodes"
        poll = method == "GET" and _PEERS_PATH.match(path)
        if not join and not poll:
            return 404, {"error": "not found"}
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip(), self.auth_key):
            with self._lock:
                self.unauthorized += 1
            return 401, {"error": "unauthorized"}
        with self._lock:
            if poll:
                self.polls += 1
            else:
                self.joins += 1
            if self.fail_status is not None:
                return self.fail_status, {"error": "injected failure"}
            if poll:
                node_id = poll.group(1)
                if node_id not in self._nodes:
                    return 404, {"error": "unknown node"}
                return 200, {"peers": self.api_peers(self._nodes[node_id])}
            try:
                request = json.loads(body or b"null")
            except ValueError:
                return 400, {"error": "body is not JSON"}
            if not isinstance(request, dict):
                return 400, {"error": "body must be a JSON object"}
            public_key = request.get("public_key")
            if not isinstance(public_key, str) or not public_key:
                return 400, {"error": "public_key is required"}
            node_id = request.get("node_id") or None
            if node_id is not None and not isinstance(node_id, str):
                return 400, {"error": "node_id must be a string or null"}
            tags = request.get("tags") or []
            hostname = request.get("hostname")
            node = self._register(node_id, public_key, request.get("ula"), tags, hostname)
            if not node.pinned:
                node.endpoint = _endpoint(source.removeprefix("::ffff:"), LISTEN_PORT)
            return 200, {
                "node_id": node.node_id,
                "ula": node.ula,
                "prefix": PREFIX,
                "listen_port": LISTEN_PORT,
                "peers": self.api_peers(node),
            }
