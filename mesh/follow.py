"""Follow mesh membership: poll the coordinator's peer set every MESH_POLL_SECONDS and apply
changes in place (`wg syncconf`: peers added, removed or moved; live sessions kept).

Runs under supervisord beside the gateway (`python -m mesh.follow <data dir>`; the MESH_*
variables come from the environment). A coordinator that is down is retried at the next tick;
the node keeps its last peers meanwhile.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from mesh import interface
from mesh.bootstrap import join_or_resume, warn
from mesh.coordinator import Coordinator, CoordinatorUnavailable
from mesh.state import MeshDir, MeshError, NodeState
from tabbify_registry import settings as settings_mod


def tick(
    s: settings_mod.Settings, mesh: MeshDir, key: str, state: NodeState, joined: bool
) -> tuple[NodeState, bool]:
    """One poll. Returns the (possibly updated) state and whether the join is confirmed."""
    assert s.mesh_coordinator_url
    if not joined:  # came up on persisted state: re-register first
        state, joined = join_or_resume(s, mesh, key)
        if joined:
            interface.sync(s.mesh_interface, mesh.wg_conf, key, state)
        return state, joined
    peers = Coordinator(s.mesh_coordinator_url, s.mesh_auth_key).peers(state.node_id)
    if set(peers) != set(state.peers):
        state = dataclasses.replace(state, peers=peers)
        interface.sync(s.mesh_interface, mesh.wg_conf, key, state)
        mesh.save(state)
        print(f"mesh: peer set updated ({len(peers)} peers)", flush=True)
    return state, True


def main(argv: list[str]) -> int:
    s = settings_mod.load({**os.environ, "REGISTRY_DATA_DIR": argv[0]})
    mesh = MeshDir(s.data_dir)
    key = mesh.private_key()
    state = mesh.load()
    if state is None:
        warn("no mesh state to follow")
        return 1
    joined = False  # re-register at the first tick: cheap, and retries a join that failed at boot
    while True:
        time.sleep(s.mesh_poll_seconds)
        try:
            state, joined = tick(s, mesh, key, state, joined)
        except CoordinatorUnavailable as e:
            warn(f"{e}; keeping {len(state.peers)} peers, retrying in {s.mesh_poll_seconds}s")
        except MeshError as e:
            warn(str(e))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
