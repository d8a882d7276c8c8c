"""Stand-in for the mesh coordinator speaking CONTRACTS §5.

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
`requests` logs (method, path, status). `peers_for(node_id)` is the peer set the API hands out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import secrets
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "fd5a:1f02::/32"
LISTEN_PORT = 51820
KEEPALIVE = 25
DEFAULT_AUTH_KEY = "tbf-mesh-standin-join-key"

_PEERS_PATH = re.compile(r"^/v1/nodes/([^/]+)/peers$")
_NETWORK = ipaddress.IPv6Network(PREFIX)


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
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="mesh"')
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

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
                return 200, {"peers": self.peers_for(node_id)}
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
                "peers": self.peers_for(node.node_id),
            }
