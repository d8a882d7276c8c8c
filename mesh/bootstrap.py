"""The mesh bootstrap, from key to interface: the first step of `tabbify-registry run`.

1. key      generated once, kept in $REGISTRY_DATA_DIR/mesh/private.key (0600)
2. join     POST /v1/nodes with the persisted node id and ULA; the answer is persisted
            (coordinator down: a node with an identity goes on with it; a new node stops)
3. iface    kernel WireGuard or wireguard-go, peers via `wg syncconf`, ULA + mesh route
4. →        the ULA, which the gateway binds ([ULA]:5000) and the realm names
"""

from __future__ import annotations

import logging
import socket
import sys

from mesh import interface
from mesh.coordinator import Coordinator, CoordinatorUnavailable, JoinRequest
from mesh.state import MeshDir, MeshError, NodeState, public_key
from tabbify_registry.settings import Settings

logger = logging.getLogger("mesh")


def warn(message: str) -> None:
    """Loud on stderr: supervisord is not running yet, so this is the container log."""
    print(f"tabbify-registry mesh: {message}", file=sys.stderr, flush=True)


def join_or_resume(s: Settings, mesh: MeshDir, key: str) -> tuple[NodeState, bool]:
    """The node's state and whether the coordinator confirmed it this time."""
    assert s.mesh_coordinator_url
    known = mesh.load()
    coordinator = Coordinator(s.mesh_coordinator_url, s.mesh_auth_key)
    request = JoinRequest(
        public_key(key),
        socket.gethostname(),
        known.node_id if known else None,
        known.ula if known else None,
    )
    try:
        state = coordinator.join(request)
    except CoordinatorUnavailable as e:
        if known is None:
            raise MeshError(
                f"MESH_COORDINATOR_URL={s.mesh_coordinator_url}: {e}, and this node has no "
                "mesh identity yet"
            ) from None
        warn(f"{e}; coming up on the persisted ULA {known.ula} and {len(known.peers)} peers")
        return known, False
    if known and state.ula != known.ula:
        warn(
            f"WARNING: the coordinator moved this node from ULA {known.ula} to {state.ula}; "
            "clients using the old address will fail"
        )
    if known and state.node_id != known.node_id:
        warn(f"WARNING: the coordinator gave a new node id {state.node_id} (was {known.node_id})")
    mesh.save(state)
    return state, True


def up(s: Settings) -> str:
    """Bring the node onto the mesh; return its ULA."""
    mesh = MeshDir(s.data_dir)
    key = mesh.private_key()
    state, _ = join_or_resume(s, mesh, key)
    interface.up(s.mesh_interface, mesh.wg_conf, key, state)
    return state.ula
