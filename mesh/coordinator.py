"""Client of the mesh coordinator (CONTRACTS §5), with strict validation of its answers.

Whatever the coordinator says ends up in `ip` and `wg` arguments and in URL paths, so every
field is checked against its grammar before use.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

import requests

from mesh.state import MeshError, NodeState, Peer

TIMEOUT = 10.0
_NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ENDPOINT = re.compile(
    r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})"
)
_ULA_NET = ipaddress.IPv6Network("fc00::/7")


class CoordinatorUnavailable(MeshError):
    """Unreachable, timed out or 5xx: a node with an identity keeps going on what it has."""


@dataclass(frozen=True)
class JoinRequest:
    public_key: str
    hostname: str
    node_id: str | None
    ula: str | None


def _wg_key(value: Any) -> str:
    try:
        if isinstance(value, str) and len(base64.b64decode(value, validate=True)) == 32:
            return value
    except (binascii.Error, ValueError):
        pass
    raise MeshError(f"coordinator sent an invalid WireGuard key {value!r:.60}")


def _endpoint(value: Any) -> str | None:
    if value is None:
        return None
    m = _ENDPOINT.fullmatch(value) if isinstance(value, str) else None
    if not m or not 0 < int(m.group(2) or m.group(4) or m.group(6)) < 65536:
        raise MeshError(f"coordinator sent an invalid peer endpoint {value!r:.60}")
    return value


def parse_peers(items: Any) -> tuple[Peer, ...]:
    if not isinstance(items, list):
        raise MeshError("coordinator sent no peer list")
    peers = []
    for item in items:
        if not isinstance(item, dict):
            raise MeshError("coordinator sent a malformed peer")
        allowed = item.get("allowed_ips", [])
        try:
            nets = tuple(str(ipaddress.ip_network(a, strict=False)) for a in allowed)
        except (TypeError, ValueError):
            raise MeshError(f"coordinator sent invalid allowed_ips {allowed!r:.60}") from None
        keepalive = item.get("persistent_keepalive")
        if keepalive is not None and not (isinstance(keepalive, int) and 0 <= keepalive < 65536):
            raise MeshError("coordinator sent an invalid persistent_keepalive")
        peers.append(
            Peer(_wg_key(item.get("public_key")), _endpoint(item.get("endpoint")), nets, keepalive)
        )
    return tuple(peers)


def parse_join(data: Any) -> NodeState:
    if not isinstance(data, dict):
        raise MeshError("coordinator answered the join without a JSON object")
    node_id = data.get("node_id")
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise MeshError(f"coordinator sent an invalid node_id {node_id!r:.60}")
    try:
        ula = ipaddress.IPv6Address(data.get("ula"))
        prefix = ipaddress.IPv6Network(data.get("prefix"))
    except (TypeError, ValueError):
        raise MeshError("coordinator sent an invalid ula or prefix") from None
    if ula not in _ULA_NET or ula not in prefix:
        raise MeshError(f"coordinator sent ula {ula} outside a ULA prefix {prefix}")
    port = data.get("listen_port")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise MeshError(f"coordinator sent an invalid listen_port {port!r}")
    return NodeState(node_id, str(ula), str(prefix), port, parse_peers(data.get("peers", [])))


class Coordinator:
    def __init__(self, url: str, auth_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.trust_env = False
        self.headers = {"Authorization": f"Bearer {auth_key}"} if auth_key else {}

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            r = self.session.request(
                method,
                self.url + path,
                json=body,
                headers=self.headers,
                timeout=TIMEOUT,
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise CoordinatorUnavailable(f"coordinator unreachable ({type(e).__name__})") from None
        if r.status_code >= 500:
            raise CoordinatorUnavailable(f"coordinator answered {r.status_code}")
        if r.status_code in (401, 403):
            raise MeshError(f"coordinator refused MESH_AUTH_KEY ({r.status_code})")
        if r.status_code not in (200, 201):
            raise MeshError(f"coordinator answered {r.status_code} to {method} {path}")
        try:
            return r.json()
        except ValueError:
            raise CoordinatorUnavailable("coordinator answered without JSON") from None

    def join(self, req: JoinRequest) -> NodeState:
        body = {
            "public_key": req.public_key,
            "tags": ["registry"],
            "hostname": req.hostname,
            "node_id": req.node_id,
            "ula": req.ula,
        }
        return parse_join(self._call("POST", "/v1/nodes", body))

    def peers(self, node_id: str) -> tuple[Peer, ...]:
        if not _NODE_ID.fullmatch(node_id):
            raise MeshError(f"invalid node_id {node_id!r:.60}")
        data = self._call("GET", f"/v1/nodes/{node_id}/peers")
        if not isinstance(data, dict):
            raise CoordinatorUnavailable("coordinator answered peers without a JSON object")
        return parse_peers(data.get("peers"))
