"""The mesh bootstrap, from key to interface: the first step of `tabbify-registry run`.

1. key      generated once, kept in $REGISTRY_DATA_DIR/mesh/private.key (0600)
2. join     POST /v1/nodes with the persisted node id and ULA; the answer is validated
            (mesh/validate.py). No usable answer (unreachable, garbage, refused): a node with
            an identity comes up on it and on the last peer set it applied; a new node stops
3. iface    kernel WireGuard or wireguard-go, peers via `wg syncconf`, ULA + mesh route
4. persist  state.json = what was applied; status.json = ok, or degraded and why
5. →        the ULA, which the gateway binds ([ULA]:5000) and the realm names
"""

from __future__ import annotations

import dataclasses
import socket
import sys

from addons.config.settings import Settings
from mesh import fetch, interface
from mesh.coordinator import Coordinator, CoordinatorUnusable, JoinRequest
from mesh.model import NodeState
from mesh.state import MeshDir, MeshError, public_key
from mesh.status import DEGRADED, OK, StatusFile
from mesh.validate import Skipped


def warn(message: str) -> None:
    """Loud on stderr: before supervisord runs, this is the container log."""
    print(f"tabbify-registry mesh: {message}", file=sys.stderr, flush=True)


def join_request(own_public_key: str, known: NodeState | None) -> JoinRequest:
    return JoinRequest(
        own_public_key,
        socket.gethostname(),
        known.node_id if known else None,
        known.ula if known else None,
    )


def skipped_reason(skipped: tuple[Skipped, ...]) -> str | None:
    """The /healthz reason for peers the coordinator sent that were skipped."""
    if not skipped:
        return None
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return f"skipped {len(skipped)} invalid peer(s) from the coordinator: {skipped[0]}{more}"


def join_or_resume(
    s: Settings, mesh: MeshDir, key: str
) -> tuple[NodeState, str | None, tuple[Skipped, ...]]:
    """The state to bring up, why it is degraded (None = joined cleanly), and skipped peers."""
    assert s.mesh_coordinator_url
    own = public_key(key)
    known, dropped = mesh.load(own)
    for line in dropped:
        warn(f"persisted {line}: dropped")
    try:
        joined = Coordinator(s.mesh_coordinator_url, s.mesh_auth_key).join(join_request(own, known))
    except CoordinatorUnusable as e:
        if known is None:
            raise MeshError(
                f"MESH_COORDINATOR_URL={s.mesh_coordinator_url}: {e}, and this node has no "
                "mesh identity yet"
            ) from None
        warn(f"{e}; coming up on the persisted ULA {known.ula} and {len(known.peers)} peers")
        # A new run has no connections on a ULA it was retiring: drop those addresses.
        return dataclasses.replace(known, retiring=()), str(e), ()
    state = joined.state
    for x in joined.skipped:
        print(f"mesh: skipped {x}", file=sys.stderr, flush=True)
    if known and state.ula != known.ula:
        warn(f"the coordinator moved this node from ULA {known.ula} to {state.ula}")
    if known and state.node_id != known.node_id:
        warn(f"WARNING: the coordinator gave a new node id {state.node_id} (was {known.node_id})")
    return state, skipped_reason(joined.skipped), joined.skipped


def up(s: Settings) -> str:
    """Bring the node onto the mesh; return its ULA."""
    mesh = MeshDir(s.data_dir)
    key = mesh.private_key()
    state, reason, _ = join_or_resume(s, mesh, key)
    interface.up(s.mesh_interface, mesh.wg_conf, key, state)
    mesh.save(state)  # only now: state.json is the last state that was applied
    first_check = s.mesh_poll_seconds + fetch.DEADLINE + 60  # supervisord starts the follower
    StatusFile(mesh.status_file).write(DEGRADED if reason else OK, reason, state.ula, first_check)
    return state.ula
